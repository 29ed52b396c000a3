"""Code grids to pictures: pixels through an image tokenizer, and PNG grids people can look at."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from PIL import Image

from rar_llm.vocab import VocabLayout

DIGITS_LEVELS = 17  # scikit-learn's 8x8 digits: grey levels 0..16


class CodeDecoder(Protocol):
    """What drawing samples needs of an image tokenizer; every ``rar_llm.tokenizers`` tokenizer is one."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` codes -> ``(B, C, H, W)`` floats in [0, 1]."""


def check_drawable(layout: VocabLayout, tokenizer: CodeDecoder | None = None, name: str = "the tokenizer") -> None:
    """Raise before sampling if the codes could not be turned into pixels: no tokenizer for a codebook other
    than the digits' greys, or a tokenizer of another codebook or grid than the layout's (``name`` it)."""
    if tokenizer is None and layout.codebook_size != DIGITS_LEVELS:
        raise ValueError(
            f"no image tokenizer given and the codebook has {layout.codebook_size} codes, not the digits' "
            f"{DIGITS_LEVELS} grey levels; pass the tokenizer the data was made with (e.g. tokenizer='maskgit-vqgan')"
        )
    size, grid = getattr(tokenizer, "codebook_size", None), getattr(tokenizer, "grid", None)
    if size is not None and (size, tuple(grid or ())) != (layout.codebook_size, (layout.height, layout.width)):
        raise ValueError(
            f"{name} has {size} codes on a {'x'.join(map(str, grid or ()))} grid but the model's layout has "
            f"{layout.codebook_size} codes on {layout.height}x{layout.width}; give the tokenizer the data was made with"
        )


def to_pixels(codes: torch.Tensor, layout: VocabLayout, tokenizer: CodeDecoder | None = None) -> torch.Tensor:
    """Code grids ``(B, h, w)`` -> images ``(B, C, H, W)`` in [0, 1].

    Without a tokenizer only the digits codebook (17 grey levels) can be drawn: code k is grey
    ``k / (K - 1)``, which is what the digits pixel tokenizer does.
    """
    if tokenizer is not None:
        return tokenizer.decode(codes).float().clamp(0, 1)
    check_drawable(layout)
    return (codes.float() / (layout.codebook_size - 1)).unsqueeze(1)


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
