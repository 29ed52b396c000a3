"""Fashion-MNIST import (on IDX files the tests write), the learned VQ tokenizer, the CNN, reAR's noisy context."""

import gzip
import json
import re
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")

from rar_llm.eval.classifier import CNNClassifier, fit_cnn, train_classifier  # noqa: E402
from rar_llm.data.rar import RARData  # noqa: E402
from rar_llm.data.fashion import FILES, fashion_mnist, load_split, read_idx  # noqa: E402
from rar_llm.permute import Permutation  # noqa: E402
from rar_llm.data.shards import ShardWriter, Shards, read_meta  # noqa: E402
from rar_llm.tokenizers import load_tokenizer  # noqa: E402
from rar_llm.tokenizers.train_vq import train_vq  # noqa: E402
from rar_llm.tokenizers.vq import VQTokenizer  # noqa: E402
from rar_llm.vocab import VocabLayout  # noqa: E402


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class shows as a bright bar at a class-dependent row, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 250
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_set(folder, n_train=40, n_test=20, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = fake_images(n, seed)
        for name, arr in zip(FILES[split], (images, labels)):
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory, idx_dir):
    """A tokenizer trained for a few steps on the fake set (k-means-initialised codebook)."""
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    torch.manual_seed(0)
    train_vq(path, source_dir=idx_dir, codebook_size=16, grid=7, width=8, dim=8, epochs=2, batch_size=20)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw_idx(tmp_path, gz):
    folder = write_set(tmp_path / "d", gz=gz)
    images, labels = load_split(folder, "train")
    want_images, want_labels = fake_images(40, 0)
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    assert load_split(folder, "test")[0].shape == (20, 28, 28)


def test_bad_files_give_one_clear_error_naming_them(tmp_path):
    folder = write_set(tmp_path / "d", gz=False)
    path = folder / "train-images-idx3-ubyte"
    good = path.read_bytes()

    path.write_bytes(good[:-100])  # truncated
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: truncated"):
        load_split(folder, "train")
    path.write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # wrong type byte (float)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: not an IDX file"):
        load_split(folder, "train")
    path.write_bytes(b"GIF89a" + good)  # not IDX at all
    with pytest.raises(ValueError, match="magic number"):
        read_idx(path)
    path.write_bytes(good[:10])  # truncated header
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(good + b"\x00")  # trailing bytes
    with pytest.raises(ValueError, match="longer than its header"):
        read_idx(path)
    path.write_bytes(gzip.compress(good)[:-50])  # a damaged gzip stream
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: not a readable gzip"):
        read_idx(path)
    path.write_bytes(good)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(39)))  # counts disagree
    with pytest.raises(ValueError, match="40 images but .* 39 labels"):
        load_split(folder, "train")
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((40, 1))))  # wrong dimensions
    with pytest.raises(ValueError, match="2 dimensions, expected 1"):
        load_split(folder, "train")


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*apt-get install"):
        load_split(tmp_path / "empty", "train")


