"""``rar-llm train-vq``: the VQ tokenizer trained on Fashion-MNIST's training split (or an image folder), scored on
held-out images."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rar_llm.data.fashion import SIZE, to_float
from rar_llm.data.images import grey_train_test
from rar_llm.nets import check_run, claim_net_files, positive_int, shuffled_batches, write_report
from rar_llm.tokenizers.vq import VQTokenizer, reconstruction_report, utilisation


def train_vq(
    out: Path,
    source_dir: Path | None = None,
    image_dir: Path | None = None,
    image_size: int = 28,
    val_fraction: float = 0.1,
    codebook_size: int = 256,
    grid: int = 7,
    width: int = 32,
    dim: int = 32,
    epochs: float = 2.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the VQ tokenizer on Fashion-MNIST's training split; report utilisation and PSNR on its test split.

    Writes ``out`` (safetensors) and ``NAME.report.json`` beside it (the figures). The test split only measures.

    Args:
        out: the ``.safetensors`` file to write.
        source_dir: the four IDX files (default: ``$FASHION_MNIST_DIR`` or Debian's folder).
        image_dir: instead, an image folder (one subfolder per class, as ``rar-llm tokenize`` reads): grey,
            ADM-centre-cropped to ``image_size``; every ``1 / val_fraction``-th image is held out.
        codebook_size, grid, width, dim: see :class:`VQTokenizer`.
        epochs: passes over the 60,000 training images (fractions allowed).
        batch_size, lr, seed: AdamW's batch and peak rate (cosine decay, 5 % warm-up); the seed fixes init and order.
        threads: torch threads (default: torch's).
        overwrite: replace an existing ``out`` and its report (nothing else).
    """
    out, report_file = claim_net_files(out, overwrite)
    check_run(epochs, batch_size, lr, threads)
    for name, value in (("codebook_size", codebook_size), ("grid", grid), ("width", width), ("dim", dim)):
        positive_int(name, value, minimum=2 if name == "codebook_size" else 1)
    VQTokenizer.check_grid(grid, image_size if image_dir is not None else SIZE[0])  # before reading any image
    train, _, test, _, _, held_out = grey_train_test(source_dir, image_dir, image_size, val_fraction)
    train_images, test_images = to_float(train), to_float(test)
    side = train_images.shape[-1]
    if train_images.shape[-2:] != test_images.shape[-2:] or train_images.shape[-2] != side:
        raise ValueError(f"{source_dir}: train images are {tuple(train_images.shape[-2:])}, test images "
                         f"{tuple(test_images.shape[-2:])}; train-vq needs square images of one size")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = VQTokenizer(codebook_size, grid, side, width, dim)  # refuses a grid that does not fit the images
    opt = torch.optim.AdamW([p for p in tok.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    steps = max(1, round(epochs * len(train_images) / batch_size))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tok.train()
    for step, idx in zip(range(steps), shuffled_batches(len(train_images), batch_size, g)):
        x = train_images[idx]
        rec, codes, vq_loss = tok(x)
        loss = F.mse_loss(rec, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            used = len(codes.unique())
            db = 10 * math.log10(1 / F.mse_loss(rec, x).item())
            print(f"step {step}/{steps} loss {loss.item():.4f} psnr {db:.2f} codes in batch {used} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    tok.eval()
    report, _ = reconstruction_report(tok, test_images)
    report |= {"train_utilisation": utilisation(tok.encode(train_images), codebook_size)["utilisation"],
               "steps": steps, "batch_size": batch_size, "epochs": epochs, "seed": seed,
               "train_seconds": round(time.perf_counter() - t0), "split": f"{held_out} ({len(test_images):,} held-out images)"}
    tok.save(out, report)
    write_report(report_file, {"config": tok.config, **report})
    print(json.dumps(report, indent=1))
    print(f"Wrote {out} and its report {report_file}")
    return out
