"""Turning image collections into shards (``rar_llm.data.shards``) that the data module reads.

Every writer here is resumable: shards record where in the source they end (``end_position``), so a
rerun with ``resume=True`` continues after the last finished shard and writes exactly the files an
uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from rar_llm.data.shards import ShardWriter, check_resume, positive_int
from rar_llm.tokenizers import ImageTokenizer, load_tokenizer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---- image folders ---------------------------------------------------------------------------------


def list_images(image_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(path, class id)`` pairs in torchvision ImageFolder order.

    Classes are the sorted subfolder names; each class's images are found recursively, folders and
    files sorted, so the order (and a resumed run's place in it) never depends on the file system.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} is not a folder; give a folder with one subfolder of images per class")
    classes = sorted(e.name for e in os.scandir(image_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"{image_dir} has no subfolders; put each class's images in a subfolder named after it")
    items = []
    for label, name in enumerate(classes):
        found = [
            Path(root) / f
            for root, _, files in sorted(os.walk(image_dir / name, followlinks=True))
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not found:
            raise ValueError(
                f"{image_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or add some"
            )
        items += [(p, label) for p in found]
    return classes, items


def image_list_digest(train: list[tuple[Path, int]], root: Path, val: list[tuple[Path, int]], val_root: Path) -> str:
    """SHA-256 of the (class id, relative path) lists: what a resumed ``tokenize`` must find again."""
    h = hashlib.sha256()
    for split, items, base in (("train", train, root), ("val", val, val_root)):
        for path, label in items:
            h.update(b"%s\t%d\t%s\n" % (split.encode(), label, os.fsencode(Path(path).relative_to(base))))
    return h.hexdigest()


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop, as RAR pre-tokenizes: box-halve while large, bicubic-resize short side to ``size``, crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def five_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """Corners (top-left, top-right, bottom-left, bottom-right) then centre, as torchvision's ``five_crop``."""
    w, h = img.size
    cx, cy = int(round((w - size) / 2)), int(round((h - size) / 2))
    corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (cx, cy)]
    return [img.crop((x, y, x + size, y + size)) for x, y in corners]


