"""``rar-llm demo``: the whole pipeline on scikit-learn's bundled digits, on a laptop CPU, in minutes.

digits -> shards (train / held-out) -> ``rar-llm init`` -> ``litgpt finetune_full`` with RAR's
annealed order -> ``rar_llm.generate`` for every class with guidance -> PNG grid + metrics.
Everything lands in one output folder, which is never overwritten unless asked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rar_llm.checkpoint import load_model
from rar_llm.tokenizers.draw import image_grid, to_pixels
from rar_llm.eval.evaluate import evaluate, format_metrics
from rar_llm.checkpoint import init
from rar_llm.outputs import claim_outputs
from rar_llm.data.digits import digits
from rar_llm.watch import plot_training
from rar_llm.sampling.loop import generate

OUTPUTS = ("data", "init", "train", "recipe.yaml", "train.log", "training.png", "samples.png", "codes.npy", "labels.npy",
           "metrics.json")
SHOWN_EVERY = 25  # the console shows every 25th step of litgpt's log (train.log keeps all)


def recipe(out_dir: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """The ``litgpt finetune_full`` config the demo runs (written to ``out_dir/recipe.yaml``)."""
    return {
        "checkpoint_dir": str(out_dir / "init"),
        "out_dir": str(out_dir / "train"),
        "precision": "32-true",
        "devices": 1,
        "data": {
            "class_path": "rar_llm.data.RARData",
            "init_args": {
                "data_dir": str(out_dir / "data"),
                "total_samples": steps * batch_size,
                "anneal_start": 0.5,
                "anneal_end": 0.75,
                "class_dropout": 0.1,
                "seed": seed,
                "num_workers": 0,
            },
        },
        "train": {
            "global_batch_size": batch_size,
            "micro_batch_size": batch_size,
            "lr_warmup_steps": max(1, steps // 10),
            "max_steps": steps,
            "epochs": 10_000,
            "save_interval": None,
            "log_interval": 1,  # litgpt writes its CSV log (the curves of training.png) only at 1
        },
        "eval": {"interval": max(1, steps // 4), "max_new_tokens": 4, "max_iters": 100, "final_validation": True},
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": lr, "betas": [0.9, 0.96], "weight_decay": 0.03},
        },
        "logger_name": "csv",
        "seed": seed,
    }


def run_logged(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, all its output into ``log``; the console gets every ``SHOWN_EVERY``-th step line."""
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               bufsize=1) as proc:
        for line in proc.stdout:
            f.write(line)
            step = re.match(r"Epoch \d+ \| iter (\d+) ", line)
            if step is None or int(step[1]) % SHOWN_EVERY == 0:
                print(line, end="", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def demo(
    out_dir: Path = Path("out/demo"),
    model: str = "rar-tiny",
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    samples_per_class: int = 36,
    guidance: float = 2.0,
    temperature: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Train a RAR digit generator from scratch and show what it makes.

    Args:
        out_dir: folder for everything the demo writes (data, checkpoints, samples.png, metrics.json).
        model: the config to train (``rar-tiny``: 4 layers, 128 wide).
        steps, batch_size, lr: the training run (litgpt finetune_full; annealing 50 % -> 75 %).
        samples_per_class: generated images per digit class (the grid has one row per class).
        guidance, temperature: sampling settings (constant classifier-free guidance).
        seed: seeds the split, the init, training and sampling.
        overwrite: replace what an earlier demo wrote in ``out_dir`` (other files there stay).
    """
    out_dir = Path(out_dir)
    claim_outputs(out_dir, OUTPUTS, overwrite)
    t0 = time.perf_counter()

    print("== 1/4 data: scikit-learn digits -> shards", flush=True)
    digits(out_dir / "data", seed=seed)
    print("== 2/4 model: rar-llm init", flush=True)
    init(out_dir / "init", model=model, layout="digits", seed=seed)

    print(f"== 3/4 training: litgpt finetune_full, {steps} steps of {batch_size}", flush=True)
    config = out_dir / "recipe.yaml"
    run = recipe(out_dir, steps, batch_size, lr, seed)
    config.write_text(yaml.safe_dump(run, sort_keys=False))
    cmd = [sys.executable, "-m", "litgpt", "finetune_full", "--config", str(config)]
    print("$ " + " ".join(cmd), flush=True)
    run_logged(cmd, out_dir / "train.log")
    plot_training(out_dir / "train", run, out_dir / "training.png")

    print("== 4/4 sampling and evaluation", flush=True)
    checkpoint = out_dir / "train" / "final"
    gpt = load_model(checkpoint)
    layout = gpt.layout
    classes = torch.arange(layout.num_classes).repeat_interleave(samples_per_class)
    codes = generate(gpt, classes, guidance=guidance, temperature=temperature, seed=seed, progress=True)
    np.save(out_dir / "codes.npy", codes.numpy())
    np.save(out_dir / "labels.npy", classes.numpy())
    image_grid(to_pixels(codes, layout), rows=layout.num_classes).save(out_dir / "samples.png")
    gpt = gpt.float()  # held-out likelihoods in float32 (a no-op where sampling ran in float32)
    metrics = evaluate(codes.numpy(), classes.numpy(), out_dir / "data", model=gpt, seed=seed)
    metrics["settings"] = {"model": model, "steps": steps, "batch_size": batch_size, "lr": lr,
                           "guidance": guidance, "temperature": temperature, "seed": seed}
    metrics["minutes"] = (time.perf_counter() - t0) / 60
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"\nWrote {out_dir / 'samples.png'} (one row per digit), {out_dir / 'training.png'} (loss and r) and "
          f"{out_dir / 'metrics.json'}")
    print(format_metrics(metrics))
    real = metrics["real"]
    print(f"Frechet distance on classifier features: {metrics['fd_features'] / real['fd_features']:.2f}x the "
          f"real-vs-real floor; class consistency {metrics['consistency']:.1%}; copies {metrics['copies']:.1%}; "
          f"{metrics['minutes']:.1f} minutes in all")
    return metrics
