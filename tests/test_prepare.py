import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rar_llm.data.jsonl as jsonl_module
import rar_llm.data.images as prepare
from rar_llm.data.jsonl import import_jsonl
from rar_llm.data.digits import digits
from rar_llm.data.images import center_crop_adm, list_images, tokenize
from rar_llm.data.shards import Shards, read_meta
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


def interrupt_after_lines(monkeypatch, lines: int) -> None:
    """Stop import-jsonl once it has parsed ``lines`` lines (at the chunk that would go past them)."""
    original, seen = jsonl_module.parse_lines, [0]

    def wrapper(chunk_lines, *args, **kwargs):
        if seen[0] + len(chunk_lines) > lines:
            raise Interrupt
        seen[0] += len(chunk_lines)
        return original(chunk_lines, *args, **kwargs)

    monkeypatch.setattr(jsonl_module, "parse_lines", wrapper)


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
    args = dict(val_every=5, codebook_size=16, grid=4, num_classes=5, shard_size=7, chunk_bytes=150)
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

    interrupt_after_lines(monkeypatch, lines_read)
    with pytest.raises(Interrupt):
        run_jsonl(path, tmp_path / "resumed", skip_bad=True)
    monkeypatch.undo()
    run_jsonl(path, tmp_path / "resumed", skip_bad=True, resume=True)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)
    with pytest.raises(ValueError, match="cannot resume, val_every was 5 there but is 4 now"):
        run_jsonl(path, tmp_path / "resumed", val_every=4, resume=True)


# ---- issue 14: nothing wrong gets in, nothing a user wrote is lost ----------------------------------------


def test_pydoc_topics_and_train_bpe_refuse_to_overwrite(tmp_path):
    from rar_llm.data.corpora import pydoc_topics, train_bpe

    out = tmp_path / "topics.jsonl"
    out.write_text("mine\n")
    with pytest.raises(FileExistsError, match=f"{out} already exists.*--overwrite true"):
        pydoc_topics(out)
    assert out.read_text() == "mine\n"
    pydoc_topics(out, overwrite=True)
    assert out.read_text().startswith('{"topic"')

    tok = tmp_path / "tokenizer.json"
    tok.write_text("mine")
    with pytest.raises(FileExistsError, match=f"{tok} already exists"):
        train_bpe([out], tok, vocab_size=300)
    assert tok.read_text() == "mine"
    train_bpe([out], tok, vocab_size=300, overwrite=True)
    assert json.loads(tok.read_text())["model"]["type"] == "BPE"
    with pytest.raises(ValueError, match="is one of the training files"):
        train_bpe([out], out, vocab_size=300, overwrite=True)


def test_import_jsonl_resume_refuses_another_source(tmp_path, monkeypatch):
    path, other = tmp_path / "codes.jsonl", tmp_path / "other.jsonl"
    write_jsonl(path)
    write_jsonl(other, seed=1)
    interrupt_after_lines(monkeypatch, 21)
    with pytest.raises(Interrupt):
        run_jsonl(path, tmp_path / "out")
    monkeypatch.undo()
    meta = read_meta(tmp_path / "out")["info"]
    assert meta["source_size"] == path.stat().st_size and len(meta["source_sha256_1mib"]) == 64
    with pytest.raises(ValueError, match="cannot resume, source_(size|sha256_1mib) was .* resume with the same source"):
        run_jsonl(other, tmp_path / "out", resume=True)
    moved = tmp_path / "moved.jsonl"  # the same bytes under another name resume fine
    moved.write_bytes(path.read_bytes())
    run_jsonl(moved, tmp_path / "out", resume=True)
    assert folder_bytes(tmp_path / "out") != {} and len(Shards(tmp_path / "out", "train")) == 32


def test_tokenize_resume_refuses_another_image_list(tmp_path, images, monkeypatch):
    interrupt_after(monkeypatch, prepare, "_encode_batch", 2)
    with pytest.raises(Interrupt):
        run(images, tmp_path / "out")
    monkeypatch.undo()
    assert read_meta(tmp_path / "out")["info"]["images"] == {"train": 12, "val": 3}
    Image.new("RGB", (12, 12)).save(images / "emu" / "99.png")
    with pytest.raises(ValueError, match="cannot resume, image_list_sha256 was"):
        run(images, tmp_path / "out", resume=True)


