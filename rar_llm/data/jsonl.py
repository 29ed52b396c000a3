"""``rar-llm import-jsonl``: pre-tokenized JSONL (RAR's released ``maskgitvq.jsonl``) as shards.

Each line is ``{"class_id": int, "tokens": [ints]}``. The file is read in chunks of whole lines, in one
process; each chunk is parsed (orjson, line by line) and handed to the shard writer before the next is
read, so memory stays constant however large the file. Lines made only of the characters RAR's lines
use take a short path; any other line goes through exact checks that say what is wrong with it and on
which line. It runs once per data set, so the code is plain rather than as fast as it could be.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from rar_llm.data.shards import ShardWriter, check_resume, code_dtype, positive_int

BOM = b"\xef\xbb\xbf"
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
TOO_LONG = b"\0too long"  # stands for a line longer than the limit (skipped with skip_bad); compared by identity
# What is left of a line in RAR's form once its digits, separators and JSON whitespace are deleted.
NUMBERS, SKELETON = b"0123456789, \t\r", b'{"class_id":"tokens":[]}'


def source_fingerprint(path: Path) -> dict:
    """What a resumed import checks it is reading again: the file's size and the SHA-256 of its first MiB."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return {"source_size": path.stat().st_size, "source_sha256_1mib": hashlib.sha256(head).hexdigest()}


def open_lines(path: Path):
    """``(lines file, raw file)``: gzip, bzip2 and xz files are decompressed on the fly, by content, not name."""
    raw = open(path, "rb")
    head = raw.read(6)
    raw.seek(0)
    kind = next((k for magic, k in MAGIC.items() if head.startswith(magic)), None)
    if kind in ("zstd", "zip"):
        raw.close()
        raise ValueError(
            f"{path} is {kind}-compressed, which import-jsonl does not read; decompress it first "
            "(or recompress it with gzip, bzip2 or xz, which are read directly)"
        )
    opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}.get(kind)
    return (opener(fileobj=raw) if kind == "gzip" else opener(raw)) if opener else raw, raw


def read_lines(f, path: Path, size: int, limit: int, skip_bad: bool) -> Iterator[list[bytes]]:
    """Lists of the lines of ``f`` (without their line ends), read about ``size`` bytes at a time.

    A line still open after ``limit`` bytes is an error, or with ``skip_bad`` stands as TOO_LONG, so a
    file without line ends cannot fill the memory (a line that ends within a read may be up to a read
    longer). Damaged compressed data is a ValueError naming the file.
    """

    def read(n: int) -> bytes:
        try:
            return f.read(n)
        except READ_ERRORS as e:
            raise ValueError(
                f"{path}: cannot read past line {index} ({type(e).__name__}: {e}); "
                "the file is damaged or truncated, download it again"
            ) from None

    index, rest, skipping = 0, b"", False
    data = read(3).removeprefix(BOM) + read(size)  # without a UTF-8 byte-order mark
    while data:
        lines = []
        if skipping:  # inside a line that is too long: drop it up to its end
            end = data.find(b"\n")
            if end < 0:
                data = read(size)
                continue
            lines, data, skipping = [TOO_LONG], data[end + 1 :], False
        more = data.split(b"\n")
        more[0] = rest + more[0]
        lines += more
        rest = lines.pop()  # the line still open
        if len(rest) > limit:
            if not skip_bad:
                raise ValueError(
                    f"{path} line {index + len(lines) + 1}: longer than {limit} bytes, not a line of codes; "
                    "is this RAR's JSONL? Pass skip_bad=True (--skip_bad true) to skip such lines"
                )
            rest, skipping = b"", True
        if lines:
            yield lines
            index += len(lines)
        data = read(max(size, len(rest)))  # a long open line doubles the read: linear time for any size
    if skipping or rest:
        yield [TOO_LONG if skipping else rest]


