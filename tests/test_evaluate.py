import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from litgpt.model import GPT

from rar_llm.eval.classifier import fit_classifier
from rar_llm.eval.evaluate import evaluate, evaluate_cli, heldout_nll
from rar_llm.eval.inception import (
    INCEPTION_FILE,
    INCEPTION_URL,
    inception_metrics,
    inception_score,
    load_inception,
    to_uint8,
)
from rar_llm.eval.metrics import copies, frechet_distance, frechet_from_stats, nearest_distance, precision_recall
from rar_llm.tokenizers.draw import to_pixels
from rar_llm.checkpoint import init_weights, model_config
from rar_llm.data.shards import Shards
from rar_llm.vocab import VocabLayout

LAYOUT = VocabLayout.load("digits")


@pytest.fixture(scope="module")
def splits(digits_dir):
    """(codes, labels) of the train and val splits as arrays."""
    out = {}
    for split in ("train", "val"):
        s = Shards(digits_dir, split)
        out[split] = (np.concatenate([np.asarray(c) for c in s.codes]).astype(np.int64), s.labels)
    return out


@pytest.fixture(scope="module")
def held_out_as_samples(digits_dir, splits):
    """evaluate() on the held-out images themselves, with their classes shuffled."""
    codes, labels = splits["val"]
    return evaluate(codes, np.random.default_rng(0).permutation(labels), digits_dir, seed=0)


def test_frechet_known_values():
    x = np.random.default_rng(0).normal(size=(500, 8)) * np.arange(1, 9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + 3.0) == pytest.approx(8 * 9.0, rel=1e-9)  # same covariance: |shift|^2
    # diagonal Gaussians: sum of (mu1 - mu2)^2 + (s1 - s2)^2
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = 1.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = frechet_from_stats(np.zeros(3), np.diag(v1), np.array([1.0, 0.0, 0.0]), np.diag(v2))
    assert got == pytest.approx(want, rel=1e-12)
    # a rank-deficient covariance (fewer samples than features) stays real and finite
    few = np.random.default_rng(1).normal(size=(5, 20))
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


def test_precision_recall_known_sets():
    x = np.random.default_rng(0).normal(size=(200, 4))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_classifier_is_deterministic_and_accurate(splits):
    (train, train_labels), (val, val_labels) = splits["train"], splits["val"]
    state = torch.random.get_rng_state()
    a = fit_classifier(train / 16.0, train_labels, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = fit_classifier(train / 16.0, train_labels, seed=0)
    np.testing.assert_array_equal(a.features(val / 16.0), b.features(val / 16.0))
    assert a.features(val / 16.0).shape == (len(val), 128)
    assert (a.predict(val / 16.0) == val_labels).mean() > 0.9
    with pytest.raises(ValueError, match="fitted on images of 64 values"):
        a.predict(np.zeros((2, 4, 4)))


def test_held_out_images_score_like_real_ones(held_out_as_samples):
    m = held_out_as_samples
    assert m["fd_features"] == pytest.approx(0.0, abs=1e-6)  # the same set as the reference
    assert m["fd_pixels"] == pytest.approx(0.0, abs=1e-6)
    assert m["precision"] == m["recall"] == 1.0
    assert m["copies"] == 0.0 and m["real"]["copies"] == 0.0
    assert m["nn_distance"] == pytest.approx(m["real"]["nn_distance"])
    assert m["nn_distance"] > 0.5
    assert m["real"]["consistency"] > 0.9
    assert 0 < m["real"]["fd_features"] and m["num_samples"] == m["num_heldout"] == 359
    assert "nll_raster_bits" not in m


def test_shuffled_labels_give_chance_consistency(held_out_as_samples):
    n, p = held_out_as_samples["num_samples"], 0.1
    assert abs(held_out_as_samples["consistency"] - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_copied_training_images_count_as_copies(digits_dir, splits):
    train, val = splits["train"][0], splits["val"][0]
    samples = np.concatenate([train[:5], val[:15]])
    np.testing.assert_array_equal(copies(samples, train), [True] * 5 + [False] * 15)
    d = nearest_distance(samples / 16.0, train / 16.0)
    assert np.all(d[:5] < 1e-6) and np.all(d[5:] > 0)

    m = evaluate(samples, np.concatenate([splits["train"][1][:5], splits["val"][1][:15]]), digits_dir)
    assert m["copies"] == pytest.approx(5 / 20)


def test_evaluate_rejects_bad_input(digits_dir):
    with pytest.raises(ValueError, match=r"expected samples_codes \(N, 8, 8\)"):
        evaluate(np.zeros((4, 4, 4), dtype=int), np.zeros(4, dtype=int), digits_dir)
    with pytest.raises(ValueError, match="outside the codebook"):
        evaluate(np.full((2, 8, 8), 17), np.zeros(2, dtype=int), digits_dir)
    with pytest.raises(ValueError, match="does not describe the data"):
        evaluate(np.zeros((2, 8, 8), dtype=int), np.zeros(2, dtype=int), digits_dir,
                 layout=VocabLayout(codebook_size=17, height=4, width=4, num_classes=10))


def test_nll_of_uniform_logits_is_log2_codebook(digits_dir):
    torch.manual_seed(0)
    model = GPT(model_config("rar-tiny", LAYOUT, n_layer=1))
    init_weights(model)
    model.max_seq_length = LAYOUT.seq_len
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform over the codes
    model.train()
    for order in ("raster", "random"):
        assert heldout_nll(model, digits_dir, LAYOUT, order=order) == pytest.approx(math.log2(17), abs=1e-9)
    assert model.training  # the caller's mode comes back
    with pytest.raises(ValueError, match="order='zcurve'"):
        heldout_nll(model, digits_dir, LAYOUT, order="zcurve")


def test_cli_writes_metrics_and_refuses_to_overwrite(digits_dir, tiny_checkpoint, splits, tmp_path):
    codes, labels = splits["val"]
    np.save(tmp_path / "codes.npy", codes[:40])
    np.save(tmp_path / "labels.npy", labels[:40])
    metrics = evaluate_cli(tiny_checkpoint, digits_dir, tmp_path / "codes.npy")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    assert 3.0 < saved["nll_raster_bits"] < 6.0 and 3.0 < saved["nll_random_bits"] < 6.0  # untrained: ~log2(17)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        evaluate_cli(tiny_checkpoint, digits_dir, tmp_path / "codes.npy")
    with pytest.raises(ValueError, match="needs --reference"):
        evaluate_cli(None, digits_dir, tmp_path / "codes.npy", out=tmp_path / "m.json", inception_weights=tmp_path)


def test_missing_inception_weights_say_where_to_get_them(tmp_path):
    for weights in (None, tmp_path / INCEPTION_FILE):
        with pytest.raises(FileNotFoundError) as e:
            load_inception(weights)
        for words in (INCEPTION_FILE, INCEPTION_URL, "--inception_weights"):
            assert words in str(e.value)
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / INCEPTION_FILE)):
        inception_metrics(images, images, tmp_path / INCEPTION_FILE)
    torch.save({"w": torch.zeros(1)}, tmp_path / "state_dict.pth")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_inception(tmp_path / "state_dict.pth")


