"""RAR on real images: the digits ablation (bench/ablation_digits.py) on Fashion-MNIST through a learned VQ tokenizer.

Fashion-MNIST's 28x28 images become 7x7 grids of 256 learned codes (``rar-llm train-vq``); every
variant trains the same rar-tiny model with ``RARData``, the same optimizer and step budget; only the
order schedule and reAR's noisy context (``RARData(noise=p)``: input code tokens replaced by random
codes with probability p, labels unchanged) differ. Each run is scored at its best held-out raster
NLL with the CNN's features (``rar-llm train-classifier``), as in the digits ablation.

Held-out: the first 200 test images of each class (2,000 of the 10,000; NLL checks and the Fréchet
reference), so that the checks stay cheap; the test split never trains anything.

    python bench/ablation_fashion.py --seeds 1 --first_seed 0 --threads 1 --out bench/results/ablation_fashion/s0.json
    python bench/ablation_fashion.py --merge '[bench/results/ablation_fashion/s0.json, ...]'

The tokenizer, classifier, encoded data and decoded training images are made once in ``--work_dir``
(reused by later processes, so seeds can run one after another).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from jsonargparse import CLI
from litgpt.model import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_digits  # noqa: E402  (its training loop and table())

from rar_llm.eval.classifier import CNNClassifier, train_classifier  # noqa: E402
from rar_llm.data.rar import RARData  # noqa: E402
from rar_llm.tokenizers.draw import image_grid  # noqa: E402
from rar_llm.eval.evaluate import evaluate  # noqa: E402
from rar_llm.data.fashion import CLASS_NAMES, load_split, to_float  # noqa: E402
from rar_llm.checkpoint import init_weights, model_config  # noqa: E402
from rar_llm.sampling.loop import generate  # noqa: E402
from rar_llm.data.shards import ShardWriter  # noqa: E402
from rar_llm.tokenizers.train_vq import train_vq  # noqa: E402
from rar_llm.tokenizers.vq import VQTokenizer  # noqa: E402
from rar_llm.vocab import VocabLayout  # noqa: E402

NOISE = 0.1
# name: (anneal_start, anneal_end, r_end, noise)
VARIANTS = {
    "raster": (0.0, 0.0, 0.0, 0.0),
    "rar": (0.5, 0.75, 0.0, 0.0),
    "random": (1.0, 1.0, 1.0, 0.0),
    "raster-noise": (0.0, 0.0, 0.0, NOISE),  # reAR's noisy context alone
    "rar-noise": (0.5, 0.75, 0.0, NOISE),  # and combined with RAR
}
SHOWN = ["nll_raster_bits", "nll_random_bits", "fd_features", "fd_pixels", "precision", "recall", "consistency",
         "copies", "nn_distance"]
LOWER_IS_BETTER = {"nll_raster_bits", "nll_random_bits", "fd_features", "fd_pixels", "copies"}
# seed-by-seed pairs: (variant, against)
PAIRS = [("rar", "raster"), ("random", "rar"), ("raster-noise", "raster"), ("rar-noise", "rar"),
         ("rar-noise", "raster")]
HELD_OUT_PER_CLASS = 200


class CachedDecoder:
    """The tokenizer's decoder, with large decodes (the 60,000 training grids) kept on disk by content."""

    def __init__(self, tok: VQTokenizer, cache_dir: Path) -> None:
        self.tok, self.cache_dir = tok, cache_dir
        self.image_size, self.channels = tok.image_size, tok.channels  # what evaluate checks its classifier against

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if len(codes) < 5000:
            return self.tok.decode(codes)
        c = np.ascontiguousarray(codes.numpy().astype(np.int64))
        path = self.cache_dir / f"decoded-{hashlib.sha1(c.tobytes()).hexdigest()[:16]}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        out = self.tok.decode(codes)
        np.save(path, out.numpy())
        return out


