"""Pre-tokenized image data on disk: memory-mapped ``.npy`` shards plus one ``meta.json``.

Layout of a data folder::

    meta.json                      codebook size, grid, classes, and the list of finished shards
    train-00000.codes.npy          (n, H, W) codes, uint16 (int32 for codebooks over 65536)
    train-00000.labels.npy         (n,) int32 class ids
    val-00000.codes.npy ...

Shards are written whole (temporary name, then rename) and only then listed in ``meta.json``, so an
interrupted writer leaves a folder that reads back consistently and can be resumed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

META = "meta.json"
FORMAT = "rar_llm-shards"


def code_dtype(codebook_size: int) -> type:
    """The dtype shards store codes in: uint16 where it holds the codebook."""
    return np.uint16 if codebook_size <= 65536 else np.int32


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``; else ValueError naming the setting (``--name``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_meta(data_dir: Path | str) -> dict:
    """``meta.json`` of a data folder, checked against what the readers assume (ValueError names the file)."""
    data_dir = Path(data_dir)
    path = data_dir / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a rar_llm data folder; create one with "
            "`rar-llm tokenize`, `rar-llm import-jsonl` or `rar-llm digits`"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e}); the folder is corrupt, re-create it") from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e})") from e

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; the folder is corrupt or from another tool, re-create it")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("codebook_size", "height", "width", "num_classes", "splits"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}; the folder is corrupt, re-create it")
    for key in ("codebook_size", "height", "width", "num_classes"):
        if not _is_count(meta[key], 1):
            raise bad(f"{key} is {meta[key]!r}, expected a positive integer")
    if meta.get("version", 1) != 1:
        raise ValueError(f"{path}: version {meta.get('version')!r} is newer than this rar_llm reads; upgrade rar_llm")
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != meta["num_classes"] or not all(isinstance(n, str) for n in names)
    ):
        raise bad(f"class_names must be a list of {meta['num_classes']} strings (num_classes)")
    if not isinstance(meta.get("info", {}), dict):
        raise bad("info must be a JSON object")
    dtype = meta.get("code_dtype", "uint16")
    if dtype not in ("uint16", "int32", "uint32", "uint8"):
        raise bad(f"code_dtype {dtype!r} is not an integer type rar_llm writes (uint16, int32)")
    splits = meta["splits"]
    if not isinstance(splits, dict):
        raise bad("splits must be a JSON object of split name -> list of shards")
    for split, shards in splits.items():
        if not isinstance(shards, list):
            raise bad(f"split {split!r} must be a list of shards")
        for entry in shards:
            if not isinstance(entry, dict):
                raise bad(f"split {split!r} lists {entry!r}, expected an object with file and num_samples")
            name = entry.get("file")
            if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
                raise bad(f"split {split!r} lists shard file {name!r}, expected a plain file name in the folder")
            if not _is_count(entry.get("num_samples"), 1):
                raise bad(f"shard {name}: num_samples is {entry.get('num_samples')!r}, expected a positive integer")
            if "end_position" in entry and not _is_count(entry["end_position"], 1):
                raise bad(f"shard {name}: end_position is {entry['end_position']!r}, expected a positive integer")
    return meta


def check_resume(out_dir: Path, info: dict, keys: tuple[str, ...]) -> None:
    """Refuse to resume a folder written from another source or with settings that would change which
    samples go where: each of ``keys`` in ``info`` must equal what ``meta.json`` recorded.

    A folder written before a key was recorded has no value for it; that key is not compared.
    """
    if not (Path(out_dir) / META).is_file():
        return
    old = read_meta(out_dir).get("info", {})
    for key in keys:
        if key in old and old[key] != info[key]:
            raise ValueError(
                f"{Path(out_dir) / META}: cannot resume, {key} was {old[key]!r} there but is {info[key]!r} now; "
                "resume with the same source and settings or write to a new folder"
            )


@dataclass
class _Pending:
    """A split's shard being written: codes go straight to its temporary file (the header says a full
    shard until it is closed), class ids and positions wait in arrays of one shard's size."""

    path: Path
    codes: BinaryIO
    labels: np.ndarray
    positions: np.ndarray
    n: int = 0


