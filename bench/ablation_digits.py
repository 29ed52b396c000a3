"""RAR's claim on the digits: annealed random order vs raster-only vs random-only, same model and budget.

Every variant trains the same rar-tiny model with the same data module (``RARData``), optimizer and
step budget; only the permutation schedule differs. Each run keeps its best held-out raster NLL
(early stopping, checked every ``eval_every`` steps) and is scored there, with the memorisation
figures beside the distances. The RAR model is also decoded in parallel at fewer steps.

    python bench/ablation_digits.py                       # 3 seeds x 3 variants (about 35 min on 2 idle cores)
    for s in 0 1 2; do python bench/ablation_digits.py --seeds 1 --first_seed $s --threads 1 --out s$s.json & done; wait
    python bench/ablation_digits.py --merge '[s0.json, s1.json, s2.json]'
    python bench/ablation_digits.py --seeds 1 --steps 100 # a quick look
    python bench/ablation_digits.py --variants '[rar-sincos, rar-rend0.2, rar-early]'   # the levers
    python bench/ablation_digits.py --variants '[rar-rope0.25, rar-shift, rar-192, raster-192]'
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from jsonargparse import CLI
from litgpt.model import GPT
from litgpt.utils import chunked_cross_entropy

from rar_llm.data.rar import RARData
from rar_llm.eval.evaluate import evaluate, heldout_nll
from rar_llm.sampling.loop import generate
from rar_llm.checkpoint import init_weights, model_config
from rar_llm.data.digits import digits
from rar_llm.data.shards import Shards, ShardWriter, read_meta
from rar_llm.vocab import VocabLayout

# name: (anneal_start, anneal_end, r_end, position-token init, model config overrides, shift augmentation)
VARIANTS = {
    "raster": (0.0, 0.0, 0.0, "normal", {}, False),
    "rar": (0.5, 0.75, 0.0, "normal", {}, False),
    "random": (1.0, 1.0, 1.0, "normal", {}, False),
    # levers that could help RAR at small scale
    "rar-sincos": (0.5, 0.75, 0.0, "sincos", {}, False),
    "rar-rend0.2": (0.5, 0.75, 0.2, "normal", {}, False),
    "rar-early": (0.25, 0.5, 0.0, "normal", {}, False),
    "rar-rope0.25": (0.5, 0.75, 0.0, "normal", {"rotary_percentage": 0.25}, False),  # 3/4 of each head unrotated
    "rar-192": (0.5, 0.75, 0.0, "normal", {"n_embd": 192, "intermediate_size": 768}, False),  # 2.2x parameters
    "rar-shift": (0.5, 0.75, 0.0, "normal", {}, True),  # training images plus their four 1-pixel shifts
    "raster-192": (0.0, 0.0, 0.0, "normal", {"n_embd": 192, "intermediate_size": 768}, False),
}
SHOWN = ["nll_raster_bits", "nll_random_bits", "fd_features", "fd_pixels", "consistency", "copies",
         "nn_distance"]


def shifted(data_dir: Path, out_dir: Path) -> Path:
    """A copy of the digits folder whose train split adds each image moved by one pixel up, down, left
    and right (background fills the gap); the held-out split is unchanged."""
    meta = read_meta(data_dir)
    train, val = Shards(data_dir, "train"), Shards(data_dir, "val")
    codes = np.stack([train[i][0] for i in range(len(train))])
    shifts = [codes]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(codes, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1
        moved[tuple(edge)] = 0
        shifts.append(moved)
    with ShardWriter(out_dir, meta["codebook_size"], meta["height"], meta["width"], meta["num_classes"],
                     class_names=meta.get("class_names"), info=meta["info"]) as w:
        w.add("train", np.concatenate(shifts), np.tile(train.labels, len(shifts)))
        w.add("val", np.stack([val[i][0] for i in range(len(val))]), val.labels)
    return out_dir


def train(data_dir: Path, variant: str, seed: int, steps: int, batch_size: int, lr: float, eval_every: int,
          layout: VocabLayout, shifted_dir: Path | None = None) -> tuple[GPT, int, list[tuple[int, float]]]:
    """Train one variant; returns the model at its best held-out raster NLL, that step, and the NLL curve.
    Shift variants train on ``shifted_dir`` (made by ``shifted``); every variant is scored on ``data_dir``."""
    start, end, r_end, pos_init, overrides, shift = VARIANTS[variant]
    train_dir = shifted_dir if shift else data_dir
    data = RARData(data_dir=train_dir, total_samples=steps * batch_size, anneal_start=start, anneal_end=end,
                   r_end=r_end, seed=seed, num_workers=0)
    data.connect(batch_size=batch_size)
    data.setup()
    torch.manual_seed(seed)
    model = GPT(model_config("rar-tiny", layout, **overrides))
    init_weights(model, layout=layout, pos_init=pos_init)
    model.max_seq_length = layout.seq_len
    best_step, curve = fit(model, data, data_dir, layout, steps, lr, eval_every, f"{variant} seed {seed}")
    return model, best_step, curve


def fit(model: GPT, data: RARData, data_dir: Path, layout: VocabLayout, steps: int, lr: float, eval_every: int,
        label: str) -> tuple[int, list[tuple[int, float]]]:
    """AdamW (warm-up + cosine, clip 1.0) for ``steps`` on ``data``'s loader; held-out raster NLL on ``data_dir``
    every ``eval_every`` steps. Leaves the model at its best NLL; returns that step and the NLL curve."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.96), weight_decay=0.03)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    loader = data.train_dataloader()
    best = (float("inf"), 0, None)
    curve = []
    step = 0
    while step < steps:
        for batch in loader:
            dev = model.lm_head.weight.device
            logits = model(batch["input_ids"].to(dev))
            loss = chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                nll = heldout_nll(model, data_dir, layout, order="raster")
                curve.append((step, nll))
                print(f"  {label} step {step}: held-out raster NLL {nll:.3f} bits", flush=True)
                if nll < best[0]:
                    best = (nll, step, copy.deepcopy(model.state_dict()))
            if step == steps:
                break
    model.load_state_dict(best[2])
    return best[1], curve


