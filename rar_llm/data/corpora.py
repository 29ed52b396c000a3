"""Text corpora for mixed training: reading documents, Python's own help texts, a small BPE.

``rar-llm pydoc-topics`` and ``rar-llm train-bpe`` make a real text corpus and a tokenizer for it
with no download (the text half of ``recipes/mixed_digits.yaml``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from rar_llm.outputs import claim_file

def read_documents(paths: Sequence[Path | str], text_key: str = "text") -> Iterator[str]:
    """Documents of plain-text files (one document each) and JSON-lines files (``text_key`` of each line)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found; give .txt or .jsonl files")
        if path.suffix != ".jsonl":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e}); give .txt or .jsonl files") from None
            yield text
            continue
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in _numbered(f, path):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_key]
                    if not isinstance(doc, str):
                        raise TypeError(f"{text_key!r} is {type(doc).__name__}")
                except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_key!r} string ({e})") from None
                yield doc


def _numbered(f, path: Path) -> Iterator[tuple[int, str]]:
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield n, line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n + 1}: not UTF-8 text ({e})") from None


def pydoc_topics(out: Path = Path("data/pydoc_topics.jsonl"), overwrite: bool = False) -> Path:
    """Python's bundled help topics (``pydoc_data.topics``) as JSON lines: a real text corpus, no download.

    Args:
        out: the file to write (refused if it exists, unless ``overwrite``).
        overwrite: replace an existing ``out``.
    """
    from pydoc_data.topics import topics

    out = claim_file(out, overwrite)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"topic": name, "text": topics[name]}) + "\n" for name in sorted(topics))
    print(f"Wrote {len(topics)} documents to {out}")
    return out


def train_bpe(
    files: list[Path], out: Path, vocab_size: int = 1024, text_key: str = "text", overwrite: bool = False
) -> Path:
    """Train a byte-level BPE ``tokenizer.json`` (GPT-2 pre-tokenizer, ``<|endoftext|>`` as id 0).

    Byte-level, so every text round-trips exactly; small, so a tiny model's embedding stays small.

    Args:
        files: ``.txt`` files (one document each) and ``.jsonl`` files (``text_key`` of each line).
        out: the ``tokenizer.json`` to write (refused if it exists, unless ``overwrite``).
        vocab_size: tokens of the trained vocabulary.
        text_key: the key of a ``.jsonl`` line that holds its text.
        overwrite: replace an existing ``out``.
    """
    from tokenizers.trainers import BpeTrainer

    out = claim_file(out, overwrite)  # refuses before the training, not after
    if Path(out).resolve() in {Path(f).resolve() for f in files}:
        raise ValueError(f"--out {out} is one of the training files; write the tokenizer elsewhere")

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_documents(files, text_key), trainer)
    tok.save(str(out))
    return Path(out)
