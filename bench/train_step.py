"""Images/s and peak memory of one RAR training step (forward + backward) on the CPU.

RAR's position tokens double the sequence (513 tokens for 16x16 codes); the in-process baseline
is the same model on the plain 257-token raster sequence. Each variant runs ``repeats`` timed steps
after one warm-up step; the median is reported.

    python bench/train_step.py                       # RAR-B, micro-batch 8, 2 threads
    python bench/train_step.py --model rar-tiny --repeats 5
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
from jsonargparse import CLI
from litgpt.model import GPT
from litgpt.utils import chunked_cross_entropy

from rar_llm.checkpoint import init_weights, model_config
from rar_llm.permute import IGNORE_INDEX, Permutation
from rar_llm.vocab import VocabLayout


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what earlier variants freed
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *_):
        self.running = False
        self.thread.join()
        self.delta = self.peak - self.base


def batch(layout: VocabLayout, size: int, rar: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    perm = Permutation(class_dropout=0.1)
    ids, labels = [], []
    for i in range(size):
        codes = rng.integers(0, layout.codebook_size, layout.num_positions)
        if rar:
            x, y = perm(layout, int(rng.integers(layout.num_classes)), codes, progress=0.0, draw=i)
        else:  # plain raster AR: [class, code_0, ..., code_255]
            x = np.concatenate([[layout.class_token(0)], layout.code_offset + codes])
            y = x.copy()
            y[0] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    return torch.tensor(np.stack(ids)), torch.tensor(np.stack(labels))


def step(model: GPT, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        logits = model(x)
        loss = chunked_cross_entropy(logits[..., :-1, :], y[..., 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def main(model: str = "rar-b", micro_batch: int = 8, repeats: int = 2, threads: int = 2) -> None:
    """Print images/s and peak memory of each variant and the ratios to the 257-token baseline."""
    torch.set_num_threads(threads)
    layout = VocabLayout.load("maskgit_imagenet")
    torch.manual_seed(0)
    gpt = GPT(model_config(model, layout))
    init_weights(gpt)
    gpt.max_seq_length = layout.seq_len
    print(f"{model}: {sum(p.numel() for p in gpt.parameters()) / 1e6:.0f}M parameters, micro-batch {micro_batch}, "
          f"{threads} threads, torch {torch.__version__}")
    variants = [("raster 257 fp32 (baseline)", False, False), ("RAR 513 fp32", True, False),
                ("RAR 513 bf16-mixed", True, True)]
    results = {}
    for name, rar, bf16 in variants:
        x, y = batch(layout, micro_batch, rar)
        with PeakRSS() as mem:
            loss = step(gpt, x, y, bf16)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(gpt, x, y, bf16)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        results[name] = micro_batch / t
        print(f"{name:28s} {t:7.2f} s/step  {micro_batch / t:6.3f} img/s  peak +{mem.delta / 2**30:5.2f} GiB"
              f"  loss {loss:.4f}")
    base = results[variants[0][0]]
    for name in results:
        print(f"ratio {name:28s} {results[name] / base:5.2f}x of the baseline's img/s")


if __name__ == "__main__":
    CLI(main, as_positional=False)
