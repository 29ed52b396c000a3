"""``rar-llm import-jsonl``: RAR's released pre-tokenized ImageNet (``maskgitvq.jsonl``) as shards.

Each line is ``{"class_id": int, "tokens": [ints]}``. Lines exactly as RAR's script writes them
(Python's ``json.dump``: ``{"class_id": 7, "tokens": [1, 2, 3]}``) are parsed a block at a time with
numpy, straight from the bytes; any other line (other spacing or key order, extra keys, or a
malformed one) goes through a JSON parser (orjson) and the line-by-line checks. Both paths accept
the same lines and give the same codes, and a malformed line is reported with its number either way.

Chunks of lines can be parsed in worker threads (numpy releases the interpreter lock in its loops);
their results are taken in file order, at most a few chunks ahead, so memory stays constant and
the shards are the same for any number of workers.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from rar_llm.shards import ShardWriter, check_resume, positive_int

PREFIX = np.frombuffer(b'{"class_id": ', np.uint8)
MIDDLE = np.frombuffer(b', "tokens": [', np.uint8)
PAD = b"\0" * 16  # around a block, so that gathers a few bytes beyond a line stay inside it
READ_SIZE = 1 << 20
BLOCK = 256  # lines per numpy pass: small enough that the temporaries stay in the CPU cache
TOO_LONG = b"\0too long"  # stands for a line longer than the reader's limit (skipped with skip_bad)
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


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


def _parse_line(line: bytes, num_tokens: int, codebook_size: int, num_classes: int) -> tuple[int, np.ndarray]:
    """One ``{"class_id": int, "tokens": [ints]}`` line, exactly; ValueError says what is wrong with it."""
    if line == TOO_LONG:
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
    return label, np.array(tokens, dtype=np.int64)


@dataclass
class Lines:
    """Consecutive lines of the file in one ``blob``: line i ends at ``ends[i]`` (its "\\n", or the blob's end)."""

    blob: bytes | memoryview
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], self.ends[:-1] + 1]).astype(np.int64)

    def line(self, i: int) -> bytes:
        return bytes(self.blob[(int(self.ends[i - 1]) + 1 if i else 0) : int(self.ends[i])])

    def block(self, first: int, stop: int) -> Lines:
        """Lines ``first .. stop - 1`` (their blob a view, not a copy)."""
        start = int(self.ends[first - 1]) + 1 if first else 0
        end = int(self.ends[stop - 1])
        return Lines(memoryview(self.blob)[start : end + 1], self.ends[first:stop] - start)

    @classmethod
    def of(cls, lines: list[bytes]) -> Lines:
        lens = np.array([len(x) for x in lines], np.int64)
        return cls(b"\n".join(lines), np.cumsum(lens + 1) - 1)


def _fast_block(
    lines: Lines, num_tokens: int, codebook_size: int, num_classes: int, dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, class ids, codes)`` of lines in RAR's exact form, with every value in range; lines that
    are not ok (another form, malformed, out of range) have meaningless values.

    A line is ok when it is ``PREFIX number MIDDLE number (", " number)* "]}"`` and a line end, with
    ``1 + num_tokens`` numbers of at most 9 digits and no leading zeros: exactly the JSON RAR wrote.
    """
    n, T, P, M, B = len(lines), num_tokens + 1, len(PREFIX), len(MIDDLE), len(PAD)
    a = np.frombuffer(b"".join([PAD, lines.blob, PAD]), np.uint8)
    st = lines.starts + B
    ce = lines.ends + B  # content end: without a final "\r"
    ce -= (a[ce - 1] == 13) & (ce > st)
    d = a - np.uint8(48)
    isd = d < 10
    Z = np.flatnonzero(isd[:-1] > isd[1:])  # the last digit of every number
    first = np.searchsorted(Z, st)
    ok = np.searchsorted(Z, ce) - first == T
    if ok.all() and len(Z) == n * T:
        Z = Z.reshape(n, T)
    elif len(Z):
        Z = Z[np.minimum(first[:, None] + np.arange(T), len(Z) - 1)]
    else:
        Z = np.full((n, T), B, np.int64)
    Z0, flat = Z[:, 0], Z.reshape(-1)
    ok &= (a[st[:, None] + np.arange(P)] == PREFIX).all(1) & isd[st + P]
    ok &= (a[1:][Z0[:, None] + np.arange(M)] == MIDDLE).all(1) & isd[M + 1 :][Z0]
    ok &= (Z[:, -1] + 3 == ce) & (a[1:][Z[:, -1]] == 93) & (a[2:][Z[:, -1]] == 125)  # "]}" and the end
    separator = a[1:-2] == 44  # at z: the bytes after z are ", " and a digit
    separator &= a[2:-1] == 32
    separator &= isd[3:]
    ok &= separator[flat].reshape(n, T)[:, 1:-1].all(1)  # after every token but the last
    L = np.empty_like(flat)  # digits of each number, now that the delimiters between them are known
    np.subtract(flat[1:], flat[:-1], out=L[1:])
    L -= 2
    L = L.reshape(n, T)
    L[:, 0] = Z0 - st - (P - 1)
    L[:, 1] = Z[:, 1] - Z0 - M
    longest = L.max(1)
    ok &= longest <= 9  # longer numbers do not fit int32: left to the exact path
    lead = (isd[2:] > isd[:-2]) & (a[1:-1] == 48)  # "0" starting a longer number: not JSON
    if lead.any():
        ok[np.searchsorted(st, np.flatnonzero(lead) + 1, side="right") - 1] = False
    width = int(longest[ok].max()) if ok.any() else 1
    dz = np.zeros(len(a) + B, np.uint8)  # the digits, 0 elsewhere, B bytes late: dz[B - j:][z] is digit z - j
    np.multiply(d, isd, out=dz[B:])
    kind = np.uint16 if width <= 4 else np.int32
    values = dz[B:][flat].astype(kind)
    for j in range(1, width):
        digit = dz[B - j :][flat]
        if j >= 3:  # three bytes back a ", " is passed and the previous number begins
            digit *= L.reshape(-1) > j
        values += digit * kind(10**j)
    values = values.reshape(n, T)
    labels, codes = values[:, 0], values[:, 1:]
    ok &= (labels < num_classes) & (codes.max(1) < codebook_size)
    return ok, labels.astype(np.int64), codes.astype(dtype)


@dataclass
class Parsed:
    """A chunk's samples in file order, and its malformed lines as ``(line index, problem)``."""

    codes: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    val: np.ndarray
    errors: list[tuple[int, str]]