def test_cli_error_is_one_line(tmp_path, capsys):
    from rar_llm.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["fashion-mnist", "--out_dir", str(tmp_path / "o"), "--source_dir", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rar-llm fashion-mnist: error:") and "apt-get install" in err and "\n" not in err


def test_vq_tokenizer_round_trips_its_saved_weights(vq_file, tmp_path, idx_dir):
    tok = load_tokenizer(vq_file)
    assert isinstance(tok, VQTokenizer) and tok.codebook_size == 16 and tok.grid == (7, 7)
    assert tok.report["num_images"] == 20 and 0 < tok.report["utilisation"] <= 1
    images = torch.from_numpy(load_split(idx_dir, "test")[0]).float().div(255).unsqueeze(1)
    codes = tok.encode(images)
    assert codes.shape == (20, 7, 7) and codes.dtype == torch.long
    assert len(codes.unique()) > 1  # the trained codebook is used, not collapsed to one code
    pixels = tok.decode(codes)
    assert pixels.shape == (20, 1, 28, 28) and 0 <= pixels.min() and pixels.max() <= 1
    again = VQTokenizer.load(tok.save(tmp_path / "copy.safetensors"))
    assert torch.equal(again.encode(images), codes)
    assert torch.equal(again.decode(codes), pixels)
    for k, v in tok.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_tokenizer(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="outside"):
        tok.decode(torch.full((1, 7, 7), 16))


def test_import_writes_train_and_the_held_out_test_split(vq_file, idx_dir, tmp_path):
    out = fashion_mnist(tmp_path / "data", tokenizer=str(vq_file), source_dir=idx_dir)
    meta = read_meta(out)
    assert (meta["codebook_size"], meta["height"], meta["width"], meta["num_classes"]) == (16, 7, 7, 10)
    assert len(Shards(out, "train")) == 40 and len(Shards(out, "val")) == 20
    tok = load_tokenizer(vq_file)
    test = torch.from_numpy(load_split(idx_dir, "test")[0]).float().div(255).unsqueeze(1)
    val = np.stack([Shards(out, "val")[i][0] for i in range(20)])
    np.testing.assert_array_equal(val, tok.encode(test).numpy())  # val is exactly the test split
    pixel = fashion_mnist(tmp_path / "pixel", tokenizer="pixel", source_dir=idx_dir)
    assert read_meta(pixel)["height"] == 28 and read_meta(pixel)["codebook_size"] == 256


def test_cnn_saves_loads_and_serves_evaluate(vq_file, idx_dir, tmp_path):
    from rar_llm.eval.evaluate import evaluate

    images, labels = load_split(idx_dir, "train")
    x = images.astype(np.float32) / 255
    clf = fit_cnn(x, labels, epochs=3, batch_size=20, log_every=0)
    again = CNNClassifier.load(clf.save(tmp_path / "cnn.safetensors", {"note": 1}))
    np.testing.assert_array_equal(again.features(x), clf.features(x))
    assert again.report == {"note": 1} and again.features(x).shape == (40, 128)
    data = fashion_mnist(tmp_path / "data", tokenizer=str(vq_file), source_dir=idx_dir)
    codes = np.stack([Shards(data, "val")[i][0] for i in range(20)])
    m = evaluate(codes, np.arange(20) % 10, data, tokenizer=load_tokenizer(vq_file), classifier=again)
    for key in ("fd_features", "precision", "recall", "consistency", "copies", "nn_distance"):
        assert key in m and key in m["real"]
    assert m["copies"] == 0.0


def test_noisy_context_changes_inputs_only():
    layout = VocabLayout(256, 7, 7, 10)
    codes = np.random.default_rng(0).integers(0, 256, (7, 7))
    clean, noisy = Permutation(seed=3), Permutation(seed=3, noise=0.25)
    changed, total = 0, 0
    for draw in range(400):
        for progress in (0.0, 0.9):  # random orders, then raster
            ids0, lab0 = clean(layout, 4, codes, progress, draw)
            ids1, lab1 = noisy(layout, 4, codes, progress, draw)
            np.testing.assert_array_equal(lab1, lab0)  # labels keep the true codes
            diff = np.flatnonzero(ids1 != ids0)
            assert np.all(diff % 2 == 0) and np.all(diff >= 2)  # only code slots (2, 4, ...)
            codes_in = ids1[2::2]
            assert np.all((codes_in >= layout.code_offset) & (codes_in < layout.code_offset + 256))
            changed += len(diff)
            total += layout.num_positions
    rate = changed / total  # 0.25 * (1 - 1/256): a random code can equal the true one
    assert abs(rate - 0.25 * 255 / 256) < 0.01


def test_noise_is_plumbed_through_the_data_module_and_checked(tmp_path):
    assert RARData(data_dir=tmp_path, total_samples=10, noise=0.3).permutation.noise == 0.3
    assert RARData(data_dir=tmp_path, total_samples=10).permutation.noise == 0.0
    with pytest.raises(ValueError, match="noise must be in"):
        Permutation(noise=1.0)
    # the noisy run's order and class dropout equal the clean run's (test above: only code slots differ),
    # so noise=0 draws nothing extra and earlier runs reproduce


def test_train_vq_report(vq_file):
    report = json.loads(vq_file.with_name("vq.report.json").read_text())
    for key in ("psnr_db", "utilisation", "perplexity", "codes_used", "train_utilisation"):
        assert key in report
    assert report["config"]["codebook_size"] == 16
    assert report["split"] == "test (20 held-out images)"  # what the split held, not a fixed figure


TINY_VQ = dict(codebook_size=16, grid=7, width=8, dim=8, epochs=0.1, batch_size=20)


@pytest.mark.parametrize("change, message", [
    (dict(epochs=0), "--epochs 0 must be a finite number > 0"),
    (dict(epochs=-3), "--epochs -3 must be a finite number > 0"),
    (dict(epochs=float("inf")), "--epochs inf must be a finite number > 0"),
    (dict(lr=float("nan")), "--lr nan must be a finite number > 0"),
    (dict(batch_size=-5), "batch_size must be an integer >= 1, got -5"),
    (dict(width=0), "width must be an integer >= 1, got 0"),
    (dict(dim=0), "dim must be an integer >= 1, got 0"),
    (dict(codebook_size=1), "codebook_size must be an integer >= 2, got 1"),
    (dict(grid=5), "grid 5 does not fit 28x28 images: image_size / grid must be 2 or 4 (grid 14 or 7)"),
    (dict(threads=0), "threads must be an integer >= 1, got 0"),
])
def test_train_vq_refuses_bad_flags_before_any_work(idx_dir, tmp_path, change, message):
    out = tmp_path / "vq.safetensors"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_vq(out, source_dir=idx_dir, **(TINY_VQ | change))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("train", ["vq", "classifier"])
def test_trainers_never_touch_a_file_they_do_not_write(idx_dir, tmp_path, train):
    side = tmp_path / "side"
    side.mkdir()
    (side / "model.json").write_text("the user's own")  # beside --out, but not the report's name
    run = (lambda out, **kw: train_vq(out, source_dir=idx_dir, **TINY_VQ, **kw)) if train == "vq" else \
        (lambda out, **kw: train_classifier(out, source_dir=idx_dir, epochs=0.1, **kw))
    run(side / "model.safetensors")
    assert (side / "model.json").read_text() == "the user's own"
    assert (side / "model.report.json").is_file()
    assert sorted(p.name for p in side.iterdir()) == ["model.json", "model.report.json", "model.safetensors"]
    (side / "model.safetensors").unlink()  # the report alone still blocks a second run
    with pytest.raises(FileExistsError, match="model.report.json already exists"):
        run(side / "model.safetensors")
    run(side / "model.safetensors", overwrite=True)
    assert (side / "model.json").read_text() == "the user's own"
    with pytest.raises(ValueError, match="name a .safetensors file"):
        run(side / "model.pt")


def test_train_classifier_checks_its_flags_and_tokenizer_before_training(idx_dir, vq_file, tmp_path, capsys):
    with pytest.raises(ValueError, match=re.escape("--epochs 0 must be a finite number > 0")):
        train_classifier(tmp_path / "c.safetensors", source_dir=idx_dir, epochs=0)
    bad = tmp_path / "not_vq.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not_vq.safetensors is not a readable safetensors file"):
        train_classifier(tmp_path / "c.safetensors", source_dir=idx_dir, tokenizer=bad)
    assert "classifier step" not in capsys.readouterr().out  # refused before the first training step
    assert not (tmp_path / "c.safetensors").exists()