def test_float_codes_and_labels_are_refused_on_write_and_on_open(tmp_path, digits_dir):
    import shutil

    from rar_llm.data.shards import ShardWriter

    with ShardWriter(tmp_path / "w", 16, 2, 2, 3) as w:
        with pytest.raises(ValueError, match="must be integer arrays, got float64"):
            w.add("train", np.full((1, 2, 2), 2.7), [1])
        with pytest.raises(ValueError, match="must be integer arrays, got int64 and float64"):
            w.add("train", np.ones((1, 2, 2), int), [1.5])
        w.add("train", np.ones((1, 2, 2), np.int64), np.array([2], np.uint8))  # any exact integer type
    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    codes = d / "train-00000.codes.npy"
    np.save(codes, np.load(codes).astype(np.float32))
    with pytest.raises(ValueError, match=f"{codes}: codes are float32, expected unsigned integers"):
        Shards(d, "train")
    labels = d / "val-00000.labels.npy"
    np.save(labels, np.load(labels).astype(np.float64))
    with pytest.raises(ValueError, match=f"{labels}: class ids are float64, expected integers"):
        Shards(d, "val")


def test_import_jsonl_zero_samples_is_an_error_unless_allowed(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=f"{empty} holds no valid line .*allow_empty=True"):
        run_jsonl(empty, tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # what the failed run created is gone: rerunning just works
    run_jsonl(empty, tmp_path / "c", allow_empty=True)
    assert read_meta(tmp_path / "c")["splits"] == {}

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\x01 not json\n{}\n")
    with pytest.raises(ValueError, match=r"holds no valid line \(2 malformed skipped\)"):
        run_jsonl(garbage, tmp_path / "d", skip_bad=True)


def test_import_jsonl_reads_compressed_files_and_names_damaged_ones(tmp_path):
    import bz2
    import gzip
    import lzma

    plain = tmp_path / "codes.jsonl"
    write_jsonl(plain)
    whole = folder_bytes(run_jsonl(plain, tmp_path / "plain"))
    for name, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        packed = tmp_path / f"codes.{name}"  # read by content: the name does not matter
        packed.write_bytes(compress(plain.read_bytes()))
        out = folder_bytes(run_jsonl(packed, tmp_path / name, skip_bad=True))
        assert {k: v for k, v in out.items() if k != "meta.json"} == {k: v for k, v in whole.items() if k != "meta.json"}
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(plain.read_bytes())[:300])
    with pytest.raises(ValueError, match=f"{truncated}: cannot read past line .*damaged or truncated"):
        run_jsonl(truncated, tmp_path / "t", skip_bad=True)
    zstd = tmp_path / "codes.jsonl.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    with pytest.raises(ValueError, match=f"{zstd} is zstd-compressed, which import-jsonl does not read"):
        run_jsonl(zstd, tmp_path / "z")


def test_sixteen_bit_greys_are_scaled_not_clipped(tmp_path):
    grey16 = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    path = tmp_path / "g16.png"
    Image.fromarray(grey16).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        assert (np.asarray(img.convert("L")) == 255).mean() > 0.99  # what PIL's convert does
        img8 = prepare.to_8bit(img, "L")
    assert np.array_equal(np.asarray(img8), np.arange(256).reshape(16, 16))
    with Image.open(path) as img:
        rgb = np.asarray(prepare.to_8bit(img, "RGB"))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 1], np.arange(256).reshape(16, 16))

    pgm = tmp_path / "g16.pgm"  # PIL opens 16-bit PGM as mode I
    pgm.write_bytes(b"P5\n16 16\n65535\n" + grey16.astype(">u2").tobytes())
    with Image.open(pgm) as img:
        assert img.mode == "I" and np.array_equal(np.asarray(prepare.to_8bit(img, "L")), np.arange(256).reshape(16, 16))
    with pytest.raises(ValueError, match="floating-point pixels"):
        prepare.to_8bit(Image.fromarray(np.ones((4, 4), np.float32)), "L")


