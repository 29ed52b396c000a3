"""A small learned VQ tokenizer for grey images (Fashion-MNIST's 28x28), trainable on a CPU in minutes.

A convolutional encoder downsamples 28x28 to a 7x7 (or 14x14) grid of latents, the quantiser
(``vector_quantize_pytorch.VectorQuantize``: EMA codebook, k-means initialisation, dead-code
restarts) snaps each to one of ``codebook_size`` codes, and a mirrored decoder draws the image back.
Weights and the architecture's settings live in one ``.safetensors`` file (settings in its metadata),
which ``rar_llm.tokenizers.load_tokenizer(path)`` reads.

``rar-llm train-vq --out vq.safetensors`` trains it on the Fashion-MNIST training split and reports
codebook utilisation and reconstruction PSNR on the held-out test split.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rar_llm.nets import load_net, save_net
from rar_llm.tokenizers.base import ImageTokenizer

FORMAT = "rar_llm-vq"


def _vq_class():
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as e:
        raise ImportError(
            "the VQ tokenizer needs vector-quantize-pytorch: pip install 'rar-llm[vq]'"
        ) from e
    return VectorQuantize


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class VQTokenizer(nn.Module, ImageTokenizer):
    """Grey ``image_size`` images <-> ``grid`` codes of a learned ``codebook_size`` codebook.

    Args:
        codebook_size: codes per cell (>= 2).
        grid: codes per side; ``image_size / grid`` must be 2 or 4 (one or two stride-2 stages).
        image_size: pixels per side.
        width: channels of the first stage (the second has twice as many).
        dim: width of a latent (and of a codebook entry).
        decay: the codebook's EMA decay.
        dead_code: codes used less than this (EMA count per batch) restart at a random latent.
        commitment: weight of the commitment loss.
    """

    channels = 1

    @staticmethod
    def check_grid(grid: int, image_size: int) -> int:
        """The downsampling factor (2 or 4) from ``image_size`` to ``grid``; a ValueError where none fits."""
        factor = image_size // grid
        if grid * factor != image_size or factor not in (2, 4):
            fits = [image_size // f for f in (2, 4) if image_size % f == 0]
            raise ValueError(f"grid {grid} does not fit {image_size}x{image_size} images: image_size / grid must be "
                             f"2 or 4 (grid {' or '.join(map(str, fits)) or 'none'})")
        return factor

    def __init__(self, codebook_size: int = 256, grid: int = 7, image_size: int = 28, width: int = 32, dim: int = 32,
                 decay: float = 0.9, dead_code: float = 2.0, commitment: float = 0.25) -> None:
        super().__init__()
        factor = self.check_grid(grid, image_size)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.config = {"codebook_size": codebook_size, "grid": grid, "image_size": image_size, "width": width,
                       "dim": dim, "decay": decay, "dead_code": dead_code, "commitment": commitment}
        self.codebook_size = codebook_size
        self.grid = (grid, grid)
        self.image_size = (image_size, image_size)
        c, c2 = width, 2 * width
        stages = int(math.log2(factor))
        down = [nn.Conv2d(1, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c2, 4, stride=2, padding=1)]
        down += [nn.SiLU(), nn.Conv2d(c2, c2, 4, stride=2, padding=1)] if stages == 2 else []
        self.encoder = nn.Sequential(*down, ResBlock(c2), ResBlock(c2), nn.SiLU(), nn.Conv2d(c2, dim, 1))
        up = [nn.Conv2d(dim, c2, 3, padding=1), ResBlock(c2), ResBlock(c2), nn.SiLU()]
        up += [nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1), nn.SiLU()] if stages == 2 else []
        up += [nn.ConvTranspose2d(c2, c, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1)]
        self.decoder = nn.Sequential(*up)
        self.quantizer = _vq_class()(
            dim=dim, codebook_size=codebook_size, decay=decay, kmeans_init=True, threshold_ema_dead_code=dead_code,
            commitment_weight=commitment, accept_image_fmap=True,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstructed images, codes, quantiser loss)``."""
        quantized, codes, vq_loss = self.quantizer(self.encoder(images * 2 - 1))
        return torch.sigmoid(self.decoder(quantized)), codes, vq_loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        self.check_images(images)
        was = self.training
        self.eval()
        try:
            out = [self.quantizer(self.encoder(x.to(self.device, torch.float32) * 2 - 1))[1]
                   for x in images.split(batch_size)]
        finally:
            self.train(was)
        return torch.cat(out).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        self.check_codes(codes)
        out = [torch.sigmoid(self.decoder(self.quantizer.get_output_from_indices(c.to(self.device, torch.long))))
               for c in codes.split(batch_size)]
        return torch.cat(out).clamp(0.0, 1.0)

    def save(self, path: Path | str, report: dict | None = None) -> Path:
        """Weights plus settings (safetensors metadata); ``report`` (figures of the run) rides along."""
        return save_net(self, path, FORMAT, self.config, report)

    @classmethod
    def load(cls, path: Path | str) -> VQTokenizer:
        """A network written by :meth:`save`; any other file raises a ValueError naming it."""
        return load_net(cls, path, FORMAT, "VQ tokenizer", "train-vq")


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (images - reconstructions).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def utilisation(codes: torch.Tensor, codebook_size: int) -> dict:
    """Share of the codebook used and the perplexity of the code histogram (codebook_size if uniform)."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "utilisation": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp())}


def reconstruction_report(tok: VQTokenizer, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Codebook use and PSNR of ``(N, 1, H, W)`` images through the tokenizer (and the reconstructions)."""
    codes = tok.encode(images)
    rec = tok.decode(codes)
    p = psnr(images, rec)
    mse = (images - rec).pow(2).mean()
    return {**utilisation(codes, tok.codebook_size), "psnr_db": float(p.mean()),
            "psnr_of_mean_mse_db": float(10 * torch.log10(1 / mse)), "num_images": len(images)}, rec


__all__ = ["VQTokenizer", "psnr", "utilisation", "reconstruction_report"]
