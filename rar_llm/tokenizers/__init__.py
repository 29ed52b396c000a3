"""Image tokenizers: images <-> code grids, behind one interface (:class:`ImageTokenizer`).

``base`` (the interface), ``pixel`` (one code per pixel, the digits' greys), ``maskgit`` (RAR's MaskGIT-VQGAN),
``vq`` (a small learned VQ for 28x28 grey images), ``draw`` (codes to pixels and PNG grids). Torch only, no
litgpt. ``train_vq`` (``rar-llm train-vq``) sits above ``data``: it reads Fashion-MNIST to train ``vq``.
"""

from __future__ import annotations

from pathlib import Path

from rar_llm.tokenizers.base import ImageTokenizer
from rar_llm.tokenizers.maskgit import MaskGITVQGAN
from rar_llm.tokenizers.pixel import PixelTokenizer, pair

NAMES = ("maskgit-vqgan", "pixel", "digits")


def load_tokenizer(
    name_or_path: str | Path,
    weights: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    levels: int = 256,
) -> ImageTokenizer:
    """A tokenizer by name, or from a weights file.

    Args:
        name_or_path: ``"maskgit-vqgan"`` (RAR's tokenizer), ``"pixel"`` (one code per pixel),
            ``"digits"`` (17 greys on 8x8, scikit-learn's digits), or a path: a ``.npy`` palette
            (pixel), a ``.safetensors`` VQ tokenizer from ``rar-llm train-vq``, or a MaskGIT-VQGAN state dict.
        weights: MaskGIT-VQGAN: the local ``maskgit-vqgan-imagenet-f16-256.bin`` (None: download it).
            pixel: a ``.npy`` palette of ``(K, C)`` colours (None: ``levels`` greys).
        image_size: pixel only: pixels (= codes) per side.
        levels: pixel without a palette: grey levels, code k is ``k / (levels - 1)``.
    """
    name = str(name_or_path)
    if name not in NAMES:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"unknown tokenizer {name!r}: name one of {list(NAMES)} or give a weights file")
        if path.suffix == ".safetensors":
            from rar_llm.tokenizers.vq import VQTokenizer

            tok = VQTokenizer.load(path)
            if image_size is not None and pair(image_size) != tok.image_size:
                raise ValueError(f"{path} takes {tok.image_size} images, not {image_size}; drop image_size")
            return tok
        name, weights = ("pixel" if path.suffix == ".npy" else "maskgit-vqgan"), path
    if name in ("maskgit-vqgan", "digits"):
        tok = MaskGITVQGAN.from_pretrained(weights) if name == "maskgit-vqgan" else PixelTokenizer.grey(17, 8)
        if image_size is not None and pair(image_size) != tok.image_size:
            raise ValueError(f"the {name} tokenizer takes {tok.image_size} images, not {image_size}; drop image_size")
        return tok
    if image_size is None:
        raise ValueError("the pixel tokenizer needs image_size (pixels per side; each pixel is one code)")
    return PixelTokenizer.load(weights, image_size) if weights is not None else PixelTokenizer.grey(levels, image_size)


__all__ = ["ImageTokenizer", "MaskGITVQGAN", "PixelTokenizer", "load_tokenizer"]
