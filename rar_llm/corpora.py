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

def read_documents(paths: Sequence[Path | str], text_key: str = "text") -> Iterator[str]:
    """Documents of plain-text files (one document each) and JSON-lines files (``text_key`` of each line)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found; give .txt or .jsonl files")
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8")
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_key!r} string ({e})") from None
                yield doc


def pydoc_topics(out: Path = Path("data/pydoc_topics.jsonl")) -> Path:
    """Python's bundled help topics (``pydoc_data.topics``) as JSON lines: a real text corpus, no download."""
    from pydoc_data.topics import topics

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"topic": name, "text": topics[name]}) + "\n" for name in sorted(topics))
    print(f"Wrote {len(topics)} documents to {out}")
    return out


def train_bpe(files: list[Path], out: Path, vocab_size: int = 1024, text_key: str = "text") -> Path:
    """Train a byte-level BPE ``tokenizer.json`` (GPT-2 pre-tokenizer, ``<|endoftext|>`` as id 0).

    Byte-level, so every text round-trips exactly; small, so a tiny model's embedding stays small.
    """
    from tokenizers.trainers import BpeTrainer

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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return Path(out)