def views(img: Image.Image, size: int, crop: str, flip: bool) -> list[Image.Image]:
    """The training samples of one image.

    ``adm``: the ADM centre crop (and its mirror image). ``tencrop``: ADM-crop to ``int(1.1 * size)``
    (281 for 256), then the five crops of ``size`` (and the five of its mirror image), as RAR's and
    LlamaGen's ten-crop pre-tokenization.
    """
    if crop == "adm":
        out = [center_crop_adm(img, size)]
        return out + [out[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if flip else out
    big = center_crop_adm(img, int(size * 1.1))
    out = five_crop(big, size)
    return out + five_crop(big.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size) if flip else out


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as 8-bit ``mode`` (``L`` or ``RGB``); 16-bit greys are scaled to 8 bits, not clipped.

    PIL's ``convert`` clips 16-bit greys (PNG, TIFF, PGM with more than 8 bits: modes ``I;16``, ``I``)
    at 255, which turns almost every pixel white; here 0..65535 maps to 0..255. Floating-point
    pixels (mode ``F``) have no standard range and are refused (ValueError), as are integers outside
    16 bits.
    """
    img.load()  # the caller may close the file once this returns
    if img.mode in SIXTEEN_BIT:
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(
                f"mode {img.mode} pixels span {a.min()}..{a.max()}, more than 16 bits; save the image with 8 or 16 bits"
            )
        img = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("floating-point pixels (mode F) have no standard range; save the image with 8 or 16 bits")
    return img if img.mode == mode else img.convert(mode)


class ImageViews(Dataset):
    """Item i: image i's views as uint8 ``(m, H, W, C)`` and no error, or None and why it cannot be read.

    Errors are returned, not raised, so the main process decides (skip or stop) and names the file.
    """

    def __init__(self, items: list[tuple[Path, int]], size: int, channels: int, crop: str, flip: bool) -> None:
        self.items, self.size, self.crop, self.flip = items, size, crop, flip
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str | None]:
        try:
            with Image.open(self.items[i][0]) as img:
                img = to_8bit(img, self.mode)
        except Exception as e:  # PIL raises many types for broken files; all mean "unreadable"
            return None, f"{type(e).__name__}: {e}"
        arrays = [np.asarray(v) for v in views(img, self.size, self.crop, self.flip)]
        return np.stack(arrays).reshape(len(arrays), self.size, self.size, -1), None


def _as_list(batch: list) -> list:
    return batch


def _encode_batch(tok: ImageTokenizer, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` on the CPU -> ``(N, h, w)`` codes; converted on ``device`` to move 4x fewer bytes."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return tok.encode(x).cpu().numpy()


def _tokenize_split(
    writer: ShardWriter,
    split: str,
    dataset: ImageViews,
    per_image: int,
    tok: ImageTokenizer,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    skip_bad: bool,
) -> list[Path]:
    """Encode one split's images into ``writer``; returns the unreadable files it skipped.

    Sample j of image i sits at position ``i * per_image + j``. A resumed run restarts at the batch
    holding the first missing position and drops what is already written, so every batch (hence
    every code) is the one an uninterrupted run with the same ``batch_size`` would have computed.
    """
    start = writer.resume_position(split)
    first = start // per_image // batch_size * batch_size
    if first >= len(dataset):
        return []
    indices = range(first, len(dataset))
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    skipped = []
    with tqdm(total=len(dataset), initial=first, desc=f"{split} images", unit="img", dynamic_ncols=True) as bar:
        for b, batch in enumerate(loader):
            arrays, labels, positions = [], [], []
            for i, (views_, error) in enumerate(batch, start=first + b * batch_size):
                path, label = dataset.items[i]
                if error is not None:
                    if not skip_bad:
                        raise ValueError(
                            f"{path}: cannot read the image ({error}); fix or delete it, "
                            "or pass skip_bad=True (--skip_bad true) to skip it"
                        )
                    bar.write(f"skipping unreadable image {path} ({error})")
                    skipped.append(path)
                    continue
                arrays.append(views_)
                labels += [label] * len(views_)
                positions += range(i * per_image, i * per_image + len(views_))
            if arrays:
                codes = _encode_batch(tok, torch.from_numpy(np.concatenate(arrays)), device)
                keep = np.asarray(positions) >= start
                writer.add(split, codes[keep], np.asarray(labels)[keep], np.asarray(positions)[keep])
            bar.update(len(batch))
    return skipped


def tokenize(
    image_dir: Path,
    out_dir: Path,
    tokenizer: str = "maskgit-vqgan",
    weights: Path | None = None,
    image_size: int | None = None,
    crop: Literal["adm", "tencrop"] = "adm",
    flip: bool = True,
    batch_size: int = 64,
    val_fraction: float = 0.01,
    val_dir: Path | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    device: str | None = None,
    num_workers: int = 4,
    shard_size: int = 65536,
    allow_empty: bool = False,
) -> Path:
    """Encode an image folder (one subfolder per class) into shards of codes.

    Each training image gives ``crop``'s views: ``adm`` the ADM centre crop plus (``flip``) its mirror
    image, 2 samples, as RAR's default pre-tokenization; ``tencrop`` 10 (5 without flip). Samples of
    one image are consecutive. Val images give their ADM centre crop only: val measures images, not
    augmentations.

    Args:
        image_dir: classes are its subfolders (sorted names; ids in that order), images found recursively.
        out_dir: the data folder to write.
        tokenizer: ``maskgit-vqgan``, ``pixel``, ``digits`` or a weights file (see ``load_tokenizer``).
        weights: MaskGIT-VQGAN weights (None: download), or a pixel palette ``.npy``.
        image_size: pixel tokenizer only: pixels (= codes) per side.
        crop: ``adm`` (centre crop) or ``tencrop`` (corners and centre of a 10 % larger crop).
        flip: also encode the mirror image of every crop.
        batch_size: images per encoder call (times the views per image).
        val_fraction: share of ``image_dir``'s images held out as ``val``, spread evenly over the
            sorted list (so over classes); ignored when ``val_dir`` is given; 0: no val split.
        val_dir: a separate image folder with the same class subfolders, written as the ``val`` split.
        skip_bad: skip unreadable images (each reported by path) instead of stopping at the first.
        resume: continue an interrupted run in ``out_dir``; same settings and ``batch_size`` give
            byte-identical shards to an uninterrupted run.
        device: where to encode (default: CUDA when present, else CPU).
        num_workers: processes decoding and cropping images.
        shard_size: samples per shard file.
        allow_empty: finish even if no image could be read (otherwise zero samples is an error).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    _check_flags(crop, batch_size, shard_size, num_workers, image_size, val_fraction)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = load_tokenizer(tokenizer, weights, image_size).to(dev)
    if tok.image_size[0] != tok.image_size[1]:
        raise ValueError(f"tokenize crops square images, but the tokenizer takes {tok.image_size}")
    size = tok.image_size[0]
    classes, train_items, val_items = split_images(image_dir, val_dir, val_fraction)
    per_image = {"adm": 1, "tencrop": 5}[crop] * (2 if flip else 1)
    info = {  # what a resumed run must share with this one
        "source": str(image_dir.resolve()), "tokenizer": str(tokenizer),
        "weights": str(weights) if weights is not None else None, "image_size": size, "crop": crop, "flip": flip,
        "val": str(Path(val_dir).resolve()) if val_dir is not None else val_fraction,
        "samples_per_image": per_image, "images": {"train": len(train_items), "val": len(val_items)},
        "image_list_sha256": image_list_digest(train_items, image_dir, val_items, Path(val_dir or image_dir)),
    }
    if resume:
        check_resume(out_dir, info, ("source", "tokenizer", "image_size", "crop", "flip", "val", "image_list_sha256"))
    skipped = []
    with ShardWriter(
        out_dir, tok.codebook_size, *tok.grid, len(classes), classes, shard_size=shard_size, resume=resume, info=info
    ) as w:
        for split, split_items, crop_, flip_, m in (
            ("train", train_items, crop, flip, per_image),
            ("val", val_items, "adm", False, 1),
        ):
            dataset = ImageViews(split_items, size, tok.channels, crop_, flip_)
            skipped += _tokenize_split(w, split, dataset, m, tok, batch_size, num_workers, dev, skip_bad)
        w.close()
        if not allow_empty and not w.num_samples("train") + w.num_samples("val"):
            raise ValueError(
                f"{image_dir}: no image could be read ({len(skipped)} skipped), so {out_dir} would hold no samples; "
                "fix the images, or pass allow_empty=True (--allow_empty true)"
            )
    _report(w, len(classes), out_dir, skipped)
    return out_dir


def _check_flags(crop: str, batch_size: int, shard_size: int, num_workers: int, image_size: int | None,
                 val_fraction: float) -> None:
    if crop not in ("adm", "tencrop"):
        raise ValueError(f"crop must be 'adm' or 'tencrop', got {crop!r}")
    positive_int("batch_size", batch_size)
    positive_int("shard_size", shard_size)
    positive_int("num_workers", num_workers, minimum=0)
    if image_size is not None:
        positive_int("image_size", image_size)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def split_images(image_dir: Path, val_dir: Path | None, val_fraction: float) -> tuple[list[str], list, list]:
    """``(classes, train items, val items)``: ``val_dir``'s images, or every ``1 / val_fraction``-th image."""
    classes, items = list_images(image_dir)
    if val_dir is not None:
        val_classes, val_items = list_images(Path(val_dir))
        if val_classes != classes:
            raise ValueError(
                f"{val_dir} has classes {val_classes[:5]}... but {image_dir} has {classes[:5]}...; "
                "both need the same class subfolders"
            )
        return classes, items, val_items
    held = [math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) for i in range(len(items))]
    val_items = [x for x, h in zip(items, held) if h]
    if val_fraction and not val_items:
        raise ValueError(f"val_fraction {val_fraction} of {len(items)} images holds out none; raise it or pass val_dir")
    return classes, [x for x, h in zip(items, held) if not h], val_items


def grey_splits(image_dir: Path, image_size: int, val_fraction: float, val_dir: Path | None = None):
    """``(classes, (train images, labels), (val images, labels))`` of an image folder, as grey uint8
    ``(N, S, S)`` arrays: each image ADM-centre-cropped to ``image_size``. For the small networks
    (``rar-llm train-vq`` / ``train-classifier``) that take Fashion-MNIST's arrays; an unreadable image is
    a ValueError naming it."""
    positive_int("image_size", image_size)
    if not 0 < val_fraction < 1 and val_dir is None:
        raise ValueError(f"val_fraction must be in (0, 1) to hold out images (or give val_dir), got {val_fraction}")
    classes, train, val = split_images(Path(image_dir), val_dir, val_fraction)

    def arrays(items):
        out = np.empty((len(items), image_size, image_size), np.uint8)
        for i, (path, _) in enumerate(tqdm(items, desc="reading images", unit="img", leave=False)):
            try:
                with Image.open(path) as img:
                    out[i] = np.asarray(center_crop_adm(to_8bit(img, "L"), image_size))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable image ({e}); remove or replace it") from None
        return out, np.array([label for _, label in items], np.int64)

    return classes, arrays(train), arrays(val)


def grey_train_test(source_dir: Path | None, image_dir: Path | None, image_size: int, val_fraction: float):
    """What the small networks train and test on: ``(train images, labels, test images, labels, classes, what)``
    from Fashion-MNIST's IDX files (``source_dir``, the default) or an image folder (``image_dir``: one
    subfolder per class, every ``1 / val_fraction``-th image held out)."""
    if image_dir is None:
        from rar_llm.data.fashion import CLASS_NAMES, load_split

        (train, labels), (test, test_labels) = load_split(source_dir, "train"), load_split(source_dir, "test")
        return train, labels, test, test_labels, list(CLASS_NAMES), "test"
    if source_dir is not None:
        raise ValueError("give --image_dir or --source_dir (Fashion-MNIST's IDX files), not both")
    classes, (train, labels), (test, test_labels) = grey_splits(image_dir, image_size, val_fraction)
    return train, labels, test, test_labels, classes, f"every {round(1 / val_fraction)}th image of {image_dir}"


def _report(writer: ShardWriter, num_classes: int, out_dir: Path, skipped: list[Path]) -> None:
    counts = {s: writer.num_samples(s) for s in ("train", "val")}
    print(f"Wrote {counts['train']} train and {counts['val']} val samples of {num_classes} classes to {out_dir}")
    if skipped:
        more = " ..." if len(skipped) > 5 else ""
        print(f"Skipped {len(skipped)} unreadable images: {', '.join(map(str, skipped[:5]))}{more}")
