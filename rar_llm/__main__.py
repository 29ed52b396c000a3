"""The ``rar-llm`` command: one subcommand per tool, each a typed function (jsonargparse)."""

from jsonargparse import CLI

from rar_llm.demo import demo
from rar_llm.evaluate import evaluate_cli
from rar_llm.export import export, import_hf
from rar_llm.init import init
from rar_llm.prepare import digits, import_jsonl, tokenize
from rar_llm.sample import sample
from rar_llm.text import pydoc_topics, train_bpe


def main() -> None:
    CLI(
        {
            "demo": demo,
            "init": init,
            "digits": digits,
            "sample": sample,
            "tokenize": tokenize,
            "import-jsonl": import_jsonl,
            "evaluate": evaluate_cli,
            "export": export,
            "import-hf": import_hf,
            "pydoc-topics": pydoc_topics,
            "train-bpe": train_bpe,
        },
        as_positional=False,
    )


if __name__ == "__main__":
    main()
