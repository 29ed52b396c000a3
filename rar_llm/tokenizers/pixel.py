"""One code per pixel, for small images: the index of the pixel's nearest palette colour.

A grey palette of ``levels`` evenly spaced values makes code ``k`` the grey ``k / (levels - 1)``
(scikit-learn's digits: 17 levels, 8x8). For colour, a palette fitted with k-means over pixels, as
ImageGPT did, keeps the codebook small while covering the colours the data uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rar_llm.tokenizers.base import ImageTokenizer


def pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def nearest(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` colours -> ``(N,)`` index of the nearest palette row (squared Euclidean distance)."""
    return torch.cdist(pixels, palette.to(pixels), compute_mode="donot_use_mm_for_euclid_dist").argmin(1)


class PixelTokenizer(ImageTokenizer):
    """Images of ``image_size`` pixels <-> grids of the same size of palette indices.

    Args:
        palette: ``(K, C)`` colours in [0, 1]; K is the codebook size, C the channels.
        image_size: pixels (= codes) per side, or ``(H, W)``.
    """

    def __init__(self, palette: torch.Tensor | np.ndarray, image_size: int | tuple[int, int]) -> None:
        palette = torch.as_tensor(palette, dtype=torch.float32)
        if palette.ndim != 2 or len(palette) < 2 or palette.min() < 0 or palette.max() > 1:
            raise ValueError(f"a palette is (K >= 2, C) colours in [0, 1], got {tuple(palette.shape)}")
        self.palette = palette
        self.codebook_size, self.channels = palette.shape
        self.image_size = self.grid = pair(image_size)

    @classmethod
    def grey(cls, levels: int, image_size: int | tuple[int, int]) -> PixelTokenizer:
        """``levels`` evenly spaced greys: code k is grey ``k / (levels - 1)``."""
        if levels < 2:
            raise ValueError(f"a grey palette needs at least 2 levels, got {levels}")
        return cls((torch.arange(levels, dtype=torch.float64) / (levels - 1))[:, None], image_size)

    @classmethod
    def fit(
        cls, images: torch.Tensor, colours: int, iters: int = 20, max_pixels: int = 100_000, seed: int = 0
    ) -> PixelTokenizer:
        """A palette of ``colours`` k-means centres over the pixels of ``(N, C, H, W)`` images (``max_pixels`` at most)."""
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1]).float()
        g = torch.Generator().manual_seed(seed)
        if len(pixels) > max_pixels:
            pixels = pixels[torch.randperm(len(pixels), generator=g)[:max_pixels]]
        if len(pixels) < colours:
            raise ValueError(f"cannot fit {colours} colours to {len(pixels)} pixels; give more images or fewer colours")
        centres = pixels[torch.randperm(len(pixels), generator=g)[:colours]].clone()
        for _ in range(iters):
            assign = nearest(pixels, centres)
            counts = torch.bincount(assign, minlength=colours)
            sums = torch.zeros_like(centres).index_add_(0, assign, pixels)
            used = counts > 0
            centres[used] = sums[used] / counts[used, None]
            # An empty cluster restarts at a random pixel instead of wasting a code.
            centres[~used] = pixels[torch.randint(len(pixels), (int((~used).sum()),), generator=g)]
        return cls(centres.clamp(0, 1), images.shape[2:])

    @classmethod
    def load(cls, path: Path | str, image_size: int | tuple[int, int]) -> PixelTokenizer:
        """A palette saved by :meth:`save` (a ``(K, C)`` float ``.npy``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no palette at {path}; fit one with PixelTokenizer.fit(...).save(path)")
        return cls(np.load(path, allow_pickle=False), image_size)

    def save(self, path: Path | str) -> None:
        np.save(Path(path), self.palette.numpy())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        B, C, H, W = images.shape
        return nearest(images.permute(0, 2, 3, 1).reshape(-1, C).float(), self.palette).view(B, H, W)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        return self.palette.to(codes.device)[codes.long()].permute(0, 3, 1, 2)
