"""The ``rar-llm`` command: one subcommand per tool, each a typed function (jsonargparse).

A user's mistake (a missing file, a bad value, an output that already exists) prints one line,
``rar-llm <command>: error: <message>``, and exits 2. Set ``RAR_LLM_DEBUG=1`` (or pass ``--debug``
first) for the full traceback of a bug report.
"""

from __future__ import annotations

import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)


def commands() -> dict:
    """Subcommand name -> function (imported here, so ``rar-llm --help`` lists them all)."""
    from rar_llm.classifier import train_classifier
    from rar_llm.corpora import pydoc_topics, train_bpe
    from rar_llm.demo import demo
    from rar_llm.evaluate import evaluate_cli
    from rar_llm.export import export, import_hf
    from rar_llm.extend import extend
    from rar_llm.fashion import fashion_mnist, train_vq
    from rar_llm.init import init
    from rar_llm.jsonl import import_jsonl
    from rar_llm.prepare import digits, tokenize
    from rar_llm.sample import sample

    return {
        "demo": demo,
        "init": init,
        "extend": extend,
        "digits": digits,
        "fashion-mnist": fashion_mnist,
        "train-vq": train_vq,
        "train-classifier": train_classifier,
        "sample": sample,
        "tokenize": tokenize,
        "import-jsonl": import_jsonl,
        "evaluate": evaluate_cli,
        "export": export,
        "import-hf": import_hf,
        "pydoc-topics": pydoc_topics,
        "train-bpe": train_bpe,
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("RAR_LLM_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        CLI(commands(), as_positional=False, args=argv)
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