def score(model: GPT, data_dir: Path, layout: VocabLayout, per_class: int, guidance: float, seed: int,
          steps: int | None = None) -> dict:
    classes = torch.arange(layout.num_classes).repeat_interleave(per_class)
    codes = generate(model, classes, layout=layout, guidance=guidance, steps=steps, seed=seed)
    return evaluate(codes.numpy(), classes.numpy(), data_dir, model=model, layout=layout, seed=seed)


def merged_rows(files: list[Path]) -> dict[str, list[dict]]:
    """The rows of result files saved by several processes (one per seed), runs of a variant joined."""
    rows: dict[str, list[dict]] = {}
    for f in files:
        for name, runs in json.loads(Path(f).read_text())["rows"].items():
            rows.setdefault(name, []).extend(runs)
    return rows


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown table of mean ± spread (half the range) per variant. Each seed trains its own feature
    classifier, so the real-vs-real floor is one figure per seed, summarised the same way."""
    header = ["variant", "seeds", "best step"] + SHOWN
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(runs: list[dict], keys: list[str]) -> list[str]:
        vals = [[r[k] for r in runs] for k in keys]
        return [f"{statistics.mean(v):.3f} ± {(max(v) - min(v)) / 2:.3f}" for v in vals]

    for name, runs in rows.items():
        best = f"{statistics.mean(r['best_step'] for r in runs):.0f}"
        lines.append("| " + " | ".join([name, str(len(runs)), best] + cells(runs, SHOWN)) + " |")
    reals = list({json.dumps(r["real"], sort_keys=True): r["real"] for runs in rows.values() for r in runs}.values())
    lines.append(f"| real held-out images | {len(reals)} | | | | " + " | ".join(cells(reals, SHOWN[2:])) + " |")
    return "\n".join(lines)


def main(seeds: int = 3, first_seed: int = 0, steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
         eval_every: int = 50, per_class: int = 36, guidance: float = 1.5, threads: int = 2,
         out: Path = Path("ablation.json"), variants: list[str] = ["raster", "rar", "random"],
         merge: list[Path] | None = None) -> None:
    """Run the variants (names in VARIANTS) for seeds first_seed.. and print a table of means and spreads.

    ``--merge '[a.json, b.json]'`` prints one table over runs saved by several processes (one per seed).
    """
    if merge:
        print(table(merged_rows(merge)))
        return
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    torch.set_num_threads(threads)
    layout = VocabLayout.load("digits")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = digits(Path(tmp) / "digits", seed=0)  # one split for all seeds
        shifted_dir = shifted(data_dir, Path(tmp) / "digits-shifted") if any(VARIANTS[v][5] for v in variants) else None
        for seed in range(first_seed, first_seed + seeds):
            for variant in variants:
                t0 = time.perf_counter()
                model, best_step, curve = train(data_dir, variant, seed, steps, batch_size, lr, eval_every, layout,
                                               shifted_dir)
                m = score(model, data_dir, layout, per_class, guidance, seed)
                m["best_step"], m["curve"] = best_step, curve
                rows.setdefault(variant, []).append(m)
                print(f"seed {seed} {variant:7s} best step {best_step:4d} "
                      + " ".join(f"{k} {m[k]:.3f}" for k in SHOWN) + f"  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                if variant == "rar":
                    for k in (32, 16, 8):
                        p = score(model, data_dir, layout, per_class, guidance, seed, steps=k)
                        p["best_step"] = best_step
                        rows.setdefault(f"rar, {k} parallel steps", []).append(p)
                out.write_text(json.dumps({"rows": rows}, indent=1, default=float) + "\n")  # each run keeps its "real"
    print(f"\n{seeds} seeds x {steps} steps of {batch_size}, guidance {guidance}, {per_class} samples per class; "
          "mean ± spread (half the range) at each run's best held-out NLL")
    print(table(rows))
    print(f"wrote {out} (after every run)")


if __name__ == "__main__":
    CLI(main, as_positional=False)
