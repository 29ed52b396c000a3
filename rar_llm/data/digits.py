"""scikit-learn's bundled 8x8 digits as shards: the default data, small enough to train on in minutes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rar_llm.data.shards import ShardWriter

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(out_dir: Path = Path("data/digits"), val_fraction: float = 0.2, seed: int = 0) -> Path:
    """scikit-learn's bundled 8x8 digits as shards: each of the 17 grey levels (0..16) is a code.

    The codes are those of ``load_tokenizer("digits")``: code k is grey k/16.

    Args:
        out_dir: the data folder to write (refused if it already holds data).
        val_fraction: share of images held out as the ``val`` split (stratified by class).
        seed: the split's shuffle.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data ships with scikit-learn: pip install 'rar-llm[digits]'") from e
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    d = load_digits()
    codes = d.images.astype(np.int64).reshape(-1, 8, 8)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val[idx[: round(val_fraction * len(idx))]] = True
    info = {"source": "sklearn digits", "tokenizer": "digits"}
    with ShardWriter(Path(out_dir), 17, 8, 8, 10, class_names=DIGIT_NAMES, info=info, resumable=False) as w:
        w.add("train", codes[~val], labels[~val])
        w.add("val", codes[val], labels[val])
    print(f"Wrote {int((~val).sum())} train and {int(val.sum())} val digits to {out_dir}")
    return Path(out_dir)
