"""MaskGIT-VQGAN, the tokenizer RAR trains on: 256x256 RGB -> 16x16 codes of a 1024 x 256-d codebook.

Module names and shapes match the released ``maskgit-vqgan-imagenet-f16-256.bin`` (Hugging Face
``fun-research/TiTok``; 168 tensors, 54.5M parameters) so that file loads strictly, and the forward
pass reproduces the one it was trained with (bytedance/1d-tokenizer, modeling/modules/maskgit_vqgan.py),
quirks included.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rar_llm.tokenizers.base import ImageTokenizer

HF_REPO = "fun-research/TiTok"
HF_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
BASE_CHANNELS = 128
CHANNEL_MULT = (1, 1, 2, 2, 4)
Z_CHANNELS = 256
CODEBOOK_SIZE = 1024
RES_BLOCKS = 2


def _conv(c_in: int, c_out: int, kernel: int, bias: bool) -> nn.Conv2d:
    # TensorFlow "same" padding is symmetric k // 2 for the stride-1, odd kernels used here.
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, twice, plus a residual.

    When the width changes, the trained model's 1x1 ``nin_shortcut`` takes the block's *output*, not
    its input, as the residual (so the input is dropped there); kept as trained or the weights misfit.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv1 = _conv(c_in, c_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(32, c_out, eps=1e-6)
        self.conv2 = _conv(c_out, c_out, 3, bias=False)
        self.nin_shortcut = _conv(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class Level(nn.Module):
    """The residual blocks of one resolution, then (optionally) a 2x average-pool or nearest upsample + conv."""

    def __init__(self, c_in: int, c_out: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList([ResBlock(c_in if i == 0 else c_out, c_out) for i in range(RES_BLOCKS)])
        self.resample = resample
        if resample == "up":
            self.upsample_conv = _conv(c_out, c_out, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [BASE_CHANNELS * m for m in CHANNEL_MULT]
        last = len(widths) - 1
        self.conv_in = _conv(3, BASE_CHANNELS, 3, bias=False)
        self.down = nn.ModuleList(
            [Level(([BASE_CHANNELS] + widths)[i], w, None if i == last else "down") for i, w in enumerate(widths)]
        )
        self.mid = nn.ModuleList([ResBlock(widths[-1], widths[-1]) for _ in range(RES_BLOCKS)])
        self.norm_out = nn.GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = _conv(widths[-1], Z_CHANNELS, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [BASE_CHANNELS * m for m in CHANNEL_MULT]
        self.conv_in = _conv(Z_CHANNELS, widths[-1], 3, bias=True)
        self.mid = nn.ModuleList([ResBlock(widths[-1], widths[-1]) for _ in range(RES_BLOCKS)])
        # up[i] produces resolution i's width; they run from the coarsest (last) to the finest (0).
        self.up = nn.ModuleList(
            [Level((widths + widths[-1:])[i + 1], w, None if i == 0 else "up") for i, w in enumerate(widths)]
        )
        self.norm_out = nn.GroupNorm(32, widths[0], eps=1e-6)
        self.conv_out = _conv(widths[0], 3, 3, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Quantizer(nn.Module):
    """Nearest codebook entry by plain (squared) Euclidean distance; no projection, no l2-normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(CODEBOOK_SIZE, Z_CHANNELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` latents -> ``(B, h, w)`` codes."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        e = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e: one matmul, no (N, K, D) difference tensor. Same formula
        # as the reference, so near-ties resolve the same way as in its released codes.
        dist = torch.addmm(flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1), flat, e.t(), alpha=-2.0)
        return dist.argmin(1).view(B, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` codes -> ``(B, D, h, w)`` latents."""
        return self.embedding(codes).permute(0, 3, 1, 2)


class MaskGITVQGAN(nn.Module, ImageTokenizer):
    """The MaskGIT-VQGAN tokenizer. Build with :meth:`from_pretrained`; ``MaskGITVQGAN()`` is random."""

    codebook_size = CODEBOOK_SIZE
    grid = (16, 16)
    image_size = (256, 256)
    channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.quantize = Quantizer()

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.quantize(self.encoder(images.to(self.device, torch.float32)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        return self.decoder(self.quantize.lookup(codes.to(self.device, torch.long))).clamp(0.0, 1.0)

    @classmethod
    def from_pretrained(cls, weights: Path | str | None = None) -> MaskGITVQGAN:
        """The released tokenizer from a local ``.bin`` file, or downloaded from the hub when ``weights`` is None."""
        path = Path(weights) if weights is not None else download_weights()
        state = read_state_dict(path)
        with torch.device("meta"):
            model = cls()
        check_state_dict(state, model.state_dict(), path)
        model.load_state_dict(state, assign=True)
        return model.eval().requires_grad_(False)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain tensor dict from ``path``, read without unpickling code (``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no MaskGIT-VQGAN weights at {path}; download {HF_FILE} from huggingface.co/{HF_REPO} "
            "and pass its path, or pass no weights on a machine that is online"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable torch state dict ({e}); download {HF_FILE} again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a plain state dict of tensors like {HF_FILE}")
    return {k: v.float() for k, v in state.items()}


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Raise, naming every missing, unexpected and misshapen key, unless ``state`` fits ``expected``."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)):
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}")
    if problems:
        raise ValueError(
            f"{path} is not a MaskGIT-VQGAN state dict ({'; '.join(problems)}); "
            f"use {HF_FILE} from huggingface.co/{HF_REPO}"
        )


def download_weights() -> Path:
    """The released weights from the Hugging Face hub (cached there), for machines that are online."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImportError(
            f"downloading {HF_FILE} needs huggingface_hub (pip install huggingface_hub); "
            "or download it yourself and pass weights=PATH"
        ) from e
    try:
        return Path(hf_hub_download(HF_REPO, HF_FILE))
    except Exception as e:  # offline, proxy, auth, disk: all end the same way for the user
        raise RuntimeError(
            f"could not get {HF_FILE} from huggingface.co/{HF_REPO} ({type(e).__name__}: {e}); "
            "on a machine without network, download it elsewhere and pass weights=PATH"
        ) from e