def _parse_chunk(
    lines: Lines, first: int, num_tokens: int, codebook_size: int, num_classes: int, val_every: int,
    starts: tuple[int, int],
) -> Parsed:
    """Lines ``first, first + 1, ...`` of the file; lines before ``starts`` (train, val) are already written."""
    index = np.arange(first, first + len(lines))
    val = (index + 1) % val_every == 0 if val_every else np.zeros(len(lines), bool)
    need = index >= np.where(val, starts[1], starts[0])
    if not need.all():
        lines = Lines.of([lines.line(i) for i in np.flatnonzero(need)])
        index, val = index[need], val[need]
    dtype = np.uint16 if codebook_size <= 65536 else np.int32
    if not len(lines):
        return Parsed(np.zeros((0, num_tokens), dtype), np.zeros(0, np.int64), index, val, [])
    blocks = [
        _fast_block(lines.block(b, min(b + BLOCK, len(lines))), num_tokens, codebook_size, num_classes, dtype)
        for b in range(0, len(lines), BLOCK)
    ]
    ok, labels, codes = (np.concatenate(x) if len(blocks) > 1 else x[0] for x in zip(*blocks))
    errors = []
    for i in np.flatnonzero(~ok):
        line = lines.line(i)
        if not line.strip():
            continue  # blank lines are skipped, but count for the position and the val split
        try:
            labels[i], codes[i] = _parse_line(line, num_tokens, codebook_size, num_classes)
            ok[i] = True
        except ValueError as e:
            errors.append((int(index[i]), str(e)))
    if not ok.all():
        codes, labels, index, val = codes[ok], labels[ok], index[ok], val[ok]
    return Parsed(codes, labels, index, val, errors)


