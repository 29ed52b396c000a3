"""Throughput of ``rar-llm import-jsonl`` on a synthetic file of RAR's shape, against the old json loop.

RAR's released ``maskgitvq.jsonl`` has 12.8M lines ``{"class_id": int, "tokens": [256 ints < 1024]}``
as Python's ``json.dump`` writes them. This writes ``lines`` such lines, then times, round after round:

- ``old``: the frozen baseline, the import's first loop: ``json.loads`` and per-line checks of every
  line, a progress-bar update per line, the samples handed to (today's) shard writer in chunks;
- ``new``: ``rar_llm.data.jsonl.import_jsonl`` in this same process;
- ``cli``: the whole command, ``rar-llm import-jsonl --jsonl FILE --out_dir DIR``, in a subprocess
  (start-up included), as a user runs it.

It prints the medians of lines per second of wall time, and of CPU time (steadier on a machine shared
with other jobs), with their ratios to ``old``; and checks that all three wrote the same shards.

    python bench/import_jsonl.py                          # 40,000 lines (about 52 MB), five rounds
    python bench/import_jsonl.py --lines 200000 --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would only add noise

import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from jsonargparse import CLI
from tqdm import tqdm

from rar_llm.data.jsonl import import_jsonl
from rar_llm.data.shards import ShardWriter


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
    """The per-line parser import-jsonl had first (rar_llm/prepare.py ``_parse_line``)."""
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
    """The old import's loop (json + per-line checks); returns the lines read."""
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


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(src: Path, out: Path) -> None:
    """``rar-llm import-jsonl`` as a user runs it (its progress bar on, sent nowhere)."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    cli = [shutil.which("rar-llm")] if shutil.which("rar-llm") else [sys.executable, "-m", "rar_llm"]
    subprocess.run([*cli, "import-jsonl", "--jsonl", str(src), "--out_dir", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def quiet(function, *args):
    """``function(*args)`` without its printed summary (the CLI's goes nowhere too)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def main(lines: int = 40_000, repeats: int = 5, keep: Path | None = None) -> None:
    """
    Args:
        lines: lines of the synthetic file (RAR's has 12.8M).
        repeats: rounds of (old, new, cli); medians are printed.
        keep: write the synthetic file here and keep it (default: a temporary folder).
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(keep) if keep else tmp / "rar.jsonl"
        if not src.is_file():
            write_rar_like(src, lines)
        n = sum(1 for _ in open(src, "rb"))
        print(f"{src}: {n} lines, {src.stat().st_size / 1e6:.0f} MB, {os.cpu_count()} CPU cores")
        runs = {  # name: (label, run)
            "old": ("old (json.loads + per-line checks)", lambda out: old_import(src, out)),
            "new": ("import_jsonl, in this process", lambda out: quiet(import_jsonl, src, out)),
            "cli": ("rar-llm import-jsonl, whole command", lambda out: run_cli(src, out)),
        }
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(repeats):
            for name, (_, run) in runs.items():
                out = tmp / f"{name}-{r}"
                t, c, k = time.perf_counter(), time.process_time(), children_cpu()
                run(out)
                wall[name].append(n / (time.perf_counter() - t))
                cpu[name].append(n / (time.process_time() - c + children_cpu() - k))
                if r:
                    shutil.rmtree(out)  # round 0's are compared below
        med = {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in runs}
        for name, (label, _) in runs.items():
            print(f"{label + ':':38s} {med[name][0]:9,.0f} lines/s wall (x{med[name][0] / med['old'][0]:.2f}), "
                  f"{med[name][1]:9,.0f} per CPU second (x{med[name][1] / med['old'][1]:.2f}); "
                  f"wall runs: {', '.join(f'{x:,.0f}' for x in wall[name])}")
        old, new, cli = (shard_files(tmp / f"{name}-0") for name in runs)
        assert old and old == new == cli, "the shards differ"
        print(f"medians of {repeats} rounds; all three wrote the same shard files ({len(old)}); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    CLI(main, as_positional=False)
