"""The feature networks of the small-scale metrics: an MLP on pixels fitted at evaluation time (digits), and
a small CNN trained once on Fashion-MNIST's training images (``rar-llm train-classifier``).

The CNN's penultimate layer (128 values) is the feature space of the Fréchet distance and precision /
recall that :func:`rar_llm.eval.evaluate.evaluate` reports, in place of the digits' MLP: pass the fitted
network as ``evaluate(..., classifier=cnn)`` (``rar-llm evaluate --classifier cnn.safetensors``).
It trains on the original training images only; the test split measures it.

    rar-llm train-classifier --out cnn.safetensors [--tokenizer vq.safetensors]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rar_llm.nets import check_run, claim_net_files, load_net, save_net, shuffled_batches, write_report

FORMAT = "rar_llm-cnn"


class Classifier(nn.Module):
    """An MLP on pixels; its penultimate layer is the feature space of the Fréchet distance."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, int] = (256, 128)) -> None:
        super().__init__()
        self.in_features = in_features
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU()
        )
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"the classifier was fitted on images of {self.in_features} values, got {tuple(images.shape)}; "
                "pass images of the data it was fitted on"
            )
        return x

    @torch.inference_mode()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, ...)`` float images -> ``(N, hidden[1])`` float64 penultimate activations."""
        return self.body(self._inputs(images)).double().numpy()

    @torch.inference_mode()
    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, ...)`` float images -> ``(N,)`` class ids."""
        return self(self._inputs(images)).argmax(1).numpy()


def fit_classifier(
    train_images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    seed: int = 0,
    num_classes: int | None = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> Classifier:
    """Train the feature MLP on real images ``(N, ...)`` in [0, 1]; the same seed gives the same network.

    The global torch RNG is left as it was, so evaluating mid-training does not change the run. It
    trains on one thread: the matrices are so small that a second thread costs more than it gives
    on a busy machine, and the result does not depend on the thread count.
    """
    x = torch.as_tensor(np.asarray(train_images, dtype=np.float32)).flatten(1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least 2 training images with one label each, got {len(x)} images, {len(y)} labels")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clf = Classifier(x.shape[1], num_classes)
            opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
            order = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=order).split(batch_size):
                    loss = F.cross_entropy(clf(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return clf.eval()


class CNNClassifier(nn.Module):
    """Two conv + max-pool stages, a 128-wide feature layer, a linear head; same interface as the MLP."""

    def __init__(self, image_size: int = 28, num_classes: int = 10, width: int = 32, features: int = 128) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.config = {"image_size": image_size, "num_classes": num_classes, "width": width, "features": features}
        self.image_size = image_size
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, features), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(self.convs(x))))

    def _inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x[0].numel() != self.image_size ** 2:
            raise ValueError(f"the CNN takes grey {self.image_size}x{self.image_size} images, got {tuple(x.shape)}")
        return x.reshape(len(x), 1, self.image_size, self.image_size)

    @torch.inference_mode()
    def _run(self, images, fn, batch_size: int = 1000) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return torch.cat([fn(x) for x in self._inputs(images).split(batch_size)])
        finally:
            self.train(was)

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, ...)`` grey images in [0, 1] -> ``(N, features)`` float64 penultimate activations."""
        return self._run(images, lambda x: self.body(self.convs(x))).double().numpy()

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, ...)`` grey images in [0, 1] -> ``(N,)`` class ids."""
        return self._run(images, lambda x: self(x).argmax(1)).numpy()

    def accuracy(self, images, labels) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())

    def save(self, path: Path | str, report: dict | None = None) -> Path:
        return save_net(self, path, FORMAT, self.config, report)

    @classmethod
    def load(cls, path: Path | str) -> CNNClassifier:
        """A network written by :meth:`save`; any other file raises a ValueError naming it."""
        return load_net(cls, path, FORMAT, "CNN classifier", "train-classifier")


def fit_cnn(
    train_images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    num_classes: int = 10,
    epochs: float = 3.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
) -> CNNClassifier:
    """Train the CNN on grey images ``(N, ...)`` in [0, 1] (one-cycle cosine AdamW, random 1-pixel shifts
    and horizontal flips as augmentation). The global torch RNG is left as it was."""
    x = torch.as_tensor(np.asarray(train_images, dtype=np.float32))
    side = int(round(x[0].numel() ** 0.5))
    x = x.reshape(len(x), 1, side, side)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    steps = max(1, round(epochs * len(x) / batch_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = CNNClassifier(side, num_classes)
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        clf.train()
        for step, idx in zip(range(steps), shuffled_batches(len(x), batch_size, g)):
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"classifier step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return clf.eval()


def train_classifier(
    out: Path,
    source_dir: Path | None = None,
    tokenizer: Path | None = None,
    image_dir: Path | None = None,
    image_size: int = 28,
    val_fraction: float = 0.1,
    epochs: float = 3.0,
    seed: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the evaluation CNN on Fashion-MNIST's training images; report its test accuracy.

    ``image_dir`` trains it on an image folder instead (one subfolder per class, grey, ADM-centre-cropped to
    ``image_size``; every ``1 / val_fraction``-th image held out for the accuracy).

    With ``tokenizer`` (a ``rar-llm train-vq`` file) it also reports the accuracy on the test images
    after a round trip through the tokenizer, and their PSNR: what the tokenizer loses.
    Writes ``out`` (safetensors) and ``NAME.report.json`` beside it; ``overwrite`` replaces those two only.
    """
    from rar_llm.data.fashion import to_float
    from rar_llm.data.images import grey_train_test

    out, report_file = claim_net_files(out, overwrite)
    check_run(epochs, 128, 2e-3, threads)
    images, labels, test_images, test_labels, classes, held_out = grey_train_test(source_dir, image_dir, image_size,
                                                                                  val_fraction)
    if images.shape[1:] != test_images.shape[1:] or images.shape[1] != images.shape[2]:
        raise ValueError(f"{source_dir}: train images are {images.shape[1:]}, test images {test_images.shape[1:]}; "
                         "train-classifier needs square images of one size")
    tok = None
    if tokenizer is not None:  # read and checked before training, not after it
        from rar_llm.tokenizers.vq import VQTokenizer

        tok = VQTokenizer.load(tokenizer)
        if tok.image_size != images.shape[1:]:
            raise ValueError(f"--tokenizer {tokenizer} takes {tok.image_size} images but {source_dir} holds "
                             f"{images.shape[1:]}; give the tokenizer trained on these images")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    clf = fit_cnn(to_float(images), labels, num_classes=len(classes), epochs=epochs, seed=seed)
    report = {"test_accuracy": clf.accuracy(to_float(test_images), test_labels), "test": held_out,
              "classes": classes, "train_seconds": round(time.perf_counter() - t0), "epochs": epochs, "seed": seed}
    if tok is not None:
        from rar_llm.tokenizers.vq import reconstruction_report

        rec_report, rec = reconstruction_report(tok, to_float(test_images))
        report |= {"reconstructed_test_accuracy": clf.accuracy(rec, test_labels), "tokenizer": str(tokenizer),
                   "tokenizer_test": rec_report}
    clf.save(out, report)
    write_report(report_file, report)
    print(json.dumps(report, indent=1))
    print(f"Wrote {out} and its report {report_file}")
    return report