def test_tokenize_reads_sixteen_bit_pngs_like_their_eight_bit_twins(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("x", "y"):
        for i in range(2):
            grey = rng.integers(0, 256, (12, 12))
            for root, scale, dtype in ((tmp_path / "a", 1, np.uint8), (tmp_path / "b", 257, np.uint16)):
                (root / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray((grey * scale).astype(dtype)).save(root / c / f"{i}.png")
    a = run(tmp_path / "a", tmp_path / "out_a", val_fraction=0)
    b = run(tmp_path / "b", tmp_path / "out_b", val_fraction=0)
    assert np.array_equal(all_samples(a, "train")[0], all_samples(b, "train")[0])


@pytest.mark.parametrize("setting", [{"shard_size": 0}, {"shard_size": -1}, {"chunk_bytes": 0}, {"val_every": 1},
                                     {"val_every": -5}, {"grid": 0}])
def test_import_jsonl_checks_sizes_at_entry(tmp_path, setting):
    path = tmp_path / "codes.jsonl"
    write_jsonl(path)
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be"):
        run_jsonl(path, tmp_path / "out", **setting)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", [{"shard_size": 0}, {"batch_size": 0}, {"num_workers": -1}, {"image_size": -3}])
def test_tokenize_checks_sizes_at_entry(tmp_path, images, setting):
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be"):
        run(images, tmp_path / "out", **setting)
    assert not (tmp_path / "out").exists()


def test_shard_writer_checks_sizes(tmp_path):
    from rar_llm.data.shards import ShardWriter

    with pytest.raises(ValueError, match="shard_size must be an integer >= 1, got 0"):
        ShardWriter(tmp_path / "d", 16, 2, 2, 3, shard_size=0)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ShardWriter(tmp_path / "d", 16, 2, 2, 3, class_names=["a", "b"])
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda m: b'{"format": "rar_llm-shards", ', "is not valid JSON"),
        (lambda m: b"\xff\xfe\x00garbage", "is not valid JSON"),
        (lambda m: b"[1, 2]", "expected a JSON object"),
        (lambda m: json.dumps({**m, "height": "8"}).encode(), "height is '8', expected a positive integer"),
        (lambda m: json.dumps({**m, "codebook_size": 0}).encode(), "codebook_size is 0"),
        (lambda m: json.dumps({**m, "splits": {"train": [{"file": "../../etc/passwd", "num_samples": 3}]}}).encode(),
         "expected a plain file name"),
        (lambda m: json.dumps({**m, "splits": {"train": [{"file": "train-00000", "num_samples": -1}]}}).encode(),
         "num_samples is -1"),
        (lambda m: json.dumps({**m, "class_names": ["a"]}).encode(), "class_names must be a list of 10 strings"),
        (lambda m: json.dumps({**m, "code_dtype": "float32"}).encode(), "code_dtype 'float32' is not an integer type"),
    ],
)
def test_damaged_meta_json_is_named(tmp_path, digits_dir, damage, problem):
    import re
    import shutil

    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_bytes(damage(meta))
    with pytest.raises(ValueError, match=re.escape(str(d / "meta.json")) + ".*" + re.escape(problem)):
        Shards(d, "train")


def test_garbled_npy_header_is_named(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    f = d / "train-00000.labels.npy"
    raw = bytearray(f.read_bytes())
    raw[20:40] = b"x" * 20  # inside the header dict
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{f} is truncated or corrupt"):
        Shards(d, "train")
    f.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{f} is truncated or corrupt"):
        Shards(d, "train")


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"class_id": 1, "tokens": [' + ", ".join(["1"] * 15) + ", true]}", "tokens is not a list of 16 integers"),
        ('{"class_id": true, "tokens": ' + json.dumps([1] * 16) + "}", "class_id True is not an integer"),
        ('{"class_id": 1, "tokens": [' + ", ".join(["01"] * 16) + "]}", "not JSON"),
        ('{"class_id": 1, "tokens": [' + ", ".join(["1"] * 16) + "], }", "not JSON"),
        ('{"class_id": 1, "tokens": [' + ", ".join(["1"] * 16) + "]} x", "not JSON"),
        ('{"class_id": 1, "tokens": [' + ", ".join(["1"] * 15) + ", 99999999999]}", "token 99999999999 is outside"),
    ],
)
def test_import_jsonl_refuses_what_json_refuses(tmp_path, line, problem):
    path = tmp_path / "codes.jsonl"
    write_jsonl(path, lines=9)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=f"line 10: {problem}"):
        run_jsonl(path, tmp_path / "a")


def test_import_jsonl_other_spellings_give_the_same_shards(tmp_path):
    rows = write_jsonl(tmp_path / "codes.jsonl", lines=60)
    spelled = []
    for i, r in enumerate(rows):
        if i % 4 == 1:
            spelled.append(json.dumps(r, separators=(",", ":")) + "\n")  # compact
        elif i % 4 == 2:
            spelled.append(json.dumps({"tokens": r["tokens"], "class_id": r["class_id"], "x": None}) + "\r\n")
        elif i % 4 == 3:
            spelled.append(" " + json.dumps(r, indent=None) + " \n")
        else:
            spelled.append(json.dumps(r) + "\n")
    (tmp_path / "spelled.jsonl").write_text("".join(spelled))
    whole = folder_bytes(run_jsonl(tmp_path / "codes.jsonl", tmp_path / "a"))
    for name, kwargs in (("b", {}), ("c", {"chunk_bytes": 300})):
        out = folder_bytes(run_jsonl(tmp_path / "spelled.jsonl", tmp_path / name, **kwargs))
        assert {k: v for k, v in out.items() if k != "meta.json"} == {k: v for k, v in whole.items() if k != "meta.json"}


