"""Fashion-MNIST (or any MNIST-style IDX set): read from its four standard files, written as shards, and the
VQ tokenizer trained on it (``rar-llm train-vq``).

The files are the ones Zalando publishes and Debian packages (``apt-get install dataset-fashion-mnist``
puts them, gzipped, under ``/usr/share/datasets/fashion-mnist/``): ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
``.gz``. Nothing is downloaded. The 10,000 ``t10k`` images are the held-out ``val`` split and never
train anything (tokenizer, classifier or generator).

IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
dimension as a big-endian uint32, then the values in C order.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from rar_llm.data.shards import ShardWriter

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot"]
HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: /usr/share/datasets/fashion-mnist/), "
    "or put the four files from github.com/zalandoresearch/fashion-mnist (data/fashion) in a folder and name it "
    "with --source_dir"
)
IDX_TYPES = {0x08: np.uint8}  # the only type MNIST-style sets use
SIZE = (28, 28)  # pixels of every MNIST-style image


def read_idx(path: Path | str, ndim: int | None = None) -> np.ndarray:
    """The array in one IDX file (gzip or raw). Any defect raises one ValueError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged gzip stream
        raise ValueError(
            f"{path}: not a readable gzip file ({e}); the download is damaged, get the file again"
        ) from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex() or 'missing'}, "
            "expected 000008 followed by the number of dimensions); is it the right file?"
        )
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: IDX file with {dims} dimensions, expected {ndim} (magic {raw[:4].hex()})")
    header = 4 + 4 * dims
    if dims == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {dims} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=dims, offset=4))
    want = math.prod(shape)  # Python ints: a header whose product overflows int64 is still refused
    got = len(raw) - header
    if got != want:
        what = "truncated" if got < want else "longer than its header says"
        raise ValueError(
            f"{path}: {what}: the header declares {'x'.join(map(str, shape))} = {want} values but the file holds "
            f"{got}; the download is damaged, get the file again"
        )
    return np.frombuffer(raw, IDX_TYPES[raw[2]], count=want, offset=header).reshape(shape).copy()  # writable


def find_file(source_dir: Path, name: str) -> Path:
    for candidate in (source_dir / name, source_dir / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{source_dir} has no {name} (or {name}.gz): {HOW_TO_GET}")


def load_split(source_dir: Path | str | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of ``train`` (60,000) or ``test`` (10,000).

    ``source_dir`` defaults to ``$FASHION_MNIST_DIR`` or Debian's folder.
    """
    if split not in FILES:
        raise ValueError(f"split {split!r}: Fashion-MNIST has {list(FILES)}")
    source_dir = Path(source_dir or os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"no Fashion-MNIST folder at {source_dir}: {HOW_TO_GET}")
    image_file, label_file = (find_file(source_dir, n) for n in FILES[split])
    images, labels = read_idx(image_file, ndim=3), read_idx(label_file, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels; "
                         "the two files do not belong together")
    if not len(images):
        raise ValueError(f"{image_file} holds no images; is it the right file?")
    if images.shape[1:] != SIZE:
        raise ValueError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images; an MNIST-style set is "
                         f"{SIZE[0]}x{SIZE[1]} (is it the right file?)")
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{label_file}: label {int(labels.max())} outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float ``(N, 1, H, W)`` in [0, 1], what image tokenizers take."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


def fashion_mnist(
    out_dir: Path,
    tokenizer: str = "pixel",
    weights: Path | None = None,
    source_dir: Path | None = None,
    levels: int = 256,
    batch_size: int = 1024,
) -> Path:
    """Fashion-MNIST as shards of codes: ``train`` (60,000) and ``val`` (the 10,000 test images, held out).

    Args:
        out_dir: the data folder to write (refused if it already holds data).
        tokenizer: a VQ tokenizer trained by ``rar-llm train-vq`` (its ``.safetensors`` file), or
            ``pixel`` (one code per pixel, ``levels`` greys: 784 codes per image).
        weights: a pixel palette ``.npy`` (see ``load_tokenizer``).
        source_dir: the folder of the four IDX files (default: ``$FASHION_MNIST_DIR`` or
            /usr/share/datasets/fashion-mnist from ``apt-get install dataset-fashion-mnist``).
        levels: grey levels of the pixel tokenizer.
        batch_size: images per encoder call.
    """
    from rar_llm.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer, weights, image_size=28 if tokenizer == "pixel" else None, levels=levels)
    if tok.image_size != SIZE or tok.channels != 1:
        raise ValueError(f"{tokenizer} takes {tok.channels}x{tok.image_size} images; Fashion-MNIST is 1x{SIZE}")
    splits = {"train": load_split(source_dir, "train"), "val": load_split(source_dir, "test")}
    info = {"source": "fashion-mnist", "tokenizer": str(tokenizer), "val": "t10k (the official test split)"}
    with ShardWriter(Path(out_dir), tok.codebook_size, *tok.grid, len(CLASS_NAMES), class_names=CLASS_NAMES,
                     info=info, resumable=False) as w:
        for split, (images, labels) in splits.items():
            codes = torch.cat(
                [tok.encode(to_float(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
            )
            w.add(split, codes.numpy(), labels)
    print(f"Wrote {len(splits['train'][1])} train and {len(splits['val'][1])} val (test split) images "
          f"as {tok.grid[0]}x{tok.grid[1]} codes of {tok.codebook_size} to {out_dir}")
    return Path(out_dir)
