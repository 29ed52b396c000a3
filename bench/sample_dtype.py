"""Does bfloat16 sampling (the default on CPUs that run it natively) cost sample quality? fp32 vs bf16.

On one trained checkpoint (default: the demo's), samples every class with each dtype and several
sampling seeds, scores them with ``rar_llm.eval.evaluate.evaluate`` (one classifier, seed 0, for all) and
prints feature Fréchet and class consistency per seed, their mean ± half range, and the bf16 - fp32
difference beside the seed-to-seed spread of fp32 itself.

    rar-llm demo --out_dir out/demo
    python bench/sample_dtype.py --checkpoint_dir out/demo/train/final --data_dir out/demo/data
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def main(
    checkpoint_dir: Path = Path("out/demo/train/final"),
    data_dir: Path = Path("out/demo/data"),
    seeds: list[int] = [0, 1, 2],  # noqa: B006  (jsonargparse reads the default)
    samples_per_class: int = 36,
    guidance: float = 2.0,
    threads: int = 1,
) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    import rar_llm
    from rar_llm.eval.evaluate import evaluate

    torch.set_num_threads(threads)
    rows: dict[str, list[dict]] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = rar_llm.load_model(checkpoint_dir, dtype=dtype)
        classes = torch.arange(model.layout.num_classes).repeat_interleave(samples_per_class)
        for seed in seeds:
            start = time.perf_counter()
            codes = rar_llm.generate(model, classes, guidance=guidance, seed=seed)
            seconds = time.perf_counter() - start
            m = evaluate(codes.numpy(), classes.numpy(), data_dir, seed=0)
            rows.setdefault(name, []).append({"seed": seed, "fd_features": m["fd_features"],
                                              "consistency": m["consistency"], "seconds": seconds})
            print(f"{name:>9} seed {seed}: fd_features {m['fd_features']:.3f}  consistency {m['consistency']:.4f}  "
                  f"(sampling {seconds:.1f} s; real floor {m['real']['fd_features']:.3f})", flush=True)

    def summary(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"

    print(f"\n{len(classes)} samples per seed, guidance {guidance}, seeds {seeds}")
    for key in ("fd_features", "consistency", "seconds"):
        a = [r[key] for r in rows["float32"]]
        b = [r[key] for r in rows["bfloat16"]]
        print(f"{key:>12}: float32 {summary(a)}   bfloat16 {summary(b)}   "
              f"paired difference bf16 - fp32 {summary([y - x for x, y in zip(a, b)])}")
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
