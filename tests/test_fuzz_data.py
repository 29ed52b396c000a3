"""Fuzz tests of the data entry points: ``import-jsonl`` and opening a shard folder (``Shards``).

Every case must end in success with the right data, or in our one-line error (ValueError,
FileNotFoundError, FileExistsError) naming the file: never a hang, another library's exception
leaking out, or data that silently differs from what the input says. Seeded; each test prints its
counts of cases and outcomes (``pytest -s`` shows them).
"""

import bz2
import gzip
import json
import random
import re
import shutil
import signal
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from rar_llm.data.jsonl import import_jsonl
from rar_llm.data.shards import META, ShardWriter, Shards, read_meta

OURS = (ValueError, FileNotFoundError, FileExistsError)
T, CODEBOOK, CLASSES, VAL_EVERY = 4, 16, 5, 4


@contextmanager
def deadline(seconds: int):
    """Fail a case that runs longer than ``seconds`` (a hang) instead of stalling the suite."""

    def alarm(*_):
        raise TimeoutError(f"case ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def ours(error: BaseException, path: Path) -> bool:
    """Our one-line error: one of our types, naming the file, not some library's exception type."""
    return (
        type(error) in OURS + (NotADirectoryError, IsADirectoryError)
        and str(path) in str(error)
        and "\n" not in str(error)
    )


# ---- import-jsonl ------------------------------------------------------------------------------------


def reference(line: bytes):
    """What a line means by the letter of JSON and the format: ``(class, tokens)``, None (blank), or "bad"."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        return "bad"
    if not isinstance(obj, dict) or "class_id" not in obj or "tokens" not in obj:
        return "bad"
    label, tokens = obj["class_id"], obj["tokens"]
    if type(label) is not int or not 0 <= label < CLASSES:
        return "bad"
    if not isinstance(tokens, list) or len(tokens) != T or any(type(t) is not int or not 0 <= t < CODEBOOK for t in tokens):
        return "bad"
    return label, tokens


def valid_line(rng: random.Random) -> bytes:
    row = {"class_id": rng.randrange(CLASSES), "tokens": [rng.randrange(CODEBOOK) for _ in range(T)]}
    return (json.dumps(row) + "\n").encode()


PIECES = [b"0", b"1", b"9", b"15", b"16", b"-1", b"-0", b"01", b"1.0", b"1e1", b"true", b"false", b"null", b'"1"',
          b"[", b"]", b"{", b"}", b",", b", ", b":", b'"', b" ", b"\t", b"\r", b"\n", b"\x00", b"\xff", b"\xef\xbb\xbf",
          b"99999999999999999999", b"NaN", b"[1]", b'"class_id"', b'"tokens"', b"\\u0000", b"\\ud800"]


def mutate(line: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind in (2, 3) and not isinstance(reference(line), tuple):
        kind = 5  # structural edits need a valid line to start from
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
    if kind == 1:  # truncated
        return line[: rng.randrange(len(line))]
    if kind == 2:  # a value swapped for another JSON (or not) value
        row = json.loads(line)
        value = rng.choice(PIECES).decode("latin-1")
        text = json.dumps(row)
        if rng.random() < 0.5:
            text = text.replace(f'"class_id": {row["class_id"]}', f'"class_id": {value}', 1)
        else:
            i = rng.randrange(T)
            tokens = [str(t) for t in row["tokens"]]
            tokens[i] = value
            text = text[: text.index("[") + 1] + ", ".join(tokens) + "]}"
        return text.encode("latin-1") + b"\n"
    if kind == 3:  # keys renamed, dropped, doubled, reordered, respaced
        row = json.loads(line)
        variants = [
            {"class": row["class_id"], "tokens": row["tokens"]},
            {"tokens": row["tokens"]},
            {"tokens": row["tokens"], "class_id": row["class_id"]},
            {**row, "extra": [1, {"a": None}]},
            [row["class_id"], row["tokens"]],
        ]
        text = json.dumps(rng.choice(variants), separators=rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]))
        return text.encode() + rng.choice([b"\n", b"\r\n", b" \n", b""])
    # byte edits: flips, insertions, deletions
    out = bytearray(line)
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(3)
        if op == 0 and pos < len(out):
            out[pos] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice(PIECES)
        elif pos < len(out):
            del out[pos : pos + rng.randrange(1, 4)]
    return bytes(out)


def read_back(out: Path):
    meta = read_meta(out)
    got = {}
    for split in ("train", "val"):
        if not meta["splits"].get(split):
            got[split] = []
            continue
        s = Shards(out, split)
        got[split] = [(s[i][1], s[i][0].reshape(-1).tolist()) for i in range(len(s))]
    return got


def splitlines_like_readline(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def test_fuzz_import_jsonl(tmp_path):
    rng = random.Random(14)
    counts: Counter = Counter()
    start = time.perf_counter()
    for case in range(300):
        lines = [valid_line(rng) for _ in range(rng.randrange(0, 9))]
        if lines and rng.random() < 0.9:
            i = rng.randrange(len(lines))
            lines[i] = mutate(lines[i], rng)
            if rng.random() < 0.3:
                j = rng.randrange(len(lines))
                lines[j] = mutate(lines[j], rng)
        data = b"".join(lines)
        if case % 10 == 9:  # whole-file damage: random bytes, or compressed data cut short
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(200))) if case % 20 == 9 else \
                rng.choice([gzip.compress, bz2.compress])(data)[: rng.randrange(1, 60)]
        path = tmp_path / f"case{case}.jsonl"
        path.write_bytes(data)
        out = tmp_path / f"out{case}"
        skip_bad = rng.random() < 0.3
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        logical = splitlines_like_readline(body)
        refs = [reference(line) for line in logical]
        bad = [i for i, r in enumerate(refs) if r == "bad"]
        want = {"train": [], "val": []}
        for i, r in enumerate(refs):
            if r not in (None, "bad"):
                want["val" if (i + 1) % VAL_EVERY == 0 else "train"].append((r[0], r[1]))
        try:
            with deadline(10):
                import_jsonl(path, out, val_every=VAL_EVERY, codebook_size=CODEBOOK, grid=2, num_classes=CLASSES,
                             skip_bad=skip_bad, shard_size=3, chunk_bytes=rng.randrange(1, 200))
        except OURS as e:
            assert ours(e, path), f"case {case}: {type(e).__name__}: {e}"
            if re.search(r"line \d+:", str(e)) and not skip_bad and bad and "cannot read" not in str(e):
                assert f"line {bad[0] + 1}:" in str(e) or not (bad[0] < len(logical)), f"case {case}: {e} vs {bad}"
            if not bad and not (want["train"] or want["val"]):
                counts["error: nothing to import"] += 1
            elif not bad:
                assert "compressed" in str(e) or "cannot read" in str(e) or "not JSON" in str(e), f"case {case}: {e}"
                counts["error: valid by the letter of JSON, refused (compressed or orjson-strict)"] += 1
            else:
                counts["error: malformed line or file"] += 1
            assert not out.exists() or read_meta(out)["splits"], f"case {case}: empty folder left behind"
            continue
        except BaseException as e:
            pytest.fail(f"case {case}: {type(e).__name__} leaked: {e!r}; input {data!r}")
        if data[:2] in (b"\x1f\x8b", b"BZ"):
            counts["success: compressed"] += 1
            continue
        assert skip_bad or not bad, f"case {case}: bad lines {bad} accepted: {data!r}"
        assert read_back(out) == want, f"case {case}: wrong data for {data!r}"
        counts["success, data as JSON reads it" + (" (bad lines skipped)" if bad else "")] += 1
    took = time.perf_counter() - start
    print(f"\nimport-jsonl fuzz: {sum(counts.values())} cases in {took:.1f} s: {dict(counts)}")
    assert sum(counts.values()) == 300 and took < 20


# ---- shard folders --------------------------------------------------------------------------------------


def make_folder(path: Path, rng: np.random.Generator):
    codes, labels = rng.integers(0, CODEBOOK, (13, 2, 2)), rng.integers(0, 3, 13)
    with ShardWriter(path, CODEBOOK, 2, 2, 3, shard_size=4) as w:
        w.add("train", codes[:10], labels[:10])
        w.add("val", codes[10:], labels[10:])
    return {"train": (codes[:10], labels[:10]), "val": (codes[10:], labels[10:])}


VALUES = [None, -1, 0, 1, 2, 3, 5, 2.5, "x", "", [], {}, True, 10**20, "../meta", "train-00001", "val-00000", [1, 2]]


def mutate_meta(meta: dict, rng: random.Random) -> bytes:
    meta = json.loads(json.dumps(meta))
    kind = rng.randrange(5)
    if kind == 0:  # a top-level value replaced
        meta[rng.choice(list(meta))] = rng.choice(VALUES)
    elif kind == 1:  # a key dropped
        meta.pop(rng.choice(list(meta)))
    elif kind == 2:  # a shard entry edited
        entries = [e for shards in meta["splits"].values() for e in shards]
        entry = rng.choice(entries)
        entry[rng.choice(["file", "num_samples", "end_position", "extra"])] = rng.choice(VALUES)
    elif kind == 3:
        text = json.dumps(meta).encode()
        return text[: rng.randrange(len(text))]
    else:
        text = bytearray(json.dumps(meta).encode())
        text[rng.randrange(len(text))] = rng.randrange(256)
        return bytes(text)
    return json.dumps(meta).encode()


def mutate_npy(path: Path, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    arr = np.load(path)
    kind = rng.randrange(8)
    if kind == 0:
        path.write_bytes(bytes(raw[: rng.randrange(len(raw))]))
        return "truncated"
    if kind == 1:
        raw[rng.randrange(min(len(raw), 128))] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        return "header byte"
    if kind == 2:
        raw[rng.randrange(128, len(raw))] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        return "data byte"
    if kind == 3:
        dtype = rng.choice([np.float32, np.float64, np.int8, np.bool_, np.int64, np.complex64])
        np.save(path, (arr.astype(np.int64) - rng.randrange(2) * 20).astype(dtype))
        return "dtype"
    if kind == 4:
        np.save(path, arr.reshape(-1)[: max(1, arr.size - 1)])
        return "shape"
    if kind == 5:
        path.unlink()
        return "deleted"
    if kind == 6:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(300))))
        return "random bytes"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return "pickled object"


def test_fuzz_shard_folder(tmp_path):
    rng, nrng = random.Random(7), np.random.default_rng(7)
    base = tmp_path / "base"
    original = make_folder(base, nrng)
    meta = read_meta(base)
    files = sorted(p.name for p in base.glob("*.npy"))
    counts: Counter = Counter()
    start = time.perf_counter()
    for case in range(300):
        d = tmp_path / f"case{case}"
        shutil.copytree(base, d)
        if rng.random() < 0.4:
            (d / META).write_bytes(mutate_meta(meta, rng))
            what, named = "meta.json", [d / META]
        else:
            name = rng.choice(files)
            what, named = mutate_npy(d / name, rng), [d / name, d / META]
        for split in ("train", "val"):
            try:
                with deadline(10):
                    s = Shards(d, split)
                    got = [s[i] for i in range(len(s))]
            except OURS as e:
                assert any(ours(e, p) for p in named + [d]), f"case {case} ({what}): {type(e).__name__}: {e}"
                counts[f"error ({what})"] += 1
                continue
            except BaseException as e:
                pytest.fail(f"case {case} ({what}, {split}): {type(e).__name__} leaked: {e!r}")
            m = s.meta
            assert all(c.shape == (m["height"], m["width"]) and c.dtype.kind in "iu" for c, _ in got)
            assert all(0 <= c.min() and c.max() < m["codebook_size"] and 0 <= y < m["num_classes"] for c, y in got)
            same = len(got) == len(original[split][1]) and all(
                np.array_equal(c, oc) and y == oy for (c, y), oc, oy in zip(got, *original[split])
            )
            if same:
                counts["success, data unchanged"] += 1
            else:
                # Only two changes can read back without an error: a code or class id edited inside its range
                # in a shard's data bytes (no checksums), or meta.json pointing a split at other shard files.
                assert what in ("data byte", "meta.json"), f"case {case} ({what}): data changed silently"
                counts[f"success, data as {'edited in range' if what == 'data byte' else 'meta.json lists it'}"] += 1
        shutil.rmtree(d)
    took = time.perf_counter() - start
    print(f"\nshard-folder fuzz: 300 cases (600 opens) in {took:.1f} s: {dict(counts)}")
    assert took < 20


def test_fuzz_short_path_agrees_with_json(monkeypatch):
    """RAR-form lines with numbers of 1 to 11 digits (some with leading zeros): the short path must
    give what JSON gives, or leave the line to the exact path, which then says what is wrong."""
    import rar_llm.data.jsonl as jsonl_module

    def refuse(*args):
        raise ValueError("left to the exact path")

    rng = random.Random(3)
    counts: Counter = Counter()
    for case in range(40):
        tokens, classes, codebook = rng.randrange(1, 40), 10**9, 10**9
        lines = []
        for _ in range(rng.randrange(1, 60)):
            numbers = []
            for _ in range(tokens + 1):
                digits = rng.choice([1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]) if rng.random() > 0.004 else rng.choice([10, 11])
                text = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))
                if rng.random() < 0.004:
                    text = "0" + text  # a leading zero: not JSON
                numbers.append(text)
            lines.append(f'{{"class_id": {numbers[0]}, "tokens": [{", ".join(numbers[1:])}]}}'.encode())
        want = [r for r in map(reference_for(tokens, codebook, classes), lines)]
        with monkeypatch.context() as m:  # the short path alone
            m.setattr(jsonl_module, "parse_line", refuse)
            codes, labels, ok, _ = jsonl_module.parse_lines(lines, tokens, codebook, classes)
        assert ok.tolist() == [r != "bad" for r in want], f"case {case}"
        assert labels[ok].tolist() == [r[0] for r in want if r != "bad"]
        assert codes[ok].tolist() == [r[1] for r in want if r != "bad"]
        codes_all, _, ok_all, errors = jsonl_module.parse_lines(lines, tokens, codebook, classes)  # with the exact path
        assert {i for i, _ in errors} == {i for i, r in enumerate(want) if r == "bad"}, f"case {case}"
        assert codes_all[ok_all].tolist() == codes[ok].tolist()
        counts["lines accepted"] += int(ok.sum())
        counts["lines refused"] += int((~ok).sum())
    print(f"\nshort-path fuzz: 40 blocks: {dict(counts)}")
    assert counts["lines accepted"] and counts["lines refused"]


def reference_for(tokens: int, codebook: int, classes: int):
    def ref(line: bytes):
        try:
            obj = json.loads(line)
        except ValueError:
            return "bad"
        label, toks = obj["class_id"], obj["tokens"]
        if not 0 <= label < classes or len(toks) != tokens or not all(0 <= t < codebook for t in toks):
            return "bad"
        return label, toks

    return ref
