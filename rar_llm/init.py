"""``rar-llm init``: a fresh litgpt checkpoint folder for a RAR config and a vocabulary layout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.utils import save_config

from rar_llm import configs  # noqa: F401  (registers the rar-* names)
from rar_llm.textbase import write_tokenizer
from rar_llm.vocab import VocabLayout

PosInit = Literal["normal", "sincos"]


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """``(H*W, dim)`` 2D sine-cosine codes of the grid cells (half the channels per axis), unit RMS."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = [f(axis.reshape(-1, 1).float() * freqs) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb / emb.pow(2).mean().sqrt()


def init_weights(model: GPT, std: float = 0.02, layout: VocabLayout | None = None, pos_init: PosInit = "normal") -> None:
    """GPT-2/RAR-style init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * layers).

    ``pos_init="sincos"`` starts the position tokens' embeddings from 2D sine-cosine codes of their
    cells (scaled to ``std``), so neighbouring cells start close, as RandAR's 2D rotary queries do.
    """
    if pos_init not in ("normal", "sincos"):
        raise ValueError(f"pos_init={pos_init!r}: use 'normal' or 'sincos'")
    proj_std = std / math.sqrt(2 * model.config.n_layer)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norms (ones), biases (zeros)
            torch.nn.init.ones_(p) if "norm" in name or "ln_f" in name else torch.nn.init.zeros_(p)
        elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            torch.nn.init.normal_(p, 0.0, proj_std)
        else:
            torch.nn.init.normal_(p, 0.0, std)
    if pos_init == "sincos":
        if layout is None:
            raise ValueError("pos_init='sincos' needs the layout (which ids are position tokens)")
        with torch.no_grad():
            rows = slice(layout.pos_offset, layout.pos_offset + layout.num_positions)
            model.transformer.wte.weight[rows] = std * sincos_2d(layout.height, layout.width, model.config.n_embd)


def model_config(model: str, layout: VocabLayout, **overrides) -> Config:
    """The named config with the layout's vocabulary and a context that holds its sequences."""
    base = Config.from_name(model)
    block_size = max(base.block_size, layout.seq_len)
    return Config.from_name(
        model,
        vocab_size=layout.vocab_size,
        padded_vocab_size=layout.padded_vocab_size,
        padding_multiple=layout.pad_multiple,
        block_size=block_size,
        **overrides,
    )


def init(
    out_dir: Path,
    model: str = "rar-tiny",
    layout: str = "digits",
    seed: int = 0,
    pos_init: PosInit = "normal",
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised litgpt checkpoint folder.

    Args:
        out_dir: the checkpoint folder to create.
        model: a registered config name (rar-b, rar-l, rar-xl, rar-xxl, rar-tiny) or any litgpt name.
        layout: a vocabulary layout: a JSON file or a name in ``adapters/`` (maskgit_imagenet, digits, ...).
        seed: seed of the random init.
        pos_init: ``normal`` or ``sincos`` (position tokens start from 2D sine-cosine codes of their cells).
        overwrite: replace the checkpoint files of an existing folder (other files are left alone).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out_dir or pass --overwrite true")
    vocab = VocabLayout.load(layout)
    config = model_config(model, vocab)
    torch.manual_seed(seed)
    with torch.device("meta"):
        gpt = GPT(config)
    gpt.to_empty(device="cpu")
    init_weights(gpt, layout=vocab, pos_init=pos_init)
    gpt.max_seq_length = config.block_size  # rebuild the rope cache on real memory

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(gpt.state_dict(), out_dir / "lit_model.pth")
    save_config(config, out_dir)
    write_tokenizer(vocab, out_dir)  # its tokenizer_config.json carries the layout
    n = sum(p.numel() for p in gpt.parameters())
    print(f"Wrote {config.name} ({n / 1e6:.1f}M parameters, vocabulary {vocab.vocab_size} -> "
          f"{vocab.padded_vocab_size}) to {out_dir}")
    return out_dir
