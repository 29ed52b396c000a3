import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rar_llm.prepare as prepare
from rar_llm.prepare import center_crop_adm, digits, import_jsonl, list_images, tokenize
from rar_llm.shards import Shards, read_meta
from rar_llm.tokenizers import PixelTokenizer, load_tokenizer


class Interrupt(Exception):
    """Stands for Ctrl-C or a killed job; not a ValueError, so nothing treats it as bad input."""


def interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` fail on its ``calls + 1``-th call, as if the run were stopped there."""
    original, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if len(seen) == calls:
            raise Interrupt
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def all_samples(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    s = Shards(data_dir, split)
    return np.concatenate([np.asarray(c) for c in s.codes]), s.labels


# ---- digits ------------------------------------------------------------------------------------------


def test_digits_round_trip_exactly_and_through_the_pixel_tokenizer(tmp_path):
    from sklearn.datasets import load_digits

    out = digits(tmp_path / "digits")
    meta = read_meta(out)
    tok = load_tokenizer(meta["info"]["tokenizer"])
    assert (meta["codebook_size"], meta["height"], meta["width"]) == (tok.codebook_size, *tok.grid)

    parts = [all_samples(out, split) for split in ("train", "val")]
    codes = np.concatenate([c for c, _ in parts]).astype(np.int64)
    labels = np.concatenate([lab for _, lab in parts])
    d = load_digits()
    ours = np.concatenate([codes.reshape(len(codes), -1), labels[:, None]], 1)
    theirs = np.concatenate([d.images.reshape(len(d.images), -1), d.target[:, None]], 1).astype(np.int64)
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])

    images = tok.decode(torch.from_numpy(codes))
    assert torch.equal(images[:, 0] * 16, torch.from_numpy(codes).float())
    assert torch.equal(tok.encode(images), torch.from_numpy(codes))


# ---- tokenize ----------------------------------------------------------------------------------------


def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 5, seed: int = 0) -> Path:
    """Small RGB PNGs of varied sizes, one subfolder per class (ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(12, 30, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return write_folder(tmp_path / "images")


@pytest.fixture
def palette(tmp_path, images) -> Path:
    """An 8-colour RGB palette fitted to the test images, so tokenize runs the colour path."""
    arrays = [np.asarray(Image.open(p).resize((8, 8))) for p, _ in list_images(images)[1]]
    path = tmp_path / "palette.npy"
    PixelTokenizer.fit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255, colours=8).save(path)
    return path


def run(images: Path, out: Path, **kwargs) -> Path:
    args = dict(tokenizer="pixel", image_size=10, batch_size=2, val_fraction=0.2, num_workers=0, shard_size=7)
    return tokenize(images, out, **{**args, **kwargs})


def test_tokenize_writes_crops_and_flips_in_folder_order(tmp_path, images, palette):
    out = run(images, tmp_path / "out", weights=palette)
    meta = read_meta(out)
    assert meta["class_names"] == ["cat", "dog", "emu"]
    assert (meta["codebook_size"], meta["height"], meta["width"]) == (8, 10, 10)
    assert meta["info"]["samples_per_image"] == 2
    codes, labels = all_samples(out, "train")
    val_codes, val_labels = all_samples(out, "val")
    assert len(codes) == 2 * 12 and len(val_codes) == 3  # 15 images, every 5th held out, val uncropped
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert val_labels.tolist() == [0, 1, 2]

    tok = load_tokenizer("pixel", weights=palette, image_size=10)
    first = np.array(center_crop_adm(Image.open(images / "cat" / "00.png").convert("RGB"), 10))
    expected = tok.encode(torch.from_numpy(first).permute(2, 0, 1)[None] / 255)[0].numpy()
    assert np.array_equal(codes[0], expected)
    assert np.array_equal(codes[1::2], codes[0::2][:, :, ::-1])  # each image's second sample is its mirror


def test_tokenize_ten_crop(tmp_path, images):
    out = run(images, tmp_path / "out", crop="tencrop", val_fraction=0)
    codes, labels = all_samples(out, "train")
    assert len(codes) == 10 * 15 and labels.tolist() == sum(([c] * 50 for c in range(3)), [])
    assert "val" not in read_meta(out)["splits"]
    corners, mirrored = codes[:4], codes[5:9]
    assert np.array_equal(mirrored[[1, 0, 3, 2]], corners[:, :, ::-1])  # mirror of top-left is top-right, ...


@pytest.mark.parametrize("crop", ["adm", "tencrop"])
@pytest.mark.parametrize("batches", [1, 4, 6, 7])  # 6 train encodes (bad.png batch has none), 2 val
def test_tokenize_resumes_to_identical_shards(tmp_path, images, crop, batches, monkeypatch, capsys):
    (images / "emu" / "bad.png").write_bytes(b"broken")  # skipped in both runs
    whole = run(images, tmp_path / "whole", crop=crop, skip_bad=True)

    interrupt_after(monkeypatch, prepare, "_encode_batch", batches)
    with pytest.raises(Interrupt):
        run(images, tmp_path / "resumed", crop=crop, skip_bad=True)
    monkeypatch.undo()
    run(images, tmp_path / "resumed", crop=crop, skip_bad=True, resume=True)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)
    assert "skipping unreadable image" in capsys.readouterr().out

    run(images, tmp_path / "resumed", crop=crop, skip_bad=True, resume=True)  # nothing left to do
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)
    with pytest.raises(ValueError, match="cannot resume, flip was True there but is False now"):
        run(images, tmp_path / "resumed", crop=crop, flip=False, skip_bad=True, resume=True)


def test_tokenize_stops_at_an_unreadable_image_unless_told(tmp_path, images, capsys):
    bad = images / "dog" / "03b.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=f"{bad}: cannot read the image .*skip_bad=True \\(--skip_bad true\\)"):
        run(images, tmp_path / "a")
    out = run(images, tmp_path / "b", skip_bad=True)
    assert "Skipped 1 unreadable images" in capsys.readouterr().out
    assert len(Shards(out, "train")) // 2 + len(Shards(out, "val")) == 15


def test_tokenize_with_workers_and_val_dir(tmp_path, images):
    val = write_folder(tmp_path / "val", per_class=2, seed=1)
    out = run(images, tmp_path / "a", val_dir=val, num_workers=2)
    assert len(Shards(out, "train")) == 2 * 15 and Shards(out, "val").labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert folder_bytes(out) == folder_bytes(run(images, tmp_path / "b", val_dir=val))

    (val / "fox").mkdir()
    Image.new("RGB", (12, 12)).save(val / "fox" / "0.png")
    with pytest.raises(ValueError, match="same class subfolders"):
        run(images, tmp_path / "c", val_dir=val)
    with pytest.raises(ValueError, match="no subfolders"):
        run(images / "cat", tmp_path / "d")


# ---- import-jsonl ------------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [{"class_id": int(rng.integers(5)), "tokens": rng.integers(0, 16, 16).tolist()} for _ in range(lines)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_jsonl(jsonl: Path, out: Path, **kwargs) -> Path:
    args = dict(val_every=5, codebook_size=16, grid=4, num_classes=5, shard_size=7, chunk=3)
    return import_jsonl(jsonl, out, **{**args, **kwargs})


def test_import_jsonl_holds_out_every_nth_line(tmp_path):
    rows = write_jsonl(tmp_path / "codes.jsonl")
    out = run_jsonl(tmp_path / "codes.jsonl", tmp_path / "out")
    for split, picked in (("train", [r for i, r in enumerate(rows) if (i + 1) % 5]), ("val", rows[4::5])):
        codes, labels = all_samples(out, split)
        assert codes.reshape(len(codes), -1).tolist() == [r["tokens"] for r in picked]
        assert labels.tolist() == [r["class_id"] for r in picked]
    assert read_meta(out)["info"]["tokenizer"] == "maskgit-vqgan"


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"class_id": 1, "tokens": [1, 2', "not JSON"),
        ('{"class_id": 1, "tokens": ' + json.dumps([1] * 15) + "}", "tokens is not a list of 16 integers"),
        ('{"class_id": 1, "tokens": ' + json.dumps([0.5] * 16) + "}", "tokens is not a list of 16 integers"),
        ('{"class_id": 5, "tokens": ' + json.dumps([1] * 16) + "}", "class_id 5 is not an integer in 0..4"),
        ('{"class_id": 1, "tokens": ' + json.dumps([16] * 16) + "}", "token 16 is outside the codebook"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_import_jsonl_names_the_malformed_line(tmp_path, line, problem, capsys):
    path = tmp_path / "codes.jsonl"
    write_jsonl(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:22] + [line + "\n"] + lines[22:]))
    with pytest.raises(ValueError, match=f"line 23: {problem}.*skip_bad=True \\(--skip_bad true\\)"):
        run_jsonl(path, tmp_path / "a")
    out = run_jsonl(path, tmp_path / "b", skip_bad=True)
    assert "Skipped 1 malformed lines" in capsys.readouterr().out
    assert len(Shards(out, "train")) + len(Shards(out, "val")) == 40


@pytest.mark.parametrize("lines_read", [3, 14, 30, 40])
def test_import_jsonl_resumes_to_identical_shards(tmp_path, lines_read, monkeypatch):
    path = tmp_path / "codes.jsonl"
    write_jsonl(path)
    with open(path, "a") as f:
        f.write("garbage\n\n")  # one bad line (skipped) and a blank one (ignored)
    write_jsonl(tmp_path / "more.jsonl", lines=9, seed=1)
    with open(path, "a") as f:
        f.write((tmp_path / "more.jsonl").read_text())
    whole = run_jsonl(path, tmp_path / "whole", skip_bad=True)

    interrupt_after(monkeypatch, prepare, "_parse_line", lines_read)
    with pytest.raises(Interrupt):
        run_jsonl(path, tmp_path / "resumed", skip_bad=True)
    monkeypatch.undo()
    run_jsonl(path, tmp_path / "resumed", skip_bad=True, resume=True)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)
    with pytest.raises(ValueError, match="cannot resume, val_every was 5 there but is 4 now"):
        run_jsonl(path, tmp_path / "resumed", val_every=4, resume=True)
