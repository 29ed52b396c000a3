"""``rar-llm import-jsonl``: RAR's released pre-tokenized ImageNet (``maskgitvq.jsonl``) as shards.

Each line is ``{"class_id": int, "tokens": [ints]}``. Lines exactly as RAR's script writes them
(Python's ``json.dump``: ``{"class_id": 7, "tokens": [1, 2, 3]}``) are parsed a block at a time with
numpy, straight from the bytes; any other line (other spacing or key order, extra keys, or a
malformed one) goes through a JSON parser (orjson) and the line-by-line checks. Both paths accept
the same lines and give the same codes, and a malformed line is reported with its number either way.

Blocks of whole lines are parsed in worker processes (numpy holds Python's interpreter lock for much
of this work, so threads did not scale): the reading process reads each block straight into a buffer
shared with the workers (an anonymous shared mapping, inherited through fork) and takes the samples
back from it, so only a few numbers go through the pipes. Results are taken in file order, at most a
few blocks ahead, so memory stays constant and the shards are the same for any number of workers.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import mmap
import multiprocessing
import os
import signal
import sys
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from rar_llm.data.shards import ShardWriter, check_resume, code_dtype, positive_int

PREFIX = np.frombuffer(b'{"class_id": ', np.uint8)
MIDDLE = np.frombuffer(b', "tokens": [', np.uint8)
PAD = b"\0" * 16  # around a block, so that gathers a few bytes beyond a line stay inside it
BLOCK = 512  # lines per numpy pass: small enough that the temporaries stay in the CPU cache
AUTO_WORKERS_FROM = 64 << 20  # files at least this large are parsed in worker processes by default
BOM = b"\xef\xbb\xbf"
FORK = "fork" in multiprocessing.get_all_start_methods()
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

    @classmethod
    def split(cls, blob: bytes | memoryview) -> Lines:
        """The lines of ``blob``; the last may lack its line end."""
        ends = np.flatnonzero(np.frombuffer(blob, np.uint8) == 10)
        if len(blob) and (not len(ends) or ends[-1] != len(blob) - 1):
            ends = np.append(ends, len(blob))
        return cls(blob, ends)


def _fast_block(
    lines: Lines, num_tokens: int, codebook_size: int, num_classes: int, dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, class ids, codes)`` of lines in RAR's exact form, with every value in range; lines that
    are not ok (another form, malformed, out of range) have meaningless values.

    A line is ok when it is ``PREFIX number MIDDLE number (", " number)* "]}"`` and a line end, with
    ``1 + num_tokens`` numbers of at most 9 digits and no leading zeros: exactly the JSON RAR wrote.
    Every step is a pass over the bytes or a gather at the numbers' last digits; the values come
    from one gather of four-digit groups (two more per extra pair of digits).
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
    lead = (isd[2:] > isd[:-2]) & (a[1:-1] == 48)  # "0" starting a longer number: not JSON
    if lead.any():
        ok[np.searchsorted(st, np.flatnonzero(lead) + 1, side="right") - 1] = False
    long = isd[:-4] & isd[1:-3]  # five digits in a row: some number is longer than four
    long &= isd[2:-2]
    long &= isd[3:-1]
    long &= isd[4:]
    width = 4
    if long.any():
        L = np.empty_like(flat)  # digits of each number, once the separators between them are checked
        np.subtract(flat[1:], flat[:-1], out=L[1:])
        L -= 2
        L = L.reshape(n, T)
        L[:, 0] = Z0 - st - (P - 1)
        L[:, 1] = Z[:, 1] - Z0 - M
        longest = L.max(1)
        ok &= longest <= 9  # longer numbers do not fit int32: left to the exact path
        width = int(longest[ok].max()) if ok.any() else 1
    # pairs[i]: the digits at i - 1 and i as a number, a non-digit counting 0 (numbers are at least two
    # bytes apart, so a pair never reaches into the number before); groups[i]: the four digits ending
    # at i (the upper pair only where i - 1 is a digit, else it could be the number before), with bit 15
    # set where the bytes after i are ", " and a digit: one gather at the last digits gives both
    d *= isd
    pairs = np.empty_like(d)
    pairs[0] = d[0]
    np.multiply(d[:-1], 10, out=pairs[1:])
    pairs[1:] += d[1:]
    groups = pairs.astype(np.uint16)
    groups[2:] += np.multiply(pairs[:-2] * isd[1:-1], 100, dtype=np.uint16)
    separator = a[1:-2] == 44
    separator &= a[2:-1] == 32
    separator &= isd[3:]
    groups[:-3] |= np.left_shift(separator, 15, dtype=np.uint16)
    values = groups[flat].reshape(n, T)
    ok &= (values[:, 1:-1] >= 1 << 15).all(1)  # a separator after every token but the last
    values &= 0x7FFF
    if width > 4:
        values = values.astype(np.uint32)
        for j in range(4, width, 2):
            more = pairs[Z - j].astype(np.uint32)
            more *= L > j
            more *= 10**j
            values += more
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
    dtype = code_dtype(codebook_size)
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


def _read_blocks(f, path: Path, size: int, limit: int, skip_bad: bool, buffers: list[mmap.mmap]):
    """``(first line index, buffer number, length)``: whole lines read straight into ``buffers``, one
    after the other, at least ``size`` bytes and a line end at a time (a buffer is reused once the
    caller has taken the blocks read after it; each holds ``size + limit + len(TOO_LONG)`` bytes).

    A file without line ends cannot fill the memory: a line still open after ``limit`` bytes is an
    error, or with ``skip_bad`` stands as TOO_LONG (a line that ends within a read may be up to a
    read longer). Damaged compressed data is a ValueError naming the file.
    """

    def read(view: memoryview) -> int:
        try:
            return f.readinto(view)
        except READ_ERRORS as e:
            raise ValueError(
                f"{path}: cannot read past line {index} ({type(e).__name__}: {e}); "
                "the file is damaged or truncated, download it again"
            ) from None

    index, blocks, skipping, eof, room = 0, 0, False, False, size + limit + len(TOO_LONG)
    newline = np.empty(room, bool)  # scratch for counting lines (one allocation)
    carry = bytearray(3)
    carry = carry[: read(memoryview(carry))].removeprefix(BOM)  # a UTF-8 byte-order mark
    while True:
        buf = buffers[blocks % len(buffers)]
        buf[: len(carry)] = carry
        n, whole = len(carry), False
        while not eof and (n < len(carry) + size or not whole) and n < room:  # read on to a line end
            got = read(memoryview(buf)[n : len(carry) + size if n < len(carry) + size else min(room, n + size)])
            eof, n = not got, n + got
            if skipping and got:  # the rest of a line that is too long
                end = buf.find(b"\n", n - got, n)
                if end < 0:
                    n -= got
                    continue
                buf.move(len(TOO_LONG), end, n - end)
                buf[: len(TOO_LONG)], n, skipping, whole = TOO_LONG, len(TOO_LONG) + n - end, False, True
                continue
            whole = whole or buf.find(b"\n", n - got, n) >= 0
        if skipping:  # the file ended inside it
            buf[: len(TOO_LONG)], n, skipping = TOO_LONG, len(TOO_LONG), False
        cut = n if eof else buf.rfind(b"\n", 0, n) + 1
        lines = int(np.count_nonzero(np.equal(np.frombuffer(buf, np.uint8, cut), 10, out=newline[:cut])))
        carry = buf[cut:n]
        if len(carry) > limit:
            if not skip_bad:
                raise ValueError(
                    f"{path} line {index + lines + 1}: longer than {limit} bytes, not a line of codes; "
                    "is this RAR's JSONL? Pass skip_bad=True (--skip_bad true) to skip such lines"
                )
            carry, skipping = b"", True
        if cut:
            yield index, blocks % len(buffers), cut
            index, blocks = index + lines, blocks + 1
        if eof:
            return


_SHARED: list[mmap.mmap] = []  # in a worker process: the buffers it shares with the reading process


def _keep_heap() -> None:
    """Let the C heap keep what a block frees, so that the next block does not page-fault it back in.

    Each block allocates and frees some MB of numpy temporaries. glibc returns freed memory at the
    top of the heap to the system once more than its trim threshold is free; the threshold starts
    at 128 KiB and grows to twice the largest mmap-ed block freed so far (``man mallopt``). Without
    this, parsing in a block loop measured 2-3x slower. One freed 24 MiB block sets the threshold
    to 48 MiB, above a block's temporaries: what any program that once freed such an array gets.
    """
    np.empty(24 << 20, np.uint8)


def _start_worker(buffers: list[mmap.mmap]) -> None:
    """Keep the shared buffers and the heap; leave Ctrl-C to the reading process."""
    global _SHARED
    _SHARED = buffers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_heap()


def _shared_arrays(buf: mmap.mmap, offset: int, k: int, num_tokens: int, dtype) -> list[np.ndarray]:
    """Views of ``buf`` from ``offset`` (8-byte aligned) for ``k`` samples: codes, labels, positions, val."""
    arrays = []
    for shape, dt in (((k, num_tokens), dtype), ((k,), np.int64), ((k,), np.int64), ((k,), np.bool_)):
        offset = -(-offset // 8) * 8
        count = k * shape[-1] if len(shape) == 2 else k
        arrays.append(np.frombuffer(buf, dt, count, offset).reshape(shape))
        offset += count * np.dtype(dt).itemsize
    return arrays


def _parse_shared(slot: int, size: int, first: int, args: tuple) -> tuple[int, list]:
    """In a worker: parse the ``size`` bytes of lines in shared buffer ``slot``; the samples go after them."""
    buf = _SHARED[slot]
    parsed = _parse_chunk(Lines.split(memoryview(buf)[:size]), first, *args)
    k = len(parsed.labels)
    if size + 64 + parsed.codes.nbytes + 17 * k > len(buf):
        raise RuntimeError(f"import-jsonl: {k} samples do not fit a {len(buf)}-byte buffer")  # a bug, not bad input
    arrays = (parsed.codes, parsed.labels, parsed.positions, parsed.val)
    for view, array in zip(_shared_arrays(buf, size, k, args[0], parsed.codes.dtype), arrays):
        view[...] = array
    return k, parsed.errors


def _parsed(f, path: Path, read_args: tuple, args: tuple, workers: int):
    """``_parse_chunk`` of every block of ``f`` (``_read_blocks(f, path, *read_args)``), in file
    order; in ``workers`` processes if any, at most ``2 * workers`` blocks ahead of the one being
    written (each result may be a view of a shared buffer, valid until the next is asked for)."""
    size, limit, _ = read_args
    T, dtype = args[0], code_dtype(args[1])
    capacity = size + limit + len(TOO_LONG)  # the most a block can hold
    if workers < 1:
        _keep_heap()
        buffers = [mmap.mmap(-1, capacity)]
        for first, _, length in _read_blocks(f, path, *read_args, buffers):
            yield _parse_chunk(Lines.split(memoryview(buffers[0])[:length]), first, *args)
        return
    # then room for the samples: a line that gives one has at least 2 * T + 24 bytes
    capacity += (capacity // (2 * T + 24) + 1) * (T * np.dtype(dtype).itemsize + 17) + 64
    buffers = [mmap.mmap(-1, capacity) for _ in range(2 * workers + 1)]
    context = multiprocessing.get_context("fork")
    links, processes, pending, done = [], [], deque(), False
    try:
        for _ in range(workers):
            link, theirs = context.Pipe()
            processes.append(context.Process(target=_worker, args=(theirs, buffers), daemon=True))
            processes[-1].start()
            theirs.close()
            links.append(link)

        def died(i: int) -> RuntimeError:
            processes[i].join(timeout=1)
            return RuntimeError(f"import-jsonl: worker process {i} died (exit code {processes[i].exitcode})")

        def finished(keep: int):
            while len(pending) > keep:  # the oldest results, until at most ``keep`` blocks are pending
                slot, length, i = pending.popleft()
                try:
                    k, errors = links[i].recv()
                except (EOFError, OSError):
                    raise died(i) from None
                if isinstance(k, BaseException):
                    raise k
                yield Parsed(*_shared_arrays(buffers[slot], length, k, T, dtype), errors)

        for n, (first, slot, length) in enumerate(_read_blocks(f, path, *read_args, buffers)):
            i = n % workers  # in turn, so that results come back in file order
            try:
                links[i].send((slot, length, first, args))
            except OSError:  # a broken pipe: the worker is gone
                raise died(i) from None
            pending.append((slot, length, i))
            yield from finished(len(buffers) - 1)  # the next block goes into the oldest buffer
        yield from finished(0)
        for link in links:
            link.send(None)
        done = True
    finally:  # on an error (or a consumer that stops early) the workers are killed, not waited for
        for process in processes:
            if not done:
                process.kill()
            process.join()


def _worker(link, buffers: list[mmap.mmap]) -> None:
    """A worker process: parse the blocks it is sent, in order, until it is sent None."""
    _start_worker(buffers)
    while (task := link.recv()) is not None:
        try:
            link.send(_parse_shared(*task))
        except Exception as e:  # handed to the reading process, which raises it
            link.send((e, None))


def auto_workers(path: Path) -> int:
    """Worker processes by default: one per CPU core (at most 8) for files of 64 MiB or more, where
    starting them pays off; none where processes cannot be started by fork."""
    if not FORK or Path(path).stat().st_size < AUTO_WORKERS_FROM:
        return 0
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


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
    chunk_bytes: int = 1 << 21,
    workers: int | None = None,
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
        chunk_bytes: bytes read and parsed at a time (per worker).
        workers: processes parsing blocks while this one reads and writes; 0: parse here; None:
            ``auto_workers`` (one per core for large files). Shards are the same for any number.
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
    if workers is None:
        workers = auto_workers(jsonl)
    elif positive_int("workers", workers, minimum=0) and not FORK:
        raise ValueError(f"workers={workers} needs processes started by fork, which {sys.platform} lacks; pass workers=0")
    info = {"source": str(jsonl.resolve()), **source_fingerprint(jsonl), "tokenizer": tokenizer, "val_every": val_every}
    if resume:
        check_resume(out_dir, info, ("source_size", "source_sha256_1mib", "val_every"))
    f, raw = open_lines(jsonl)
    skipped, first_error = 0, None
    with raw, f, ShardWriter(
        out_dir, codebook_size, grid, grid, num_classes, shard_size=shard_size, resume=resume, info=info
    ) as w, tqdm(total=jsonl.stat().st_size, unit="B", unit_scale=True, desc=jsonl.name, dynamic_ncols=True) as bar:
        starts = (w.resume_position("train"), w.resume_position("val"))  # earlier lines are written
        read_args = (chunk_bytes, max(1 << 20, 64 * grid * grid), skip_bad)
        args = (grid * grid, codebook_size, num_classes, val_every, starts)
        for parsed in _parsed(f, jsonl, read_args, args, workers):
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
                    pick = slice(None) if mask.all() else mask  # a whole block: no copy
                    codes = parsed.codes[pick].reshape(-1, grid, grid)
                    w.add(split, codes, parsed.labels[pick], parsed.positions[pick])
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
