"""Throughput of ``rar-llm import-jsonl`` on a synthetic file of RAR's shape, against the old parser.

RAR's released ``maskgitvq.jsonl`` has 12.8M lines ``{"class_id": int, "tokens": [256 ints < 1024]}``
as Python's ``json.dump`` writes them. This writes ``lines`` such lines, then times, in this process:

- ``old``: the import as it was before the fast parser: ``json.loads`` and per-line checks of every
  line, a progress-bar update per line, the samples handed to the shard writer in chunks;
- ``shipped``: ``rar_llm.jsonl.import_jsonl`` as the CLI runs it (parsing in its own thread), and
  with ``workers`` parsing threads.

Lines per second of wall time and per second of this process's CPU time are printed: on a machine
shared with other jobs the CPU figure is the steadier one.

Both write the same shards (checked), so the ratio of lines/s is the speed-up of the import.

    python bench/import_jsonl.py                       # 200k lines (about 260 MB)
    python bench/import_jsonl.py --lines 20000 --old_lines 20000
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would only add noise

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from jsonargparse import CLI
from tqdm import tqdm

from rar_llm.jsonl import import_jsonl
from rar_llm.shards import ShardWriter, Shards


def write_rar_like(path: Path, lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, lines, 10000):
            n = min(10000, lines - start)
            labels, tokens = rng.integers(0, 1000, n), rng.integers(0, 1024, (n, 256))
            f.writelines(
                json.dumps({"class_id": int(c), "tokens": t}) + "\n" for c, t in zip(labels, tokens.tolist())
            )


def _old_parse_line(line: bytes, num_tokens: int, codebook_size: int, num_classes: int):
    """The per-line parser import-jsonl had before (rar_llm/prepare.py ``_parse_line``)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(obj, dict) or "class_id" not in obj or "tokens" not in obj:
        raise ValueError('expected an object {"class_id": int, "tokens": [ints]}')
    label, tokens = obj["class_id"], obj["tokens"]
    if type(label) is not int or not 0 <= label < num_classes:
        raise ValueError(f"class_id {label!r} is not an integer in 0..{num_classes - 1}")
    try:
        codes = np.array(tokens) if isinstance(tokens, list) else None
    except (ValueError, OverflowError):
        codes = None
    if codes is None or codes.shape != (num_tokens,) or codes.dtype.kind not in "iu":
        raise ValueError(f"tokens is not a list of {num_tokens} integers")
    if codes.min() < 0 or codes.max() >= codebook_size:
        bad = codes[(codes < 0) | (codes >= codebook_size)][0]
        raise ValueError(f"token {bad} is outside the codebook 0..{codebook_size - 1}")
    return label, codes


def old_import(jsonl: Path, out_dir: Path, val_every: int = 1280, grid: int = 16, chunk: int = 4096) -> int:
    """The old import's loop (json + per-line checks), limited to the lines it is timed on; returns them."""
    pending = {"train": ([], [], []), "val": ([], [], [])}
    with ShardWriter(out_dir, 1024, grid, grid, 1000) as w, open(jsonl, "rb") as f, tqdm(
        total=jsonl.stat().st_size, unit="B", unit_scale=True, desc="old", dynamic_ncols=True, disable=True
    ) as bar:

        def hand_over(split: str) -> None:
            codes, labels, positions = pending[split]
            if codes:
                w.add(split, np.stack(codes).reshape(-1, grid, grid), np.array(labels), np.array(positions))
                pending[split] = ([], [], [])

        for index, line in enumerate(f):
            bar.update(len(line))
            split = "val" if (index + 1) % val_every == 0 else "train"
            label, codes = _old_parse_line(line, grid * grid, 1024, 1000)
            c, lab, pos = pending[split]
            c.append(codes), lab.append(label), pos.append(index)
            if len(c) >= chunk:
                hand_over(split)
        hand_over("train"), hand_over("val")
    return index + 1


def main(lines: int = 200_000, old_lines: int = 50_000, workers: int = 2, keep: Path | None = None) -> None:
    """
    Args:
        lines: lines of the synthetic file (RAR's has 12.8M).
        old_lines: lines the old parser is timed on (its first ones; it is slow); 0: all.
        workers: import-jsonl's parsing threads in the second run (the first parses in its own thread).
        keep: write the synthetic file here and keep it (default: a temporary folder).
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(keep) if keep else tmp / "rar.jsonl"
        if not src.is_file():
            write_rar_like(src, lines)
        n = sum(1 for _ in open(src, "rb"))
        print(f"{src}: {n} lines, {src.stat().st_size / 1e6:.0f} MB, {os.cpu_count()} CPU cores")

        old_src = src
        if old_lines and old_lines < n:
            old_src = tmp / "head.jsonl"
            with open(src, "rb") as f, open(old_src, "wb") as g:
                g.writelines(line for _, line in zip(range(old_lines), f))
        t, c = time.perf_counter(), time.process_time()
        m = old_import(old_src, tmp / "old")
        old, old_cpu = m / (time.perf_counter() - t), m / (time.process_time() - c)
        print(f"{'old (json + per-line checks):':38s} {old:9,.0f} lines/s wall, {old_cpu:9,.0f} per CPU second ({m} lines)")

        results = {}
        for name, w in (("shipped", 0), (f"shipped, workers={workers}", workers)):
            t, c = time.perf_counter(), time.process_time()
            import_jsonl(src, tmp / name, workers=w)
            results[name] = wall, cpu = n / (time.perf_counter() - t), n / (time.process_time() - c)
            print(f"{name + ':':38s} {wall:9,.0f} lines/s wall, {cpu:9,.0f} per CPU second ({n} lines): "
                  f"x{wall / old:.1f} wall, x{cpu / old_cpu:.1f} CPU")

        a, b = Shards(tmp / "old", "train"), Shards(tmp / "shipped", "train")
        k = min(len(a), 1000)
        assert all(np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(k)), "different shards"
        print(f"ratio shipped / old: x{results['shipped'][0] / old:.1f} in lines/s (first {k} samples identical); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    CLI(main, as_positional=False)
