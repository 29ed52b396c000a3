import numpy as np
import pytest
from scipy.stats import chi2

from rar_llm.permute import IGNORE_INDEX, Permutation, anneal_r, interleave
from rar_llm.vocab import VocabLayout

LAYOUT = VocabLayout.load("digits")  # 8x8 grid, 17 codes, 10 classes


def grid(seed=0):
    return np.random.default_rng(seed).integers(0, 17, size=(8, 8))


def order_of(ids):
    return ids[1::2] - LAYOUT.pos_offset


@pytest.mark.parametrize(
    "progress, r",
    [(0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.5 + 1e-9, 1.0), (0.625, 0.5), (0.75 - 1e-9, 0.0), (0.75, 0.0), (1.0, 0.0)],
)
def test_schedule_boundaries(progress, r):
    assert anneal_r(progress) == pytest.approx(r, abs=1e-6)


def test_schedule_with_r_end_and_step():
    assert anneal_r(0.625, r_end=0.2) == pytest.approx(0.6)
    assert anneal_r(0.9, r_end=0.2) == 0.2
    assert anneal_r(0.49, start=0.5, end=0.5) == 1.0 and anneal_r(0.5, start=0.5, end=0.5) == 0.0
    with pytest.raises(ValueError, match="start <= end"):
        anneal_r(0.1, start=0.8, end=0.5)
    with pytest.raises(ValueError, match="r_end"):
        Permutation(r_end=1.5)


def test_raster_when_r_is_zero():
    p = Permutation(class_dropout=0.0)
    for draw in range(50):
        ids, _ = p(LAYOUT, 3, grid(draw), progress=1.0, draw=draw)
        assert (order_of(ids) == np.arange(64)).all()
        assert ids[0] == LAYOUT.class_token(3)


def test_random_orders_are_uniform_when_r_is_one():
    """Chi-square: at every 8th slot, each of the 64 cells is equally likely."""
    p = Permutation(class_dropout=0.0)
    n = 6400
    orders = np.stack([order_of(p(LAYOUT, 0, grid(), progress=0.0, draw=d)[0]) for d in range(n)])
    for slot in range(0, 64, 8):
        counts = np.bincount(orders[:, slot], minlength=64)
        stat = ((counts - n / 64) ** 2 / (n / 64)).sum()
        assert stat < chi2.ppf(0.999, df=63), f"slot {slot}: chi-square {stat:.1f}"
    # every sample is a permutation, and none of them is the raster order
    assert (np.sort(orders, axis=1) == np.arange(64)).all()
    assert not (orders == np.arange(64)).all(axis=1).any()


def test_share_of_random_orders_follows_r():
    p = Permutation(class_dropout=0.0)
    n = 4000
    random = sum(not (order_of(p(LAYOUT, 0, grid(), 0.625, d)[0]) == np.arange(64)).all() for d in range(n))
    assert abs(random / n - 0.5) < 4 * np.sqrt(0.25 / n)


def test_each_position_token_announces_the_code_after_it():
    codes = grid(7)
    ids, labels = interleave(LAYOUT, 5, codes, np.random.default_rng(1).permutation(64))
    assert len(ids) == LAYOUT.seq_len == 129
    rebuilt = np.full(64, -1)
    rebuilt[ids[1::2] - LAYOUT.pos_offset] = ids[2::2] - LAYOUT.code_offset
    assert (rebuilt == codes.reshape(-1)).all()
    # labels: -100 exactly at the class and position tokens, the code itself elsewhere
    is_code = (ids >= LAYOUT.code_offset) & (ids < LAYOUT.code_offset + LAYOUT.codebook_size)
    assert (labels[~is_code] == IGNORE_INDEX).all() and (labels[is_code] == ids[is_code]).all()
    assert is_code.sum() == 64 and not is_code[0] and is_code[2::2].all()


def test_deterministic_per_draw_and_seed():
    p = Permutation(seed=3)
    a = p(LAYOUT, 1, grid(), 0.1, draw=12)[0]
    assert (a == p(LAYOUT, 1, grid(), 0.1, draw=12)[0]).all()
    assert not (a == p(LAYOUT, 1, grid(), 0.1, draw=13)[0]).all()
    assert not (a == Permutation(seed=4)(LAYOUT, 1, grid(), 0.1, draw=12)[0]).all()


def test_class_dropout_rate():
    p = Permutation(class_dropout=0.1)
    n = 4000
    dropped = sum(p(LAYOUT, 2, grid(), 1.0, d)[0][0] == LAYOUT.null_class for d in range(n))
    assert abs(dropped / n - 0.1) < 4 * np.sqrt(0.09 / n)


def test_bad_codes_and_classes_are_rejected():
    bad = grid()
    bad[2, 3] = 17
    with pytest.raises(ValueError, match="code 17 is outside the codebook"):
        interleave(LAYOUT, 0, bad)
    with pytest.raises(ValueError, match="class id 11"):
        interleave(LAYOUT, 11, grid())
    with pytest.raises(ValueError, match="expected 64 codes"):
        interleave(LAYOUT, 0, np.zeros((4, 4), dtype=int))