def _npy_header(dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header of a C-ordered array; numpy pads it so that a shorter shape has the same length."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


@dataclass
class ShardWriter:
    """Appends (codes, label) samples to a data folder, one finished shard at a time.

    ``resume=True`` continues a folder an earlier run left (its meta must agree); otherwise an
    existing folder with data is refused, so nothing is overwritten by accident.
    """

    data_dir: Path
    codebook_size: int
    height: int
    width: int
    num_classes: int
    class_names: list[str] | None = None
    shard_size: int = 65536
    resume: bool = False
    info: dict = field(default_factory=dict)
    resumable: bool = True  # whether the writing command has --resume (what a refusal suggests)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ("codebook_size", "height", "width", "num_classes", "shard_size"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes; give one name per class")
        self.dtype = code_dtype(self.codebook_size)
        self._created: list[Path] = []  # what this writer made, removed again if it fails before any shard
        self._pending: dict[str, _Pending] = {}
        new = {
            "format": FORMAT,
            "version": 1,
            "codebook_size": self.codebook_size,
            "height": self.height,
            "width": self.width,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "code_dtype": np.dtype(self.dtype).name,
            "info": self.info,
            "splits": {},
        }
        if (self.data_dir / META).is_file():
            if not self.resume:
                how = ", or pass --resume true to continue an interrupted run" if self.resumable else ""
                raise FileExistsError(f"{self.data_dir} already holds data ({META}); choose another folder or "
                                      f"delete it{how}")
            old = read_meta(self.data_dir)
            for key in ("codebook_size", "height", "width", "num_classes"):
                if old[key] != new[key]:
                    raise ValueError(
                        f"{self.data_dir / META}: cannot resume, {key} is {old[key]} there but {new[key]} now"
                    )
            self.meta = old
        else:
            if self.data_dir.exists() and not self.data_dir.is_dir():
                raise NotADirectoryError(f"{self.data_dir} is a file; give a folder for the data")
            if self.data_dir.is_dir():
                stray = sorted(self.data_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].*.npy"))
                if stray:
                    raise FileExistsError(
                        f"{self.data_dir} holds shard files ({stray[0].name}, ...) but no {META}; they would be "
                        "overwritten: choose another folder or move them away"
                    )
            missing = [p for p in (self.data_dir, *self.data_dir.parents) if not p.exists()]
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.meta = new
            _write_json_atomic(self.data_dir / META, self.meta)
            self._created = [self.data_dir / META, *missing]

    def num_samples(self, split: str) -> int:
        """Samples of a split already on disk (a resumed run skips that many)."""
        return sum(s["num_samples"] for s in self.meta["splits"].get(split, []))

    def resume_position(self, split: str) -> int:
        """Where a resumed run picks up in its source: one past the last finished sample's position."""
        shards = self.meta["splits"].get(split, [])
        return shards[-1].get("end_position", self.num_samples(split)) if shards else 0

    def add(self, split: str, codes: np.ndarray, labels: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Add samples; every ``shard_size`` of them become a shard (their codes go to its file at once).

        ``positions`` (increasing ints, default: the sample count) place each sample in its source (a
        line, an image's crop); each shard records one past its last, for :meth:`resume_position`.
        """
        codes = np.asarray(codes)
        labels = np.asarray(labels).reshape(-1)
        if codes.dtype.kind not in "iu" or labels.dtype.kind not in "iu":
            raise ValueError(
                f"codes and class ids must be integer arrays, got {codes.dtype} and {labels.dtype}; "
                "convert them exactly (a float code is not a code)"
            )
        if codes.ndim == 2:
            codes = codes[None]
        if codes.shape[1:] != (self.height, self.width) or codes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected codes (n, {self.height}, {self.width}) with n labels, got {codes.shape} and {labels.shape}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside the codebook 0..{self.codebook_size - 1}: {codes.min()}..{codes.max()}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class ids outside 0..{self.num_classes - 1}: {labels.min()}..{labels.max()}")
        if positions is None:
            pending = self._pending.get(split)
            start = self.resume_position(split) + (pending.n if pending else 0)
            positions = np.arange(start, start + len(labels))
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.shape != labels.shape:
            raise ValueError(f"expected {labels.shape[0]} positions, one per sample, got {positions.shape[0]}")
        done = 0
        while done < len(labels):
            pending = self._pending.get(split) or self._open(split)
            take = min(self.shard_size - pending.n, len(labels) - done)
            into, part = slice(pending.n, pending.n + take), slice(done, done + take)
            pending.codes.write(np.ascontiguousarray(codes[part], dtype=self.dtype).data)
            pending.labels[into], pending.positions[into] = labels[part], positions[part]
            pending.n += take
            done += take
            if pending.n == self.shard_size:
                self._flush(split)

    def _name(self, split: str) -> str:
        return f"{split}-{len(self.meta['splits'].get(split, [])):05d}"

    def _open(self, split: str) -> _Pending:
        path = self.data_dir / f"{self._name(split)}.codes.npy.tmp"
        f = open(path, "wb")
        f.write(_npy_header(self.dtype, (self.shard_size, self.height, self.width)))
        pending = _Pending(path, f, np.empty(self.shard_size, np.int32), np.empty(self.shard_size, np.int64))
        self._pending[split] = pending
        return pending

    def _flush(self, split: str) -> None:
        pending = self._pending.pop(split, None)
        if pending is None:
            return
        n, name = pending.n, self._name(split)
        with pending.codes as f:
            if n < self.shard_size:
                header = _npy_header(self.dtype, (n, self.height, self.width))
                if len(header) != len(_npy_header(self.dtype, (self.shard_size, self.height, self.width))):
                    raise RuntimeError(f"{pending.path}: the .npy header changed length")  # numpy pads it: a bug
                f.seek(0)
                f.write(header)
        os.replace(pending.path, self.data_dir / f"{name}.codes.npy")
        tmp = self.data_dir / f"{name}.labels.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, pending.labels[:n])
        os.replace(tmp, self.data_dir / f"{name}.labels.npy")
        shards = self.meta["splits"].setdefault(split, [])
        shards.append({"file": name, "num_samples": int(n), "end_position": int(pending.positions[n - 1]) + 1})
        _write_json_atomic(self.data_dir / META, self.meta)

    def close(self) -> None:
        """Write what is buffered as final (possibly short) shards."""
        for split in list(self._pending):
            self._flush(split)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            for pending in self._pending.values():  # unfinished shards: never listed, not kept
                pending.codes.close()
                pending.path.unlink(missing_ok=True)
            self._pending = {}
            self.discard()

    def discard(self) -> None:
        """Remove what this writer created (``meta.json``, new folders) if it wrote no shard yet.

        A run that fails before its first shard leaves nothing behind, so it can simply be rerun;
        once a shard exists, the folder stays for ``resume``.
        """
        if not self._created or any(self.meta["splits"].values()):
            return
        self._created[0].unlink(missing_ok=True)
        for folder in self._created[1:]:
            try:
                folder.rmdir()  # only if empty: never removes what someone else put there
            except OSError:
                break
        self._created = []


class Shards:
    """Random access to one split of a data folder, memory-mapped.

    Every shard's shape, dtype and class ids are checked against ``meta.json`` when opened, so a
    truncated or mismatched file fails here with its name, not later inside a training step.
    """

    def __init__(self, data_dir: Path | str, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.meta = meta = read_meta(self.data_dir)
        self.split = split
        if split not in meta["splits"] or not meta["splits"][split]:
            raise ValueError(
                f"{self.data_dir / META} has no split {split!r} (it has {sorted(meta['splits'])}); "
                "write that split or name an existing one"
            )
        H, W = meta["height"], meta["width"]
        self.codes: list[np.ndarray] = []
        labels = []
        for entry in meta["splits"][split]:
            n = entry["num_samples"]
            c = self._open(entry["file"] + ".codes.npy")
            lab = self._open(entry["file"] + ".labels.npy")
            if c.shape != (n, H, W):
                raise ValueError(
                    f"{self.data_dir / (entry['file'] + '.codes.npy')}: shape {c.shape} disagrees with "
                    f"{META} ({n} samples of {H}x{W}); the file is truncated or from another run, re-create the data"
                )
            if c.dtype.kind != "u" and c.dtype != np.dtype(meta.get("code_dtype", "uint16")):
                raise ValueError(
                    f"{self.data_dir / (entry['file'] + '.codes.npy')}: codes are {c.dtype}, expected unsigned "
                    f"integers ({meta.get('code_dtype', 'uint16')}); convert them exactly or re-create the data"
                )
            if lab.dtype.kind not in "iu":
                raise ValueError(
                    f"{self.data_dir / (entry['file'] + '.labels.npy')}: class ids are {lab.dtype}, expected "
                    "integers; convert them exactly or re-create the data"
                )
            if lab.shape != (n,):
                raise ValueError(
                    f"{self.data_dir / (entry['file'] + '.labels.npy')}: shape {lab.shape} disagrees with "
                    f"{META} ({n} labels); the file is truncated or from another run, re-create the data"
                )
            bad = (lab < 0) | (lab >= meta["num_classes"])
            if bad.any():
                raise ValueError(
                    f"{self.data_dir / (entry['file'] + '.labels.npy')}: class id {int(lab[bad][0])} outside "
                    f"0..{meta['num_classes'] - 1} given in {META}; fix num_classes or the labels"
                )
            self.codes.append(c)
            labels.append(np.asarray(lab))
        self.labels = np.concatenate(labels)
        self.ends = np.cumsum([len(c) for c in self.codes])

    def _open(self, name: str) -> np.ndarray:
        path = self.data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {META} but missing; re-create the data folder")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy raises many types for a damaged header or a short file
            raise ValueError(
                f"{path} is truncated or corrupt ({type(e).__name__}: {e}); re-create the data folder"
            ) from e

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """``(codes (H, W), class id)`` of one sample."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside {self.split!r} split of {len(self)}")
        s = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[s - 1]) if s else 0
        codes = np.asarray(self.codes[s][index - start])
        size = self.meta["codebook_size"]
        if codes.size and (codes.max() >= size or codes.min() < 0):
            bad = int(codes[(codes < 0) | (codes >= size)].flat[0])
            name = self.meta["splits"][self.split][s]["file"] + ".codes.npy"
            raise ValueError(
                f"{self.data_dir / name}: {self.split} sample {index}: code {bad} is outside the codebook "
                f"0..{size - 1} given in {META}; the data was made with another tokenizer than {META} says"
            )
        return codes, int(self.labels[index])
