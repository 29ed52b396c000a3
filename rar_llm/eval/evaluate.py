"""How good are generated code grids? Sample quality, memorisation and held-out likelihood.

Two scales:

* Small pixel-code data (scikit-learn's digits, pixel tokenizers): :func:`evaluate`. Features come
  from an MLP trained here on the real training images, since no pretrained network knows 8x8
  digits. Every figure for the samples is printed next to the same figure for real held-out
  images, the floor a perfect generator would reach with as many images.
* 256x256 images (RAR's ImageNet setting): ``rar_llm.eval.inception.inception_metrics``, FID / IS /
  precision / recall on the TF Inception-v3 of 2015-12-05 as NVIDIA's TorchScript.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from litgpt.model import GPT

from rar_llm.tokenizers.draw import CodeDecoder, check_drawable, to_pixels
from rar_llm.eval.classifier import Classifier, CNNClassifier, fit_classifier
from rar_llm.eval.inception import inception_metrics, load_images, to_uint8
from rar_llm.eval.metrics import copies, frechet_distance, nearest_distance, precision_recall
from rar_llm.permute import IGNORE_INDEX, interleave
from rar_llm.data.shards import Shards, read_meta
from rar_llm.vocab import VocabLayout

NLL_ORDERS = ("raster", "random")


# ---- held-out likelihood ------------------------------------------------------------------------------
@torch.inference_mode()
def heldout_nll(
    model: GPT,
    data: Path | str | Shards,
    layout: VocabLayout,
    order: str = "raster",
    seed: int = 0,
    split: str = "val",
    batch_size: int = 64,
) -> float:
    """Mean negative log-likelihood of a split's codes (``data``: a data folder, or its opened split), in bits per code.

    Each image is one ``interleave`` sequence, conditioned on its true class, in raster order or in a
    random order per image drawn from ``seed``. The softmax runs over the code logits only (what the
    sampler draws from), so a model that knows nothing scores ``log2(codebook_size)``.
    """
    if order not in NLL_ORDERS:
        raise ValueError(f"order={order!r}: held-out NLL is measured in one of {list(NLL_ORDERS)}")
    layout.check_model(model.config)
    if model.max_seq_length < layout.seq_len:
        raise ValueError(
            f"model.max_seq_length={model.max_seq_length} is shorter than the {layout.seq_len} tokens of an "
            f"image sequence; set model.max_seq_length = {layout.seq_len}"
        )
    shards = data if isinstance(data, Shards) else Shards(data, split)
    rng = np.random.default_rng(seed)
    device = model.lm_head.weight.device
    codes = slice(layout.code_offset, layout.class_offset)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(shards), batch_size):
            rows = []
            for i in range(start, min(start + batch_size, len(shards))):
                grid, class_id = shards[i]
                perm = rng.permutation(layout.num_positions) if order == "random" else None
                rows.append(interleave(layout, class_id, grid, perm))
            ids = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
            targets = torch.from_numpy(np.stack([r[1] for r in rows]))[:, 1:].to(device)
            logits = model(ids)[:, :-1, codes]
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(
                logits[keep].double(), targets[keep] - layout.code_offset, reduction="sum"
            ).item()
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / count / math.log(2)


# ---- small-scale entry --------------------------------------------------------------------------------
def data_layout(data_dir: Path, layout: VocabLayout | None) -> VocabLayout:
    """The data's layout, or the given one (a model's) after checking it describes the data."""
    meta = read_meta(data_dir)
    if layout is None:
        return VocabLayout.from_meta(meta)
    layout.check_meta(meta, where=f"{Path(data_dir) / 'meta.json'}")
    return layout


def check_classifier(classifier, layout: VocabLayout, tokenizer: CodeDecoder | None, name: str = "the classifier") -> None:
    """Raise unless a feature network of a fixed image size (the CNN) takes the images the codes decode to."""
    side = getattr(classifier, "image_size", None)
    if side is None:
        return
    pixels = tuple(getattr(tokenizer, "image_size", (layout.height, layout.width)))
    channels = getattr(tokenizer, "channels", 1)
    if (channels, *pixels) != (1, side, side):
        raise ValueError(f"{name} takes grey {side}x{side} images but the codes decode to {channels}x"
                         f"{'x'.join(map(str, pixels))}; give the classifier trained on this data's images")


def nll_metrics(model: GPT, val: Shards, layout: VocabLayout, seed: int) -> dict:
    """Held-out bits per code in raster and in random order."""
    return {f"nll_{order}_bits": heldout_nll(model, val, layout, order, seed) for order in NLL_ORDERS}


def finite_json(metrics: dict) -> str:
    """``metrics`` as strict JSON: a non-finite figure (NaN, inf) becomes null, with a warning naming it."""

    def clean(x, key: str):
        if isinstance(x, dict):
            return {k: clean(v, f"{key}.{k}" if key else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, key) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            print(f"warning: metric {key} is {x} (too few samples, or a degenerate model); written as null")
            return None
        return x

    return json.dumps(clean(metrics, ""), indent=2, allow_nan=False) + "\n"


def _all_codes(shards: Shards) -> np.ndarray:
    return np.concatenate([np.asarray(c) for c in shards.codes]).astype(np.int64)


def _image_scores(
    codes: np.ndarray, images: np.ndarray, classes: np.ndarray, clf: Classifier,
    train_codes: np.ndarray, train_images: np.ndarray,
) -> dict:
    """What each image says on its own: does it look like its class, is it a training image."""
    return {
        "consistency": float((clf.predict(images) == classes).mean()),
        "copies": float(copies(codes, train_codes).mean()),
        "nn_distance": float(nearest_distance(images, train_images).mean()),
    }


def _set_scores(images: np.ndarray, feats: np.ndarray, ref_images: np.ndarray, ref_feats: np.ndarray) -> dict:
    """How a set of images compares with the held-out images as a distribution."""
    precision, recall = precision_recall(ref_feats, feats)
    return {
        "fd_features": frechet_distance(feats, ref_feats),
        "fd_pixels": frechet_distance(images, ref_images),
        "precision": precision,
        "recall": recall,
    }


def evaluate(
    samples_codes: np.ndarray,
    sample_classes: np.ndarray,
    data_dir: Path | str,
    model: GPT | None = None,
    layout: VocabLayout | None = None,
    seed: int = 0,
    tokenizer: CodeDecoder | None = None,
    classifier: Classifier | None = None,
) -> dict:
    """All small-scale metrics of generated code grids against a data folder's train and val splits.

    Returns a flat dict of the samples' figures and, under ``"real"``, the same figures for real
    images: the Fréchet distances and precision/recall of as many training images as samples
    against the held-out split (the floor), and consistency / memorisation of the held-out images.

    fd_features, fd_pixels: Fréchet distance to the held-out images on MLP features / raw pixels.
    precision, recall: improved precision/recall (k=3) on MLP features, against the held-out images.
    consistency: share of images the MLP assigns to their (conditioning) class.
    copies: share of images equal to a training image in every code.
    nn_distance: mean L2 pixel distance to the nearest training image.
    nll_raster_bits, nll_random_bits (with ``model``): held-out bits per code, see :func:`heldout_nll`.

    Args:
        samples_codes: ``(N, H, W)`` generated codes.
        sample_classes: ``(N,)`` the class each sample was conditioned on.
        data_dir: the data folder the model was trained on (its train split trains the MLP).
        model: a litgpt GPT for the held-out NLL (None: skipped).
        layout: the model's vocabulary layout (None: the model's own, else the data's, image-only).
        seed: the MLP's training, the floor's training subset and the random NLL order.
        tokenizer: decodes codes to pixels (None: the digits' 17 greys, see ``to_pixels``). The whole
            train split is decoded, so this is for small data; use :func:`inception_metrics` at 256x256.
        classifier: a fitted feature network with ``features`` and ``predict`` (e.g.
            ``rar_llm.eval.classifier.CNNClassifier`` for Fashion-MNIST); None fits the pixel MLP here.
    """
    data_dir = Path(data_dir)
    layout = data_layout(data_dir, layout if layout is not None or model is None else getattr(model, "layout", None))
    check_drawable(layout, tokenizer)
    check_classifier(classifier, layout, tokenizer)
    codes = np.asarray(samples_codes).astype(np.int64)
    classes = np.asarray(sample_classes).astype(np.int64).reshape(-1)
    if codes.ndim != 3 or codes.shape[1:] != (layout.height, layout.width) or len(codes) != len(classes):
        raise ValueError(
            f"expected samples_codes (N, {layout.height}, {layout.width}) and N sample_classes, got "
            f"{codes.shape} and {classes.shape}"
        )
    layout.check_codes(codes, "samples_codes")
    layout.class_tokens(classes)

    def pixels(c: np.ndarray) -> np.ndarray:
        return to_pixels(torch.from_numpy(c), layout, tokenizer).numpy()

    train, val = Shards(data_dir, "train"), Shards(data_dir, "val")
    train_codes, val_codes = _all_codes(train), _all_codes(val)
    train_images, val_images, images = pixels(train_codes), pixels(val_codes), pixels(codes)
    clf = classifier if classifier is not None else fit_classifier(train_images, train.labels, seed=seed, num_classes=layout.num_classes)
    val_feats = clf.features(val_images)
    floor = np.random.default_rng(seed).choice(len(train), size=min(len(codes), len(train)), replace=False)

    metrics: dict = {}
    if model is not None:
        metrics |= nll_metrics(model, val, layout, seed)
    metrics |= _set_scores(images, clf.features(images), val_images, val_feats)
    metrics |= _image_scores(codes, images, classes, clf, train_codes, train_images)
    metrics |= {"num_samples": len(codes), "num_heldout": len(val)}
    real = _set_scores(train_images[floor], clf.features(train_images[floor]), val_images, val_feats)
    metrics["real"] = real | _image_scores(val_codes, val_images, val.labels, clf, train_codes, train_images)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A two-column table: the samples' figure next to the real images' figure."""
    real = metrics.get("real", {})
    lines = [f"{'metric':18s} {'samples':>10s} {'real':>10s}"]
    for key, value in metrics.items():
        if isinstance(value, dict):
            continue
        other = real.get(key)
        lines.append(f"{key:18s} {value:>10.4g} " + (f"{other:>10.4g}" if other is not None else f"{'':>10s}"))
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------------
def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; `rar-llm sample` writes codes.npy and labels.npy (or name them)")
    return np.load(path, allow_pickle=False)


def evaluate_cli(
    checkpoint_dir: Path | None,
    data_dir: Path,
    codes_npy: Path,
    labels_npy: Path | None = None,
    out: Path | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    inception_weights: Path | None = None,
    reference: Path | None = None,
    batch_size: int = 50,
    device: str = "cpu",
    overwrite: bool = False,
    classifier: Path | None = None,
) -> dict:
    """Score generated codes (``rar-llm sample``'s codes.npy / labels.npy) and write ``metrics.json``.

    Without ``inception_weights``: the small-scale metrics of :func:`evaluate` (digits, pixel codes).
    With them: FID / IS / precision / recall of the decoded samples against ``reference`` images.
    Either way, with a checkpoint the held-out NLL (bits per code, raster and random order) is added.

    Args:
        checkpoint_dir: the model's checkpoint folder, for the NLL (None: no NLL).
        data_dir: the data folder the model was trained on.
        codes_npy: ``(N, H, W)`` generated codes.
        labels_npy: ``(N,)`` their classes (default: labels.npy beside codes_npy).
        out: the metrics file (default: metrics.json beside codes_npy); never overwritten unless asked.
        seed: the feature MLP, the floor's subset, the random NLL order.
        tokenizer: decodes codes to pixels: a ``rar_llm.tokenizers`` name or weights file (None: digits greys).
        inception_weights: local ``inception-2015-12-05.pt`` (see ``load_inception``) for 256x256 metrics.
        reference: real uint8 images (N, H, W, 3) as .npy or ADM .npz, needed with inception_weights.
        batch_size: images per forward pass (Inception, decoding).
        device: torch device of the model, the tokenizer and Inception.
        overwrite: replace an existing metrics file.
        classifier: a CNN from ``rar-llm train-classifier`` (Fashion-MNIST) as the feature network
            (None: an MLP fitted on the training split here).
    """
    codes_npy = Path(codes_npy)
    labels_npy = codes_npy.with_name("labels.npy") if labels_npy is None else Path(labels_npy)
    out = codes_npy.with_name("metrics.json") if out is None else Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --out elsewhere or --overwrite true")
    if inception_weights is not None and reference is None:
        raise ValueError("--inception_weights needs --reference: real uint8 images (.npy, or ADM's .npz with arr_0)")
    codes = _load_npy(codes_npy)
    layout = data_layout(Path(data_dir), VocabLayout.from_checkpoint(checkpoint_dir) if checkpoint_dir else None)
    tok_arg, clf_arg = tokenizer, classifier
    if tokenizer is not None:
        from rar_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    check_drawable(layout, tokenizer, f"--tokenizer {tok_arg}")
    if classifier is not None:
        classifier = CNNClassifier.load(classifier)
        check_classifier(classifier, layout, tokenizer, f"--classifier {clf_arg}")
    model = None
    if checkpoint_dir is not None:  # every file checked: now the weights
        from rar_llm.checkpoint import load_model

        model = load_model(checkpoint_dir, device, torch.float32)  # likelihoods in float32

    if inception_weights is None:
        metrics = evaluate(codes, _load_npy(labels_npy), data_dir, model, layout, seed, tokenizer, classifier)
    else:
        decoder = tokenizer.to(device) if tokenizer is not None else None
        images = np.concatenate([
            to_uint8(to_pixels(c.to(device), layout, decoder))
            for c in torch.from_numpy(codes.astype(np.int64)).split(batch_size)
        ])
        metrics = {}
        if model is not None:
            metrics |= nll_metrics(model, Shards(data_dir, "val"), layout, seed)
        metrics |= inception_metrics(images, load_images(reference), inception_weights, batch_size, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(finite_json(metrics))
    print(format_metrics(metrics))
    print(f"Wrote {out}")
    return metrics