def _read_chunks(f, path: Path, chunk: int, limit: int, skip_bad: bool):
    """``(first line index, Lines)``, ``chunk`` lines at a time (their blob a view of what was read).

    The file is read a MiB at a time, so a file without line ends cannot fill the memory: a line
    still open after ``limit`` bytes is an error, or with ``skip_bad`` stands as TOO_LONG (lines
    that end within a read may be up to a read longer). Damaged compressed data is a ValueError
    naming the file.
    """
    index, data, pos, newlines, skipping, eof = 0, b"", 0, np.zeros(0, np.int64), False, False
    while True:
        while len(newlines) < chunk and not eof:  # data[pos:] holds fewer than chunk lines: read on
            try:
                block = f.read(READ_SIZE)
            except READ_ERRORS as e:
                raise ValueError(
                    f"{path}: cannot read past line {index + len(newlines)} ({type(e).__name__}: {e}); "
                    "the file is damaged or truncated, download it again"
                ) from None
            if not block:
                eof = True
                break
            if skipping:  # the rest of a line that is too long
                cut = block.find(b"\n")
                if cut < 0:
                    continue
                block, skipping = TOO_LONG + block[cut:], False
            data, newlines = data[pos:] + block, newlines - pos
            pos = 0
            newlines = np.concatenate([newlines, np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + len(data) - len(block)])
            if len(data) - (int(newlines[-1]) + 1 if len(newlines) else 0) > limit:
                if not skip_bad:
                    raise ValueError(
                        f"{path} line {index + len(newlines) + 1}: longer than {limit} bytes, not a line "
                        "of codes; is this RAR's JSONL? Pass skip_bad=True (--skip_bad true) to skip such lines"
                    )
                data, skipping = data[: int(newlines[-1]) + 1 if len(newlines) else 0], True
        if eof and (skipping or (len(data) > pos and (not len(newlines) or newlines[-1] + 1 < len(data)))):
            data = data[pos:] + (TOO_LONG if skipping else b"")  # the last line, without a line end
            newlines, pos, skipping = np.append(newlines - pos, len(data)), 0, False
        if not len(newlines):
            return
        k = min(chunk, len(newlines))
        end = int(newlines[k - 1]) + 1
        lines = Lines(memoryview(data)[pos:end], newlines[:k] - pos)
        pos, newlines = end, newlines[k:]
        if index == 0 and bytes(lines.blob[:3]) == b"\xef\xbb\xbf":
            lines = Lines(lines.blob[3:], lines.ends - 3)  # a UTF-8 byte-order mark
        yield index, lines
        index += k


def _parsed(chunks, args: tuple, workers: int):
    """``_parse_chunk`` of every chunk, in file order; in ``workers`` threads if any (numpy releases
    the interpreter lock in its loops, so they parse while this thread reads and writes), at most
    ``2 * workers`` chunks ahead of the one being written."""
    if workers < 1:
        for first, lines in chunks:
            yield _parse_chunk(lines, first, *args)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="import-jsonl") as pool:
        pending: deque = deque()
        try:
            for first, lines in chunks:
                pending.append(pool.submit(_parse_chunk, lines, first, *args))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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
    chunk: int = 2048,
    workers: int = 0,
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
        chunk: lines parsed at a time (per worker) before they are handed to the shard writer.
        workers: threads parsing chunks besides the one reading and writing (numpy works outside
            Python's interpreter lock, so they can help on idle cores; on a busy 2-core machine they
            did not); 0: parse in the calling thread. Shards are the same either way.
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
                        ("shard_size", shard_size), ("chunk", chunk)):
        positive_int(name, value)
    positive_int("workers", workers, minimum=0)
    info = {"source": str(jsonl.resolve()), **source_fingerprint(jsonl), "tokenizer": tokenizer, "val_every": val_every}
    if resume:
        check_resume(out_dir, info, ("source_size", "source_sha256_1mib", "val_every"))
    f, raw = open_lines(jsonl)
    skipped, first_error = 0, None
    with raw, f, ShardWriter(
        out_dir, codebook_size, grid, grid, num_classes, shard_size=shard_size, resume=resume, info=info
    ) as w, tqdm(total=jsonl.stat().st_size, unit="B", unit_scale=True, desc=jsonl.name, dynamic_ncols=True) as bar:
        starts = (w.resume_position("train"), w.resume_position("val"))  # earlier lines are written
        limit = max(1 << 20, 64 * grid * grid)
        chunks = _read_chunks(f, jsonl, chunk, limit, skip_bad)
        for parsed in _parsed(chunks, (grid * grid, codebook_size, num_classes, val_every, starts), workers):
            if parsed.errors and not skip_bad:
                index, problem = parsed.errors[0]
                raise ValueError(
                    f"{jsonl} line {index + 1}: {problem}; fix the line "
                    "or pass skip_bad=True (--skip_bad true) to skip malformed lines"
                )
            skipped += len(parsed.errors)
            first_error = first_error or (parsed.errors[0] if parsed.errors else None)
            for split, mask in (("train", ~parsed.val), ("val", parsed.val)):
                if mask.any():
                    codes = parsed.codes[mask].reshape(-1, grid, grid)
                    w.add(split, codes, parsed.labels[mask], parsed.positions[mask])
            bar.update(raw.tell() - bar.n)
        w.close()
        if not allow_empty and not w.num_samples("train") + w.num_samples("val"):
            raise ValueError(
                f"{jsonl} holds no valid line ({skipped} malformed skipped), so {out_dir} would hold no samples; "
                "check the file, or pass allow_empty=True (--allow_empty true)"
            )
    print(f"Wrote {w.num_samples('train')} train and {w.num_samples('val')} val samples to {out_dir}")
    if skipped:
        index, problem = first_error
        print(f"Skipped {skipped} malformed lines of {jsonl} (the first, line {index + 1}: {problem})")
    return out_dir