def test_images_of_another_size_are_refused_when_read(tmp_path):
    folder = tmp_path / "idx32"
    folder.mkdir()
    for split in ("train", "test"):
        images, labels = np.zeros((4, 32, 32), np.uint8), np.arange(4, dtype=np.uint8)
        for name, arr in zip(FILES[split], (images, labels)):
            (folder / name).write_bytes(idx_bytes(arr))
    with pytest.raises(ValueError, match="holds 32x32 images; an MNIST-style set is 28x28"):
        train_vq(tmp_path / "vq.safetensors", source_dir=folder, **TINY_VQ)
    with pytest.raises(ValueError, match="holds 32x32 images"):
        train_classifier(tmp_path / "c.safetensors", source_dir=folder, epochs=0.1)


def test_an_existing_data_folder_is_refused_without_suggesting_a_resume_the_command_lacks(idx_dir, tmp_path):
    fashion_mnist(tmp_path / "data", source_dir=idx_dir)
    with pytest.raises(FileExistsError) as err:
        fashion_mnist(tmp_path / "data", source_dir=idx_dir)
    assert "already holds data" in str(err.value) and "resume" not in str(err.value)
    with pytest.raises(FileExistsError, match="pass --resume true to continue"):
        ShardWriter(tmp_path / "data", 256, 28, 28, 10)  # a writer whose command can resume says how


