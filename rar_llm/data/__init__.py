"""Training data: shards of code grids, the litgpt data modules that read them, and one module per source.

``shards`` (the on-disk format, atomic and resumable writing), ``rar`` (``RARData``: permuted, interleaved
sequences for ``litgpt finetune_full``), ``mixed`` (``MixedData``: image sequences among text), and the
sources that write shards: ``digits`` (scikit-learn's 8x8 digits), ``images`` (image folders through an
image tokenizer), ``jsonl`` (pre-tokenized JSONL such as RAR's ``maskgitvq.jsonl``), ``fashion``
(Fashion-MNIST's IDX files), ``corpora`` (text for mixed training). Imports the core (``vocab``,
``permute``, ``configs``), ``text`` and ``tokenizers``; nothing above. ``RARData`` and ``MixedData`` are
imported on first use, so ``rar_llm.data.shards`` needs no litgpt; recipes name ``rar_llm.data.RARData``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {"RARData": "rar_llm.data.rar", "ClockedData": "rar_llm.data.rar", "MixedData": "rar_llm.data.mixed",
         "Shards": "rar_llm.data.shards", "ShardWriter": "rar_llm.data.shards", "read_meta": "rar_llm.data.shards"}

if TYPE_CHECKING:
    from rar_llm.data.mixed import MixedData
    from rar_llm.data.rar import ClockedData, RARData
    from rar_llm.data.shards import Shards, ShardWriter, read_meta


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rar_llm.data' has no attribute {name!r}")


__all__ = ["ClockedData", "MixedData", "RARData", "ShardWriter", "Shards", "read_meta"]