def parse_line(line: bytes, num_tokens: int, codebook_size: int, num_classes: int) -> tuple[int, list[int]]:
    """One ``{"class_id": int, "tokens": [ints]}`` line, exactly; ValueError says what is wrong with it."""
    if line is TOO_LONG:
        raise ValueError("longer than the line limit, not a line of codes")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(obj, dict) or "class_id" not in obj or "tokens" not in obj:
        raise ValueError('expected an object {"class_id": int, "tokens": [ints]}')
    label, tokens = obj["class_id"], obj["tokens"]
    if type(label) is not int or not 0 <= label < num_classes:
        raise ValueError(f"class_id {label!r} is not an integer in 0..{num_classes - 1}")
    if not isinstance(tokens, list) or len(tokens) != num_tokens or not all(type(t) is int for t in tokens):
        raise ValueError(f"tokens is not a list of {num_tokens} integers")
    bad = next((t for t in tokens if not 0 <= t < codebook_size), None)
    if bad is not None:
        raise ValueError(f"token {bad} is outside the codebook 0..{codebook_size - 1}")
    return label, tokens


def parse_lines(
    lines: list[bytes], num_tokens: int, codebook_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """``(codes, class ids, ok, errors)``: row i of ``codes`` (n, num_tokens) and ``class ids`` is line
    i where ``ok[i]``; blank and malformed lines are not ok, and ``errors`` lists the malformed ones
    as ``(i, problem)``.

    The short path: a line that is SKELETON besides digits, separators and whitespace holds, once
    orjson accepts it, a class id and a list of non-negative integers (floats, signs, booleans,
    strings and null need other characters); ``struct`` packs exactly ``num_tokens`` of them in the
    shards' dtype, or refuses. Any other line, or one out of range, goes through ``parse_line``.
    """
    dtype = np.dtype(code_dtype(codebook_size))
    row = struct.Struct(f"={num_tokens}{dtype.char}")  # uint16 or int32: the same letters in struct
    rows, labels, ok = [], [], np.ones(len(lines), bool)
    for i, line in enumerate(lines):
        try:
            if line.translate(None, NUMBERS) == SKELETON:
                obj = orjson.loads(line)
                label, codes = obj["class_id"], row.pack(*obj["tokens"])
                if label < num_classes:
                    rows.append(codes)
                    labels.append(label)
                    continue
        except (ValueError, KeyError, TypeError, struct.error):  # not JSON, another key, too many tokens
            pass
        rows.append(bytes(row.size))
        labels.append(-1)
        ok[i] = False
    codes = np.frombuffer(bytearray().join(rows), dtype).reshape(len(lines), num_tokens)
    labels = np.array(labels, np.int64)
    ok &= codes.max(1, initial=0) < codebook_size
    errors = []
    for i in np.flatnonzero(~ok):
        if lines[i].strip():  # blank lines are skipped, but count for the position and the val split
            try:
                labels[i], codes[i] = parse_line(lines[i], num_tokens, codebook_size, num_classes)
                ok[i] = True
            except ValueError as e:
                errors.append((int(i), str(e)))
    return codes, labels, ok, errors


def new_lines(chunks: Iterator[list[bytes]], starts: tuple[int, int], val_every: int):
    """``(lines, their indices in the file, which go to val)`` of each chunk, less the lines before
    ``starts`` (train, val): those an interrupted import has written already."""
    first, starts = 0, np.array(starts)
    for lines in chunks:
        index = np.arange(first, first + len(lines))
        first += len(lines)
        val = (index + 1) % val_every == 0 if val_every else np.zeros(len(lines), bool)
        new = index >= starts[val.astype(int)]
        if not new.all():
            lines, index, val = [line for line, keep in zip(lines, new) if keep], index[new], val[new]
        yield lines, index, val


def import_jsonl(
    jsonl: Path,
    out_dir: Path,
    val_every: int = 1280,
    codebook_size: int = 1024,
    grid: int = 16,
    num_classes: int = 1000,
    tokenizer: str = "maskgit-vqgan",
    skip_bad: bool = False,
    resume: bool = False,
    shard_size: int = 65536,
    chunk_bytes: int = 1 << 20,
    allow_empty: bool = False,
) -> Path:
    """Stream RAR's released pre-tokenized ImageNet (``maskgitvq.jsonl``) into shards, in constant memory.

    Val split: every ``val_every``-th line (the val_every-th, 2*val_every-th, ...) goes to ``val``
    instead of ``train``: spread over the whole file, hence over every class; 1280 holds out about
    10,000 of the 12.8M lines. A line is one crop of an image whose other crops stay in train, so
    val tracks fit on held-out crops rather than unseen images; for that, tokenize ImageNet's own
    val folder with ``rar-llm tokenize``.

    Args:
        jsonl: the file; each line ``{"class_id": int, "tokens": [grid*grid ints]}``; gzip, bzip2
            or xz compressed files are read directly.
        out_dir: the data folder to write.
        val_every: hold out every this-many-th line as val; 0: no val split.
        codebook_size, grid, num_classes: of the tokenizer and data (RAR's: 1024, 16, 1000).
        tokenizer: recorded in ``meta.json`` so generation decodes with the tokenizer that made the codes.
        skip_bad: skip malformed lines (and report how many) instead of stopping at the first.
        resume: continue an interrupted import in ``out_dir``: same file (its size and first MiB,
            recorded in ``meta.json``) and ``val_every``.
        shard_size: samples per shard file.
        chunk_bytes: bytes of lines read, parsed and handed to the shard writer at a time.
        allow_empty: finish even if the file holds no valid line (otherwise zero samples is an error).
    """
    jsonl, out_dir = Path(jsonl), Path(out_dir)
    if jsonl.is_dir():
        raise IsADirectoryError(f"{jsonl} is a folder; give the .jsonl file (maskgitvq.jsonl)")
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl} not found; download maskgitvq.jsonl from huggingface.co/yucornetto/RAR")
    if val_every < 0 or val_every == 1:
        raise ValueError(f"val_every must be 0 (no val) or >= 2, got {val_every}")
    for name, value in (("codebook_size", codebook_size), ("grid", grid), ("num_classes", num_classes),
                        ("shard_size", shard_size), ("chunk_bytes", chunk_bytes)):
        positive_int(name, value)
    info = {"source": str(jsonl.resolve()), **source_fingerprint(jsonl), "tokenizer": tokenizer, "val_every": val_every}
    if resume:
        check_resume(out_dir, info, ("source_size", "source_sha256_1mib", "val_every"))
    f, raw = open_lines(jsonl)
    skipped, first_error = 0, None
    with raw, f, ShardWriter(
        out_dir, codebook_size, grid, grid, num_classes, shard_size=shard_size, resume=resume, info=info
    ) as w, tqdm(total=jsonl.stat().st_size, unit="B", unit_scale=True, desc=jsonl.name, dynamic_ncols=True) as bar:
        chunks = read_lines(f, jsonl, chunk_bytes, max(1 << 20, 64 * grid * grid), skip_bad)
        starts = (w.resume_position("train"), w.resume_position("val"))
        for lines, index, val in new_lines(chunks, starts, val_every):
            codes, labels, ok, errors = parse_lines(lines, grid * grid, codebook_size, num_classes)
            errors = [(int(index[i]) + 1, problem) for i, problem in errors]  # line numbers
            if errors and not skip_bad:
                raise ValueError(
                    f"{jsonl} line {errors[0][0]}: {errors[0][1]}; fix the line "
                    "or pass skip_bad=True (--skip_bad true) to skip malformed lines"
                )
            skipped, first_error = skipped + len(errors), first_error or (errors[0] if errors else None)
            for split, mask in (("train", ok & ~val), ("val", ok & val)):
                if mask.any():
                    w.add(split, codes[mask].reshape(-1, grid, grid), labels[mask], index[mask])
            bar.update(raw.tell() - bar.n)
        w.close()
        if not allow_empty and not w.num_samples("train") + w.num_samples("val"):
            raise ValueError(
                f"{jsonl} holds no valid line ({skipped} malformed skipped), so {out_dir} would hold no samples; "
                "check the file, or pass allow_empty=True (--allow_empty true)"
            )
    print(f"Wrote {w.num_samples('train')} train and {w.num_samples('val')} val samples to {out_dir}")
    if skipped:
        print(f"Skipped {skipped} malformed lines of {jsonl} (the first, line {first_error[0]}: {first_error[1]})")
    return out_dir
