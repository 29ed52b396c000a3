"""Throughput of ``rar-llm import-jsonl`` on a synthetic file of RAR's shape, against the old parser.

RAR's released ``maskgitvq.jsonl`` has 12.8M lines ``{"class_id": int, "tokens": [256 ints < 1024]}``
as Python's ``json.dump`` writes them. This writes ``lines`` such lines, then times, in this process:

- ``old``: the import as it was before the fast parser: ``json.loads`` and per-line checks of every
  line, a progress-bar update per line, the samples handed to (today's) shard writer in chunks;
- ``shipped``: ``rar_llm.data.jsonl.import_jsonl`` parsing in its own process (``workers=0``: the speed of
  one core), and as the CLI runs it (worker processes, one per core, for a file this large).

Lines per second of wall time are printed, and for the single-process runs per second of CPU time
(steadier on a machine shared with other jobs); for the CLI run, the CPU per line of the reading
process and of the workers. Rounds alternate the three; medians are reported.

Both write the same shards (checked), so the ratio of lines/s is the speed-up of the import.

    python bench/import_jsonl.py --repeats 5           # 200k lines (about 260 MB), five rounds
    python bench/import_jsonl.py --lines 20000 --old_lines 20000
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would only add noise

import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from jsonargparse import CLI
from tqdm import tqdm

from rar_llm.data.jsonl import auto_workers, import_jsonl
from rar_llm.data.shards import ShardWriter, Shards


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished child processes: import-jsonl's workers."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


def main(lines: int = 200_000, old_lines: int = 50_000, repeats: int = 3, keep: Path | None = None) -> None:
    """
    Args:
        lines: lines of the synthetic file (RAR's has 12.8M).
        old_lines: lines the old parser is timed on (its first ones; it is slow); 0: all.
        repeats: rounds of (old, shipped with workers=0, shipped as the CLI runs it); medians are printed.
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
        runs = {  # name: (label, lines, run)
            "old": ("old (json + per-line checks)", min(n, old_lines or n), lambda out: old_import(old_src, out)),
            "one": ("shipped, workers=0 (one core)", n, lambda out: import_jsonl(src, out, workers=0)),
            "cli": (f"shipped, as the CLI runs it ({auto_workers(src)} workers)", n, lambda out: import_jsonl(src, out)),
        }
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        worker_us: list[float] = []  # CPU microseconds per line in the worker processes (joined children)
        for r in range(repeats):
            for name, (_, m, run) in runs.items():
                out = tmp / f"{name}-{r}"
                t, c, k = time.perf_counter(), time.process_time(), children_cpu()
                run(out)
                wall[name].append(m / (time.perf_counter() - t))
                cpu[name].append(m / (time.process_time() - c))
                if name == "cli":
                    worker_us.append((children_cpu() - k) / m * 1e6)
                if r:
                    shutil.rmtree(out)  # round 0's are compared below
        med = {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in runs}
        for name, (label, m, _) in runs.items():
            per_cpu = f", {med[name][1]:9,.0f} per CPU second (x{med[name][1] / med['old'][1]:.1f})" if name != "cli" else ""
            print(f"{label + ':':44s} {med[name][0]:9,.0f} lines/s wall (x{med[name][0] / med['old'][0]:.1f}){per_cpu}; "
                  f"runs: {', '.join(f'{x:,.0f}' for x in wall[name])} ({m} lines)")

        print(f"CPU per line as the CLI runs it: {1e6 / med['cli'][1]:.2f} us in the reading process, "
              f"{float(np.median(worker_us)):.2f} us in the workers (medians)")
        a, b, c = (Shards(tmp / f"{name}-0", "train") for name in runs)
        k = min(len(a), 1000)
        assert all(np.array_equal(a[i][0], x[i][0]) and a[i][1] == x[i][1] for x in (b, c) for i in range(k)), "shards differ"
        print(f"medians of {repeats} rounds; the first {k} samples of all three are identical; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    CLI(main, as_positional=False)
