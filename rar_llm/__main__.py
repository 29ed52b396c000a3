"""The ``rar-llm`` command: one subcommand per tool, each a typed function (jsonargparse).

A user's mistake (a missing file, a bad value, an output that already exists) prints one line,
``rar-llm <command>: error: <message>``, and exits 2. Set ``RAR_LLM_DEBUG=1`` (or pass ``--debug``
first) for the full traceback of a bug report.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

USER_ERRORS = (ValueError, OSError, ImportError)  # a user's input or machine: one line, never a traceback


COMMANDS = {  # subcommand -> ("module:function", one line for the command list); imported only when run
    "demo": ("rar_llm.demo:demo", "train a RAR digit generator from scratch and show what it makes"),
    "init": ("rar_llm.checkpoint:init", "write a randomly initialised litgpt checkpoint folder"),
    "extend": ("rar_llm.extend:extend", "add an image layout's ids to a pretrained litgpt checkpoint"),
    "digits": ("rar_llm.data.digits:digits", "scikit-learn's bundled 8x8 digits as shards"),
    "fashion-mnist": ("rar_llm.data.fashion:fashion_mnist", "Fashion-MNIST's IDX files as shards of codes"),
    "train-vq": ("rar_llm.tokenizers.train_vq:train_vq", "train the VQ tokenizer on Fashion-MNIST or an image folder"),
    "train-classifier": ("rar_llm.eval.classifier:train_classifier", "train the evaluation CNN on Fashion-MNIST or an image folder"),
    "sample": ("rar_llm.sampling.cli:sample", "sample images per class from a checkpoint (PNG grid and codes)"),
    "tokenize": ("rar_llm.data.images:tokenize", "encode an image folder (a subfolder per class) into shards"),
    "import-jsonl": ("rar_llm.data.jsonl:import_jsonl", "import pre-tokenized JSONL (RAR's maskgitvq.jsonl) as shards"),
    "evaluate": ("rar_llm.eval.evaluate:evaluate_cli", "score generated codes and write metrics.json"),
    "web": ("rar_llm.serve.web:web", "a browser page to try a checkpoint: class, guidance, order, seed, inpainting"),
    "watch": ("rar_llm.watch:watch", "follow a litgpt training run: a sample grid per checkpoint, loss and r curves"),
    "export": ("rar_llm.serve.export:export", "export a checkpoint for serving stacks (Hugging Face, GGUF)"),
    "import-hf": ("rar_llm.serve.export:import_hf", "turn an exported Hugging Face folder back into a checkpoint"),
    "pydoc-topics": ("rar_llm.data.corpora:pydoc_topics", "Python's bundled help topics as a JSONL text corpus"),
    "train-bpe": ("rar_llm.data.corpora:train_bpe", "train a byte-level BPE tokenizer.json"),
}


def command(name: str):
    """The function behind subcommand ``name``."""
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    """``rar-llm --help`` without a command: the list, without importing any command's module."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: rar-llm [--debug] COMMAND [--help] [flags]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`rar-llm COMMAND --help` lists a command's flags; --debug (or RAR_LLM_DEBUG=1) shows tracebacks.")


def parser_message(error: Exception) -> str:
    """jsonargparse's rejection of a flag value as one line: ``--epochs: expected a float, got 'inf'``."""
    text = " ".join(str(error).split())
    m = re.fullmatch(r'Parser key "([\w.]+)": Expected a <class \'(\w+)\'>\. Got value: (.*)', text)
    return f"--{m[1]}: expected {'an' if m[2][0] in 'aeiou' else 'a'} {m[2]}, got {m[3]!r}" if m else text


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("RAR_LLM_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    name = next((a for a in argv if a in COMMANDS), next((a for a in argv if not a.startswith("-")), ""))
    if name not in COMMANDS:
        if not name and argv and set(argv) <= {"-h", "--help"}:
            print(usage())
            sys.exit(0)
        problem = f"unknown command {name!r}" if name else "no command given"
        print(f"rar-llm: error: {problem}; use one of: {', '.join(COMMANDS)} (rar-llm --help)", file=sys.stderr)
        sys.exit(2)
    try:
        CLI({name: command(name)}, as_positional=False, args=argv, exit_on_error=False)
    except ArgumentError as e:  # a flag the parser rejects: one line too, not the usage block
        if debug:
            raise
        print(f"rar-llm {name}: error: {parser_message(e)} (rar-llm {name} --help lists the flags)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"rar-llm {name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, and how to go on where that is possible
        if debug:
            raise
        hint = "; rerun the command with --resume true to continue" if name in ("tokenize", "import-jsonl") else ""
        print(f"rar-llm {name}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
