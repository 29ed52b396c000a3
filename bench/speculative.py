"""What speculative decoding buys: forwards and wall time per image against ``speculative=0``, same process.

On one trained checkpoint (default: the demo's), for each batch size and each ``k`` it samples with
guidance, alternating the variants over ``repeats`` rounds, and prints the median seconds per image,
the forwards per image, the ratios to ``speculative=0`` and the acceptance by lookahead. With
``--score true`` it also samples every class with several seeds, sequential and speculative, and
scores both with ``rar_llm.eval.evaluate`` (feature Fréchet, class consistency) side by side; for codes
of a learned tokenizer give ``--tokenizer`` (its weights) and ``--classifier`` (``rar-llm train-classifier``).

    rar-llm demo --out_dir out/demo
    python bench/speculative.py --checkpoint_dir out/demo/train/final --data_dir out/demo/data
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def timings(model, ks: list[int], batches: list[int], guidance: float, repeats: int) -> None:
    import torch

    import rar_llm
    from rar_llm.sampling.speculative import SpeculativeStats

    classes = torch.arange(model.layout.num_classes)
    for batch in batches:
        labels = classes.repeat(-(-batch // len(classes)))[:batch]
        seconds = {k: [] for k in [0, *ks]}
        stats = {k: SpeculativeStats() for k in seconds}
        rar_llm.generate(model, labels, guidance=guidance, seed=0)  # warm-up
        for r in range(repeats):
            for k in seconds:
                start = time.perf_counter()
                rar_llm.generate(model, labels, guidance=guidance, seed=r, speculative=k, stats=stats[k])
                seconds[k].append((time.perf_counter() - start) / batch)
        base = statistics.median(seconds[0])
        base_fw = stats[0].forwards / repeats
        print(f"\nbatch {batch} (guidance {guidance}, {repeats} repeats, medians)")
        print("    k | s / image | forwards / image batch | cells / forward | wall vs k=0 | forwards vs k=0")
        for k, times in seconds.items():
            fw = stats[k].forwards / repeats
            print(f"  {k:>3} | {statistics.median(times):9.4f} | {fw:22.1f} | {stats[k].cells / stats[k].forwards / batch:15.2f} "
                  f"| {base / statistics.median(times):10.2f}x | {base_fw / fw:14.2f}x")
        for k in ks:
            acc = stats[k].acceptance()
            print(f"  acceptance k={k}: " + "  ".join(f"j={j}: {a:.2f}" for j, a in acc.items()))


def scores(model, data_dir: Path, k: int, seeds: list[int], samples_per_class: int, guidance: float,
           tokenizer: str | None, classifier: Path | None) -> None:
    import torch

    import rar_llm
    from rar_llm.eval.classifier import CNNClassifier
    from rar_llm.eval.evaluate import evaluate

    decoder = rar_llm.load_tokenizer(tokenizer) if tokenizer else None
    net = CNNClassifier.load(classifier) if classifier else None

    classes = torch.arange(model.layout.num_classes).repeat_interleave(samples_per_class)
    rows: dict[int, list[dict]] = {0: [], k: []}
    for seed in seeds:
        for variant in rows:
            codes = rar_llm.generate(model, classes, guidance=guidance, seed=seed, speculative=variant)
            m = evaluate(codes.numpy(), classes.numpy(), data_dir, seed=0, tokenizer=decoder, classifier=net)
            rows[variant].append(m)
            print(f"speculative={variant} seed {seed}: fd_features {m['fd_features']:.3f}  "
                  f"consistency {m['consistency']:.4f}  (real floor {m['real']['fd_features']:.3f})", flush=True)

    def summary(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"

    print(f"\n{len(classes)} samples per seed, guidance {guidance}, seeds {seeds} (mean ± half range)")
    for key in ("fd_features", "consistency"):
        a, b = [m[key] for m in rows[0]], [m[key] for m in rows[k]]
        print(f"{key:>12}: speculative=0 {summary(a)}   speculative={k} {summary(b)}   "
              f"paired difference {summary([y - x for x, y in zip(a, b)])}")


def main(
    checkpoint_dir: Path = Path("out/demo/train/final"),
    data_dir: Path = Path("out/demo/data"),
    ks: list[int] = [2, 4, 8],  # noqa: B006  (jsonargparse reads the default)
    batches: list[int] = [1, 4, 16],  # noqa: B006
    guidance: float = 2.0,
    repeats: int = 3,
    threads: int = 1,
    score: bool = False,
    score_k: int = 4,
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    samples_per_class: int = 36,
    tokenizer: str | None = None,
    classifier: Path | None = None,
) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    import rar_llm

    torch.set_num_threads(threads)
    model = rar_llm.load_model(checkpoint_dir)
    print(f"{checkpoint_dir}: {model.layout.num_positions} cells, dtype {model.lm_head.weight.dtype}, "
          f"{threads} thread(s)")
    timings(model, ks, batches, guidance, repeats)
    if score:
        scores(model, data_dir, score_k, seeds, samples_per_class, guidance, tokenizer, classifier)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