class FakeInception(torch.nn.Module):
    """The call interface of NVIDIA's TorchScript Inception: uint8 (B, 3, H, W) in, features or probabilities out."""

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(img.float() / 255.0, 2).flatten(1)
        return x if return_features else torch.softmax(20.0 * x, dim=1)


def test_inception_route_with_a_stand_in_network(digits_dir, splits, tmp_path):
    torch.jit.script(FakeInception()).save(str(tmp_path / "fake.pt"))
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)  # grey is repeated
    m = inception_metrics(images, images, tmp_path / "fake.pt", batch_size=16)
    assert m["fid"] == pytest.approx(0.0, abs=1e-8)
    assert m["precision"] == m["recall"] == 1.0
    assert 1.0 <= m["inception_score"] <= 12
    with pytest.raises(ValueError, match="expected uint8 images"):
        inception_metrics(images.astype(np.float32), images, tmp_path / "fake.pt")

    # the CLI decodes the codes and scores them against an ADM-style .npz of the same images
    codes = splits["val"][0][:30]
    np.save(tmp_path / "codes.npy", codes)
    np.savez(tmp_path / "ref.npz", arr_0=to_uint8(to_pixels(torch.from_numpy(codes), LAYOUT)))
    m = evaluate_cli(None, digits_dir, tmp_path / "codes.npy", inception_weights=tmp_path / "fake.pt",
                     reference=tmp_path / "ref.npz")
    assert m["fid"] == pytest.approx(0.0, abs=1e-8) and m["num_samples"] == m["num_reference"] == 30
    np.savez(tmp_path / "bad.npz", images=np.zeros(1))
    with pytest.raises(ValueError, match="has no arr_0"):
        evaluate_cli(None, digits_dir, tmp_path / "codes.npy", out=tmp_path / "m.json",
                     inception_weights=tmp_path / "fake.pt", reference=tmp_path / "bad.npz")


def test_inception_score_known_values():
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert inception_score(one_hot, splits=1) == pytest.approx(10.0)
    assert inception_score(np.full((100, 10), 0.1), splits=5) == pytest.approx(1.0)