def prepare(work_dir: Path, vq_epochs: float, cnn_epochs: float,
            train_per_class: int | None = None) -> tuple[Path, VQTokenizer, CNNClassifier]:
    """The tokenizer, the classifier and the data folder, made once in ``work_dir``.

    ``train_per_class``: the data folder trains on only the first that many training images of each
    class (a fixed subset, ``data-{N}pc``); the tokenizer and the classifier are the full-data ones.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    vq_path, cnn_path = work_dir / "vq256-7x7.safetensors", work_dir / "cnn.safetensors"
    data_dir = work_dir / ("data" if train_per_class is None else f"data-{train_per_class}pc")
    if not vq_path.is_file():
        train_vq(vq_path, epochs=vq_epochs)
    if not cnn_path.is_file():
        train_classifier(cnn_path, tokenizer=vq_path, epochs=cnn_epochs)
    tok, clf = VQTokenizer.load(vq_path), CNNClassifier.load(cnn_path)
    if not (data_dir / "meta.json").is_file():
        images, labels = load_split(None, "train")
        if train_per_class is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:train_per_class] for c in range(10)]))
            images, labels = images[keep], labels[keep]
        test_images, test_labels = load_split(None, "test")
        held = np.concatenate([np.flatnonzero(test_labels == c)[:HELD_OUT_PER_CLASS] for c in range(10)])
        held.sort()
        info = {"source": "fashion-mnist", "tokenizer": str(vq_path),
                "val": f"the first {HELD_OUT_PER_CLASS} test images of each class",
                "train": "all 60,000" if train_per_class is None else f"the first {train_per_class} of each class"}
        tmp = work_dir / f"{data_dir.name}.tmp"
        with ShardWriter(tmp, tok.codebook_size, *tok.grid, 10, class_names=CLASS_NAMES, info=info) as w:
            w.add("train", tok.encode(to_float(images)).numpy(), labels)
            w.add("val", tok.encode(to_float(test_images[held])).numpy(), test_labels[held])
        tmp.rename(data_dir)
    return data_dir, tok, clf


def train(data_dir: Path, variant: str, seed: int, steps: int, batch_size: int, lr: float, eval_every: int,
          layout: VocabLayout, overrides: dict, device: str = "cpu") -> tuple[GPT, int, list[tuple[int, float]]]:
    """Train one variant; the model at its best held-out raster NLL, that step, and the NLL curve."""
    start, end, r_end, noise = VARIANTS[variant]
    data = RARData(data_dir=data_dir, total_samples=steps * batch_size, anneal_start=start, anneal_end=end,
                   r_end=r_end, noise=noise, seed=seed, num_workers=0)
    data.connect(batch_size=batch_size)
    data.setup()
    torch.manual_seed(seed)
    model = GPT(model_config("rar-tiny", layout, **overrides))
    init_weights(model, layout=layout)
    model.max_seq_length = layout.seq_len
    model.to(device)
    best_step, curve = ablation_digits.fit(model, data, data_dir, layout, steps, lr, eval_every,
                                           f"{variant} seed {seed}")
    return model, best_step, curve


def comparisons(rows: dict[str, list[dict]]) -> str:
    """Seed-by-seed: for each pair, each metric's values per seed and in how many seeds the variant wins."""
    lines = ["| variant vs reference | metric | per seed (variant / reference) | variant better in |",
             "|---|---|---|---|"]
    for a, b in PAIRS:
        if a not in rows or b not in rows:
            continue
        ra, rb = ({r["seed"]: r for r in rows[n]} for n in (a, b))
        seeds = sorted(set(ra) & set(rb))
        for k in ("nll_raster_bits", "fd_features", "precision", "recall", "consistency"):
            better = sum((ra[s][k] < rb[s][k]) if k in LOWER_IS_BETTER else (ra[s][k] > rb[s][k]) for s in seeds)
            vals = ", ".join(f"{ra[s][k]:.3f} / {rb[s][k]:.3f}" for s in seeds)
            lines.append(f"| {a} vs {b} | {k} | {vals} | {better} of {len(seeds)} |")
    return "\n".join(lines)


def merged_table(rows: dict[str, list[dict]]) -> str:
    ablation_digits.SHOWN = SHOWN  # its table() prints the module's SHOWN columns; SHOWN[2:] for the real row
    return ablation_digits.table(rows)


