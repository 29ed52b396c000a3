"""Throughput of MaskGIT-VQGAN tokenization (random weights: speed does not depend on their values).

Two figures: the encoder alone on a batch of synthetic 256x256 images, and ``rar_llm.data.images.tokenize``
end to end on a folder of synthetic JPEGs (decode, ADM crop + flip, encode, shards).

    python bench/tokenize_images.py                          # CPU, small defaults
    python bench/tokenize_images.py --device cuda --batch_size 64 --images 512
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from jsonargparse import CLI
from PIL import Image

from rar_llm.data.images import tokenize
from rar_llm.tokenizers import MaskGITVQGAN


def main(
    batch_size: int = 4, repeats: int = 2, images: int = 4, device: str | None = None, num_workers: int = 2
) -> None:
    """
    Args:
        batch_size: images per encoder call.
        repeats: timed encoder calls (after one warm-up call).
        images: JPEGs in the end-to-end run (each gives 2 samples: crop and flip); 0 skips it.
        device: default CUDA when present, else CPU.
        num_workers: image-decoding processes of the end-to-end run.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = MaskGITVQGAN().eval().requires_grad_(False)
    x = torch.rand(batch_size, 3, 256, 256, device=dev)
    model.to(dev).encode(x)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        model.encode(x)
    sync()
    rate = repeats * batch_size / (time.perf_counter() - t)
    print(f"encode: {rate:.2f} images/s ({dev}, batch {batch_size}, {torch.get_num_threads()} threads)")
    if not images:
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "maskgit.bin"
        torch.save(model.cpu().state_dict(), weights)
        rng = np.random.default_rng(0)
        for i in range(images):
            folder = tmp / "images" / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        t = time.perf_counter()
        tokenize(
            tmp / "images", tmp / "out", weights=weights, batch_size=batch_size, val_fraction=0,
            device=str(dev), num_workers=num_workers,
        )
        seconds = time.perf_counter() - t
    print(f"tokenize: {images / seconds:.2f} images/s, {2 * images / seconds:.2f} samples/s "
          f"({dev}, {images} 500x375 JPEGs, ADM crop + flip, weight loading included)")


if __name__ == "__main__":
    CLI(main, as_positional=False)