def test_tokenizer_and_classifier_files_are_checked_against_the_layout_before_any_work(
        vq_file, idx_dir, digits_dir, tiny_checkpoint, tmp_path):
    from rar_llm.eval.evaluate import evaluate_cli
    from rar_llm.tokenizers.draw import check_drawable

    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((10, 8, 8), np.int64))
    np.save(tmp_path / "labels.npy", np.arange(10))
    with pytest.raises(ValueError, match=f"--tokenizer {vq_file} has 16 codes on a 7x7 grid but the model's layout "
                                         "has 17 codes on 8x8"):
        evaluate_cli(tiny_checkpoint, digits_dir, codes, tokenizer=str(vq_file))
    cnn = fit_cnn(load_split(idx_dir, "train")[0] / 255, load_split(idx_dir, "train")[1], epochs=0.1, log_every=0)
    cnn_file = cnn.save(tmp_path / "cnn.safetensors")
    with pytest.raises(ValueError, match=f"--classifier {cnn_file} takes grey 28x28 images but the codes decode "
                                         "to 1x8x8"):
        evaluate_cli(tiny_checkpoint, digits_dir, codes, classifier=cnn_file)
    assert not (tmp_path / "metrics.json").exists()
    same_grid = VocabLayout(5000, 7, 7, 10)  # same grid, another codebook: decoding would be silently wrong
    with pytest.raises(ValueError, match="has 16 codes on a 7x7 grid but the model's layout has 5000 codes"):
        check_drawable(same_grid, load_tokenizer(vq_file))
    check_drawable(VocabLayout(16, 7, 7, 10), load_tokenizer(vq_file))  # the matching one passes


def test_sample_refuses_a_tokenizer_of_another_codebook_before_loading_weights(vq_file, tiny_checkpoint, tmp_path):
    from rar_llm.sampling.cli import sample

    with pytest.raises(ValueError, match=f"--tokenizer {vq_file} has 16 codes on a 7x7 grid"):
        sample(tiny_checkpoint, tmp_path / "s", tokenizer=str(vq_file))
    assert not (tmp_path / "s").exists()


def test_train_vq_and_classifier_on_an_image_folder(tmp_path):
    """Both small networks train on one's own images: a class per subfolder, any size and mode."""
    from PIL import Image

    from rar_llm.eval.classifier import CNNClassifier, train_classifier
    from rar_llm.tokenizers.vq import VQTokenizer

    rng = np.random.default_rng(0)
    for c, name in enumerate(["circles", "stripes", "noise"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(20):
            a = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) if c == 2 else np.zeros((40, 36, 3), np.uint8)
            if c == 1:
                a[::4] = 255
            if c == 0:
                yy, xx = np.mgrid[:40, :36]
                a[(yy - 20) ** 2 + (xx - 18) ** 2 < (6 + i % 5) ** 2] = 200
            Image.fromarray(a).convert("L" if i % 2 else "RGB").save(tmp_path / "imgs" / name / f"{i}.png")
    vq = train_vq(tmp_path / "vq.safetensors", image_dir=tmp_path / "imgs", image_size=28, val_fraction=0.1,
                  **TINY_VQ)
    report = json.loads((tmp_path / "vq.report.json").read_text())
    assert report["split"].startswith("every 10th image of") and "(6 held-out images)" in report["split"]
    assert VQTokenizer.load(vq).image_size == (28, 28)
    clf_report = train_classifier(tmp_path / "cnn.safetensors", image_dir=tmp_path / "imgs", tokenizer=vq, epochs=2)
    assert clf_report["classes"] == ["circles", "noise", "stripes"] and 0 <= clf_report["test_accuracy"] <= 1
    assert CNNClassifier.load(tmp_path / "cnn.safetensors")(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(ValueError, match="not both"):
        train_vq(tmp_path / "x.safetensors", image_dir=tmp_path / "imgs", source_dir=tmp_path, **TINY_VQ)
    with pytest.raises(ValueError, match="grid 7 does not fit 32x32 images"):
        train_vq(tmp_path / "y.safetensors", image_dir=tmp_path / "imgs", image_size=32, **TINY_VQ)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
