"""What every image tokenizer offers, so data preparation and generation take any of them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ImageTokenizer(ABC):
    """Images <-> grids of discrete codes.

    Attributes:
        codebook_size: codes are ``0 .. codebook_size - 1``.
        grid: ``(h, w)`` codes per image.
        image_size: ``(H, W)`` pixels per image.
        channels: 3 for RGB, 1 for grey.
    """

    codebook_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    channels: int

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` floats in [0, 1] -> ``(B, h, w)`` long codes."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` codes -> ``(B, C, H, W)`` floats in [0, 1]."""

    def to(self, device: torch.device | str) -> ImageTokenizer:
        """Tokenizers without weights work on whatever device their input is on."""
        return self

    def check_images(self, images: torch.Tensor) -> None:
        """Raise, naming the shape, unless ``images`` is a float batch this tokenizer takes."""
        want = (self.channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} encodes float images (B, {', '.join(map(str, want))}) in [0, 1], "
                f"got {tuple(images.shape)} {images.dtype}; resize/crop to {self.image_size} and divide uint8 by 255"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise, naming the shape or code, unless ``codes`` is a batch of grids of this codebook."""
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid or codes.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} decodes integer codes (B, {self.grid[0]}, {self.grid[1]}), "
                f"got {tuple(codes.shape)} {codes.dtype}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            bad = codes[(codes < 0) | (codes >= self.codebook_size)]
            raise ValueError(
                f"code {int(bad[0])} is outside {type(self).__name__}'s codebook 0..{self.codebook_size - 1}; "
                "the codes come from another tokenizer"
            )
