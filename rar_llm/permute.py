"""RAR's annealed random order, written as position tokens so the network stays a plain causal LM.

A sample becomes ``[class, pos_a, code_a, pos_b, code_b, ...]``: each position token announces the
cell whose code follows it (RandAR's "position instruction"), which replaces RAR's target-aware
positional embedding. With probability ``r(progress)`` the cells come in a uniformly random order,
otherwise in raster order. Loss is taken only where a code is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rar_llm.vocab import VocabLayout

IGNORE_INDEX = -100


def anneal_r(progress: float, start: float = 0.5, end: float = 0.75, r_end: float = 0.0) -> float:
    """Probability of a random order at a point of training (RAR Eq. 5).

    ``progress`` is the share of training done, in [0, 1]. r = 1 until ``start``, then linear down to
    ``r_end`` at ``end``, then ``r_end``. ``start == end`` is a step.
    """
    if not 0.0 <= start <= end:
        raise ValueError(f"annealing needs 0 <= start <= end, got start={start}, end={end}")
    if not 0.0 <= r_end <= 1.0:
        raise ValueError(f"r_end must be in [0, 1], got {r_end}")
    if progress < start:
        return 1.0
    if progress >= end:
        return r_end
    return 1.0 + (r_end - 1.0) * (progress - start) / (end - start)


@dataclass(frozen=True)
class Permutation:
    """Settings of the training transform (the data module's knobs).

    anneal_start, anneal_end: share of training where r starts falling from 1 and reaches r_end.
    r_end: share of random orders kept after the anneal (RAR: 0; >0 keeps random-order skills for
      any-order and parallel decoding).
    class_dropout: share of samples whose class becomes the null class (classifier-free guidance).
    seed: with the sample's global draw number, fixes its order and dropout.
    noise: reAR's noisy context (arXiv 2510.04450), a training-only regulariser: each code token of
      the *input* is replaced by a uniformly random code with this probability, while the labels keep
      the true codes, so the model learns to predict the right code after its own sampling errors.
      Class and position tokens are never touched; 0 (the default) draws nothing extra, so existing
      runs are unchanged.
    """

    anneal_start: float = 0.5
    anneal_end: float = 0.75
    r_end: float = 0.0
    class_dropout: float = 0.1
    seed: int = 0
    noise: float = 0.0

    def __post_init__(self) -> None:
        anneal_r(0.0, self.anneal_start, self.anneal_end, self.r_end)  # validates
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")

    def r(self, progress: float) -> float:
        return anneal_r(progress, self.anneal_start, self.anneal_end, self.r_end)

    def rng(self, draw: int) -> np.random.Generator:
        """The random stream of one sample, from the seed and its global draw number."""
        return np.random.default_rng([self.seed, int(draw)])

    def __call__(
        self, layout: VocabLayout, class_id: int, codes: np.ndarray, progress: float, draw: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``labels`` of one training sample at a point of training."""
        rng = self.rng(draw)
        n = layout.num_positions
        order = rng.permutation(n) if rng.random() < self.r(progress) else None
        if self.class_dropout and rng.random() < self.class_dropout:
            class_id = None
        ids, labels = interleave(layout, class_id, codes, order)
        if self.noise:
            corrupt(ids, layout, self.noise, rng)
        return ids, labels


def corrupt(ids: np.ndarray, layout: VocabLayout, p: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each code token of an ``interleave`` input (slots 2, 4, ...) by a uniformly random code
    with probability ``p``, in place; returns the mask of corrupted slots. Labels are not touched."""
    hit = rng.random(layout.num_positions) < p
    ids[2::2][hit] = layout.code_offset + rng.integers(0, layout.codebook_size, int(hit.sum()))
    return hit


def interleave(
    layout: VocabLayout, class_id: int | None, codes: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``[class, pos_a, code_a, ...]`` and its labels (codes where predicted, else -100).

    ``codes`` is the grid (any shape with H*W cells, raster order); ``order`` lists the cells in the
    order they are written (None: raster); ``class_id`` None is the null class.
    """
    flat = np.asarray(codes).reshape(-1)
    n = layout.num_positions
    if flat.shape[0] != n:
        raise ValueError(f"expected {n} codes ({layout.height}x{layout.width} grid), got {flat.shape[0]}")
    layout.check_codes(flat)
    if order is None:
        order = np.arange(n)
    ids = np.empty(1 + 2 * n, dtype=np.int64)
    ids[0] = layout.class_token(class_id)
    ids[1::2] = layout.pos_offset + order
    ids[2::2] = layout.code_offset + flat[order].astype(np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[2::2] = ids[2::2]
    return ids, labels
