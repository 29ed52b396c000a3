"""``rar-llm sample``: class-conditional images from a checkpoint folder, as a PNG grid plus codes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from litgpt.config import Config
from litgpt.model import GPT
from PIL import Image

from rar_llm.generate import RAR_PRESETS, CodeDecoder, check_drawable, generate, to_pixels
from rar_llm.vocab import VocabLayout

OUTPUTS = ("samples.png", "codes.npy", "labels.npy")


def load_model(checkpoint_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """The GPT of a checkpoint folder (``lit_model.pth``, ``model_config.yaml``), checked against its layout."""
    import rar_llm.configs  # noqa: F401  (registers the rar-* names a config may refer to)

    checkpoint_dir = Path(checkpoint_dir)
    layout = VocabLayout.from_checkpoint(checkpoint_dir)
    for name in ("lit_model.pth", "model_config.yaml"):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(
                f"{checkpoint_dir / name} not found: a checkpoint folder holds lit_model.pth and model_config.yaml "
                "(`rar-llm init` or a litgpt run's final/ folder)"
            )
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    layout.check_model(config, where=str(checkpoint_dir))
    state = torch.load(checkpoint_dir / "lit_model.pth", map_location=device, mmap=True, weights_only=True)
    state = state.get("model", state)  # litgpt training runs save {"model": ...}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.max_seq_length = layout.seq_len  # only the image sequence is needed
    model.cos, model.sin = model.rope_cache(device=torch.device(device))  # not in the checkpoint
    return model.eval()


def image_grid(images: torch.Tensor, rows: int, min_size: int = 64, pad: int = 2) -> Image.Image:
    """``(rows * cols, C, H, W)`` images in [0, 1] -> one PIL image, nearest-upscaled to >= ``min_size`` px."""
    n, C, H, W = images.shape
    cols = n // rows
    scale = max(1, math.ceil(min_size / max(H, W)))
    tiles = images.clamp(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = H * scale + pad, W * scale + pad
    canvas = torch.ones(C, rows * h + pad, cols * w + pad)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[:, pad + r * h : pad + r * h + H * scale, pad + c * w : pad + c * w + W * scale] = tile
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if C == 1 else pixels)  # grey "L" or "RGB"


def sample(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/samples"),
    classes: list[int] | None = None,
    num_per_class: int = 4,
    guidance: float = 1.0,
    schedule: str = "constant",
    power: float = 0.0,
    preset: str | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    steps: int | None = None,
    order: str | list[int] = "raster",
    seed: int = 0,
    tokenizer: str | CodeDecoder | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Sample images per class and write ``samples.png`` (one row per class), ``codes.npy`` and ``labels.npy``.

    Args:
        checkpoint_dir: a folder with ``lit_model.pth``, ``model_config.yaml`` and the rar_llm tokenizer files.
        out_dir: where the outputs go.
        classes: class ids to sample (default: every class of the layout).
        num_per_class: samples per class (the grid's columns).
        guidance: classifier-free guidance scale (1: none).
        schedule: guidance schedule: constant, linear (RandAR) or power_cosine (RAR).
        power: exponent of the power-cosine schedule.
        preset: RAR's settings for a model size (rar-b, rar-l, rar-xl, rar-xxl); replaces guidance,
            schedule, power and temperature.
        temperature: softmax temperature (0: greedy).
        top_k: keep only the k most likely codes.
        top_p: nucleus sampling threshold (1: off).
        steps: forward passes per image (default: one per cell); fewer is parallel decoding.
        order: raster, random, zcurve, spiral_in, spiral_out, subsample, alternate, or a permutation of the cells.
        seed: makes the samples reproducible.
        tokenizer: the image tokenizer that decodes codes to pixels (a ``rar_llm.tokenizers`` name or
            weights file, or an object with ``decode``). None draws the digits codebook as 17 grey
            levels (code k is k/16) and refuses other codebooks.
        batch_size: images generated together.
        device: torch device to run on.
        dtype: weights dtype (float32, bfloat16).
        overwrite: replace existing outputs in ``out_dir``.
    """
    out_dir = Path(out_dir)
    existing = [out_dir / f for f in OUTPUTS if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; choose another --out_dir or pass --overwrite true"
        )
    if preset is not None:
        if preset not in RAR_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {list(RAR_PRESETS)}")
        p = RAR_PRESETS[preset]
        guidance, schedule, power, temperature = p["guidance"], p["schedule"], p["power"], p["temperature"]
    if num_per_class < 1 or batch_size < 1:
        raise ValueError(f"num_per_class={num_per_class} and batch_size={batch_size} must be >= 1")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating-point dtype; use float32 or bfloat16")
    if isinstance(tokenizer, str):
        from rar_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)

    layout = VocabLayout.from_checkpoint(checkpoint_dir)
    check_drawable(layout, tokenizer)
    classes = list(range(layout.num_classes)) if classes is None else list(classes)
    labels = torch.tensor(classes).repeat_interleave(num_per_class)
    layout.class_tokens(labels)  # fail on a bad class before loading the weights
    model = load_model(checkpoint_dir, device, torch_dtype)
    gen = torch.Generator(device).manual_seed(seed)

    codes = torch.cat([
        generate(
            model, chunk, layout=layout, guidance=guidance, schedule=schedule, power=power,
            temperature=temperature, top_k=top_k, top_p=top_p, steps=steps, order=order, seed=gen, progress=True,
        )
        for chunk in labels.split(batch_size)
    ])
    images = torch.cat([to_pixels(c, layout, tokenizer) for c in codes.split(batch_size)])  # on the CPU

    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(classes)).save(out_dir / "samples.png")
    np.save(out_dir / "codes.npy", codes.numpy())
    np.save(out_dir / "labels.npy", labels.numpy())
    print(f"Wrote {len(labels)} samples of classes {classes} to {out_dir}")
    return out_dir
