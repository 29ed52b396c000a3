"""The ``rar-llm`` command: one subcommand per tool, each a typed function (jsonargparse).

A user's mistake (a missing file, a bad value, an output that already exists) prints one line,
``rar-llm <command>: error: <message>``, and exits 2. Set ``RAR_LLM_DEBUG=1`` (or pass ``--debug``
first) for the full traceback of a bug report.
"""

from __future__ import annotations

import importlib
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)


COMMANDS = {  # subcommand -> "module:function", imported only when needed (litgpt alone takes seconds)
    "demo": "rar_llm.demo:demo",
    "init": "rar_llm.checkpoint:init",
    "extend": "rar_llm.extend:extend",
    "digits": "rar_llm.data.digits:digits",
    "fashion-mnist": "rar_llm.data.fashion:fashion_mnist",
    "train-vq": "rar_llm.tokenizers.train_vq:train_vq",
    "train-classifier": "rar_llm.eval.classifier:train_classifier",
    "sample": "rar_llm.sampling.cli:sample",
    "tokenize": "rar_llm.data.images:tokenize",
    "import-jsonl": "rar_llm.data.jsonl:import_jsonl",
    "evaluate": "rar_llm.eval.evaluate:evaluate_cli",
    "export": "rar_llm.serve.export:export",
    "import-hf": "rar_llm.serve.export:import_hf",
    "pydoc-topics": "rar_llm.data.corpora:pydoc_topics",
    "train-bpe": "rar_llm.data.corpora:train_bpe",
}


def commands(names: list[str] | None = None) -> dict:
    """Subcommand name -> function, for ``names`` (default: all, so that ``rar-llm --help`` lists them)."""
    out = {}
    for name in names or COMMANDS:
        module, function = COMMANDS[name].split(":")
        out[name] = getattr(importlib.import_module(module), function)
    return out


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("RAR_LLM_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        CLI(commands([command] if command in COMMANDS else None), as_positional=False, args=argv)
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"rar-llm {command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, and how to go on where that is possible
        if debug:
            raise
        hint = "; rerun the command with --resume true to continue" if command in ("tokenize", "import-jsonl") else ""
        print(f"rar-llm {command}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
