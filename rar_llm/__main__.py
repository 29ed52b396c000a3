"""The ``rar-llm`` command: one subcommand per tool, each a typed function (jsonargparse)."""

from jsonargparse import CLI

from rar_llm.init import init
from rar_llm.prepare import digits


def main() -> None:
    CLI({"init": init, "digits": digits}, as_positional=False)


if __name__ == "__main__":
    main()