def main(seeds: int = 1, first_seed: int = 0, steps: int = 300, batch_size: int = 64, lr: float = 2e-3,
         eval_every: int = 100, per_class: int = 50, guidance: float = 1.5, threads: int = 1,
         variants: list[str] = list(VARIANTS), out: Path = Path("ablation_fashion.json"),
         work_dir: Path = Path("out/ablation_fashion"), grids: Path | None = Path("bench/results/ablation_fashion"),
         vq_epochs: float = 1.5, cnn_epochs: float = 3.0, n_embd: int | None = 96, n_layer: int | None = None,
         train_per_class: int | None = None, device: str = "cpu", merge: list[Path] | None = None) -> dict:
    """Run the variants for seeds first_seed.. (results saved to ``out`` after every run); or ``--merge`` files.

    The model is rar-tiny (4 layers, 4 heads) at width ``n_embd`` (MLP 4x; 96: 0.65M parameters), sized
    so that a run takes about 5 minutes on one idle core. ``per_class`` samples per class are scored.
    ``train_per_class``: train on a fixed subset (the data-limited regime); every scored run's code grids
    are saved under ``grids`` as ``codes-{variant}-s{seed}.npy`` (decode them with the tokenizer there).
    ``device``: where the generator trains and samples (``bench/gpu_check.py --parts fashion`` runs it on CUDA).
    Returns the rows (variant -> one result per seed).
    """
    if merge:
        rows = ablation_digits.merged_rows(merge)
        print(merged_table(rows))
        print()
        print(comparisons(rows))
        return rows
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    torch.set_num_threads(threads)
    data_dir, tok, clf = prepare(work_dir, vq_epochs, cnn_epochs, train_per_class)
    decoder = CachedDecoder(tok, work_dir)
    layout = VocabLayout(tok.codebook_size, *tok.grid, 10)
    overrides = {k: v for k, v in (("n_embd", n_embd), ("n_layer", n_layer)) if v is not None}
    if n_embd is not None:
        overrides["intermediate_size"] = 4 * n_embd
    rows = json.loads(out.read_text())["rows"] if out.is_file() else {}
    for seed in range(first_seed, first_seed + seeds):
        for variant in variants:
            if any(r["seed"] == seed for r in rows.get(variant, [])):
                print(f"seed {seed} {variant}: already in {out}, skipped")
                continue
            t0 = time.perf_counter()
            model, best_step, curve = train(data_dir, variant, seed, steps, batch_size, lr, eval_every, layout,
                                            overrides, device)
            t_train = time.perf_counter() - t0
            classes = torch.arange(10).repeat_interleave(per_class)
            codes = generate(model, classes, layout=layout, guidance=guidance, seed=seed).cpu()
            m = evaluate(codes.numpy(), classes.numpy(), data_dir, model=model, layout=layout, seed=seed,
                         tokenizer=decoder, classifier=clf)
            m |= {"seed": seed, "best_step": best_step, "curve": curve, "train_seconds": round(t_train),
                  "train_per_class": train_per_class,
                  "seconds": round(time.perf_counter() - t0), "steps": steps, "guidance": guidance,
                  "params": sum(p.numel() for p in model.parameters())}
            rows.setdefault(variant, []).append(m)
            print(f"seed {seed} {variant:12s} best step {best_step:4d} "
                  + " ".join(f"{k} {m[k]:.3f}" for k in SHOWN) + f"  ({m['seconds']} s)", flush=True)
            if grids is not None:
                grids.mkdir(parents=True, exist_ok=True)
                np.save(grids / f"codes-{variant}-s{seed}.npy", codes.numpy().astype(np.uint8))
                if not (grids / "vq256-7x7.safetensors").is_file():  # the tokenizer that decodes them
                    shutil.copyfile(work_dir / "vq256-7x7.safetensors", grids / "vq256-7x7.safetensors")
            if grids is not None and seed == 0:
                shown = min(10, per_class)
                pick = torch.cat([torch.arange(c * per_class, c * per_class + shown) for c in range(10)])
                image_grid(tok.decode(codes[pick]), rows=10).save(grids / f"samples-{variant}.png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"rows": rows}, indent=1, default=float) + "\n")
    if grids is not None and not (grids / "real-reconstructed.png").exists():
        test_images, test_labels = load_split(None, "test")
        tiles = []
        for c in range(10):  # a row of test images, then the same images through the tokenizer
            x = to_float(test_images[np.flatnonzero(test_labels == c)[:10]])
            tiles += [x, tok.decode(tok.encode(x))]
        image_grid(torch.cat(tiles), rows=20).save(grids / "real-reconstructed.png")
    print(f"\n{steps} steps of {batch_size}, guidance {guidance}, {per_class} samples per class; "
          "mean ± half the range at each run's best held-out NLL")
    print(merged_table(rows))
    print()
    print(comparisons(rows))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