def _mixed_file(tmp_path: Path) -> Path:
    """RAR-form lines with a bad one, a blank one, CRLF, other spellings and a line past the limit."""
    rows = write_jsonl(tmp_path / "rows.jsonl", lines=90, seed=2)
    lines = [json.dumps(r) + "\n" for r in rows]
    lines[7] = "garbage\n"
    lines[20] = "\n"
    lines[33] = json.dumps(rows[33]).replace(", ", ",") + "\r\n"
    lines[51] = "x" * ((1 << 20) + 10) + "\n"  # longer than the limit: skipped as malformed
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(lines))
    return path


def test_import_jsonl_mixed_file_gives_the_same_shards_in_any_chunks_and_compressed(tmp_path, capsys):
    import gzip

    path = _mixed_file(tmp_path)
    zipped = tmp_path / "mixed.jsonl.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    one = folder_bytes(run_jsonl(path, tmp_path / "one", skip_bad=True))
    assert "Skipped 2 malformed lines" in capsys.readouterr().out
    for name, source, kwargs in (("big", path, {"chunk_bytes": 1 << 21}), ("small", path, {"chunk_bytes": 37}),
                                 ("gz", zipped, {})):
        out = folder_bytes(run_jsonl(source, tmp_path / name, skip_bad=True, **kwargs))
        assert {k: v for k, v in out.items() if k != "meta.json"} == {k: v for k, v in one.items() if k != "meta.json"}
    with pytest.raises(ValueError, match="line 8: not JSON"):
        run_jsonl(path, tmp_path / "bad")


@pytest.mark.parametrize("lines_read", [12, 60])
def test_import_jsonl_resumes_past_a_too_long_line_to_identical_shards(tmp_path, lines_read, monkeypatch):
    path = _mixed_file(tmp_path)
    whole = run_jsonl(path, tmp_path / "whole", skip_bad=True)
    interrupt_after_lines(monkeypatch, lines_read)
    with pytest.raises(Interrupt):
        run_jsonl(path, tmp_path / "resumed", skip_bad=True)
    monkeypatch.undo()
    assert read_meta(tmp_path / "resumed")["splits"], "the interrupted run wrote no shard to resume from"
    run_jsonl(path, tmp_path / "resumed", skip_bad=True, resume=True)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)


def test_import_jsonl_failures_reach_the_caller_and_leave_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "codes.jsonl"
    write_jsonl(path)

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(jsonl_module, "parse_lines", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_jsonl(path, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing half-written left


def test_ctrl_c_prints_one_line_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from rar_llm.__main__ import main
    from rar_llm.data.shards import ShardWriter

    path = tmp_path / "codes.jsonl"
    write_jsonl(path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "add", interrupted)
    args = ["import-jsonl", "--jsonl", str(path), "--out_dir", str(tmp_path / "out"), "--grid", "4",
            "--codebook_size", "16", "--num_classes", "5"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "rar-llm import-jsonl: interrupted; rerun the command with --resume true to continue"


def test_cli_prints_one_line_for_a_bad_jsonl(tmp_path, capsys):
    from rar_llm.__main__ import main

    path = tmp_path / "codes.jsonl"
    path.write_text('{"class_id": 1, "tokens": [1.5]}\n')
    with pytest.raises(SystemExit) as e:
        main(["import-jsonl", "--jsonl", str(path), "--out_dir", str(tmp_path / "out"), "--grid", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith(f"rar-llm import-jsonl: error: {path} line 1: tokens is not a list of 1 integers")


def test_import_jsonl_reads_a_line_without_end_in_bounded_pieces(tmp_path, capsys):
    path = tmp_path / "codes.jsonl"
    rows = write_jsonl(path, lines=6)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "x" * (3 << 20) + "\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=f"{path} line 3: longer than 1048576 bytes"):
        run_jsonl(path, tmp_path / "a")
    out = run_jsonl(path, tmp_path / "b", skip_bad=True)
    assert "Skipped 1 malformed lines" in capsys.readouterr().out
    codes, labels = all_samples(out, "train")
    assert labels.tolist() == [rows[i]["class_id"] for i in (0, 1, 2, 4, 5)]  # file line 5 (rows[3]) is val
    path.write_text("".join(lines[:2]) + "y" * (3 << 20))  # no line end at all: still bounded
    with pytest.raises(ValueError, match="line 3: longer than"):
        run_jsonl(path, tmp_path / "c")


def test_shard_writer_never_overwrites_files_it_did_not_list(tmp_path):
    from rar_llm.data.shards import ShardWriter

    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "train-00000.codes.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="holds shard files .*but no meta.json"):
        ShardWriter(d, 16, 2, 2, 3)
    (d / "train-00000.codes.npy").unlink()
    with pytest.raises(ValueError, match="holds no valid line"):
        run_jsonl(_empty(tmp_path), d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]  # the failed run took only its own meta.json


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path
