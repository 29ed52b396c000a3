"""Fuzz tests of the newer commands' inputs: IDX files (``fashion-mnist``), the small nets' safetensors files
(the VQ tokenizer, the CNN) and ``extend``'s base folders.

Every case must end in our one-line error naming the file, or in output the test checks against its own
reading of the input (IDX bytes parsed here, safetensors bytes parsed here, the base's weights and
tokenizer): never another library's exception leaking out, output that silently differs from the input,
or a user's file lost or changed. Seeded; each test prints its counts (``pytest -s`` shows them).
"""

import gzip
import json
import math
import random
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")

from test_extend import make_base  # noqa: E402  (the tiny litgpt bases test_extend builds)
from test_fashion import idx_bytes  # noqa: E402
from test_fuzz_data import deadline  # noqa: E402

from rar_llm.__main__ import main  # noqa: E402
from rar_llm.checkpoint import load_model  # noqa: E402
from rar_llm.extend import extend  # noqa: E402
from rar_llm.data.fashion import CLASS_NAMES, FILES, SIZE, load_split, read_idx  # noqa: E402
from rar_llm.data.shards import Shards  # noqa: E402
from rar_llm.eval.classifier import CNNClassifier  # noqa: E402
from rar_llm.tokenizers import load_tokenizer  # noqa: E402
from rar_llm.tokenizers.vq import VQTokenizer  # noqa: E402

OURS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def ours(error: BaseException, *paths: Path) -> bool:
    """Our one-line error: one of our types, naming one of ``paths`` (its path, or its name where a folder's
    path is in the message too)."""
    text = str(error)
    named = any(str(p) in text for p in paths)
    return type(error) in OURS and named and "\n" not in text


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, a folder as None."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ---- IDX files -------------------------------------------------------------------------------------------

IMAGES, LABELS = FILES["train"]
NDIM = {IMAGES: 3, LABELS: 1}
IDX_KINDS = ("as written", "truncated", "byte changed", "bytes inserted", "bytes deleted", "magic", "type byte",
             "dimension count", "header size", "header size overflowing", "gzip damaged", "gzip truncated",
             "labels out of range", "counts differ", "not 28x28", "no images", "empty", "a folder", "missing",
             "raw and .gz differ")


def parse_idx(data: bytes, ndim: int) -> np.ndarray | None:
    """The test's own reading of IDX bytes (gzipped or not): the array, or None where they are not one."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except Exception:
            return None
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        return None
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    body = data[4 + 4 * ndim :]
    return np.frombuffer(body, np.uint8).reshape(dims) if len(body) == math.prod(dims) else None


def expected_split(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """What ``load_split(folder, "train")`` must return (the raw file before the .gz), or None for a refusal."""
    arrays = []
    for name in (IMAGES, LABELS):
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        arrays.append(None if path is None else parse_idx(path.read_bytes(), NDIM[name]))
    images, labels = arrays
    if images is None or labels is None or len(images) != len(labels) or not len(images):
        return None
    if images.shape[1:] != SIZE or labels.max() >= len(CLASS_NAMES):
        return None
    return images, labels


def damage_idx(rng: random.Random, nrng: np.random.Generator, kind: str) -> tuple[str, dict[str, bytes]]:
    """``(the file damaged, {name: bytes})`` of a training split with one defect of ``kind``."""
    n = rng.randrange(1, 6)
    arrays = {IMAGES: nrng.integers(0, 256, (n, *SIZE), dtype=np.uint8), LABELS: nrng.integers(0, 10, n, dtype=np.uint8)}
    target = rng.choice([IMAGES, LABELS])
    if kind == "labels out of range":
        target = LABELS
        arrays[LABELS][rng.randrange(n)] = rng.randrange(10, 256)
    elif kind == "counts differ":
        other = n + rng.choice([-1, 1, 3])
        arrays[target] = arrays[target][:other] if other < n else np.concatenate([arrays[target]] * 4)[:other]
    elif kind == "not 28x28":
        target = IMAGES
        arrays[IMAGES] = nrng.integers(0, 256, (n, *rng.choice([(28, 27), (27, 28), (32, 32), (1, 784), (14, 56)])),
                                       dtype=np.uint8)
    elif kind == "no images":
        arrays = {name: a[:0] for name, a in arrays.items()}
    elif kind == "dimension count" and rng.random() < 0.5:  # a consistent header of another rank
        arrays[target] = arrays[target].reshape(n, -1) if target == IMAGES else arrays[target][:, None]
    files = {name: idx_bytes(a) for name, a in arrays.items()}
    raw = bytearray(files[target])
    if kind == "truncated":
        raw = raw[: rng.randrange(len(raw))]
    elif kind == "byte changed":
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(16 if rng.random() < 0.6 else len(raw)) % len(raw)] = rng.randrange(256)
    elif kind == "bytes inserted":
        pos = rng.randrange(len(raw) + 1)
        raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
    elif kind == "bytes deleted":
        pos = rng.randrange(len(raw))
        del raw[pos : pos + rng.randrange(1, 5)]
    elif kind == "magic":
        raw[rng.randrange(2)] = rng.randrange(1, 256)
    elif kind == "type byte":
        raw[2] = rng.choice([0x00, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF])
    elif kind == "dimension count" and raw[3] == NDIM[target]:
        raw[3] = rng.choice([d for d in range(6) if d != NDIM[target]])
    elif kind == "header size":
        i = rng.randrange(NDIM[target])
        old = struct.unpack_from(">I", raw, 4 + 4 * i)[0]
        struct.pack_into(">I", raw, 4 + 4 * i, rng.choice([old - 1, old + 1, 0, 2**32 - 1, rng.randrange(2**32)]) % 2**32)
    elif kind == "header size overflowing":  # 2**22 * 2**21 * 2**21 = 2**64: a product that wraps to 0 in int64
        target = IMAGES
        raw = bytearray(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**22, 2**21, 2**21) + bytes(rng.randrange(3)))
    elif kind == "empty":
        raw = bytearray()
    files[target] = bytes(raw)
    return target, files


def write_idx_case(folder: Path, rng: random.Random, kind: str, target: str, files: dict[str, bytes]) -> Path:
    """The split's files in ``folder`` (each raw or gzipped) and the path of the damaged one."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        gz = rng.random() < 0.5 or (name == target and kind.startswith("gzip"))
        if name == target and kind == "raw and .gz differ":
            (folder / f"{name}.gz").write_bytes(gzip.compress(data[: len(data) // 2]))  # found second, never read
            gz = False
        data = gzip.compress(data) if gz else data
        if name == target and kind == "gzip damaged":
            data = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        elif name == target and kind == "gzip truncated":
            data = data[: rng.randrange(len(data))]
        path = folder / (f"{name}.gz" if gz else name)
        if name == target and kind == "a folder":
            path.mkdir()
            (path / "inside").write_bytes(data)
        elif not (name == target and kind == "missing"):
            path.write_bytes(data)
        if name == target:
            target_path = path
    for name, data in zip(FILES["test"], (idx_bytes(np.zeros((2, *SIZE))), idx_bytes(np.array([3, 4])))):
        (folder / name).write_bytes(data)  # a valid test split, for the command
    return target_path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``rar-llm ARGS``: (exit code, what it printed on stderr)."""
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_fuzz_idx_files(tmp_path, capsys):
    rng, nrng = random.Random(23), np.random.default_rng(23)
    counts, kinds = Counter(), Counter()
    start = time.perf_counter()
    for case in range(300):
        kind = IDX_KINDS[case % len(IDX_KINDS)] if case < 2 * len(IDX_KINDS) else rng.choice(IDX_KINDS)
        kinds[kind] += 1
        folder = tmp_path / f"case{case}"
        target, files = damage_idx(rng, nrng, kind)
        path = write_idx_case(folder, rng, kind, target, files)
        before = snapshot(folder)
        with deadline(10):
            try:  # the file itself
                got = read_idx(path, ndim=NDIM[target])
            except OURS as e:
                assert ours(e, path), f"case {case} ({kind}): {type(e).__name__}: {e}"
                counts["read_idx: refused, naming the file"] += 1
            except BaseException as e:
                pytest.fail(f"case {case} ({kind}): {type(e).__name__} leaked from read_idx: {e!r}")
            else:
                want = parse_idx(path.read_bytes(), NDIM[target])
                assert want is not None, f"case {case} ({kind}): read a file that is not IDX: {path.read_bytes()[:40]!r}"
                assert got.dtype == np.uint8 and np.array_equal(got, want), f"case {case} ({kind}): other values"
                counts["read_idx: the values written"] += 1
            want = expected_split(folder)
            split_files = [folder / n for n in (IMAGES, LABELS)] + [folder / f"{n}.gz" for n in (IMAGES, LABELS)]
            try:  # the split: both files, checked against each other
                images, labels = load_split(folder, "train")
            except OURS as e:
                assert ours(e, *split_files) or (ours(e, folder) and target in str(e)), f"case {case} ({kind}): {e}"
                assert want is None, f"case {case} ({kind}): refused a valid split: {e}"
                counts["load_split: refused, naming the file"] += 1
            except BaseException as e:
                pytest.fail(f"case {case} ({kind}): {type(e).__name__} leaked from load_split: {e!r}")
            else:
                assert want is not None, f"case {case} ({kind}): a damaged split loaded"
                assert np.array_equal(images, want[0]) and np.array_equal(labels, want[1]), f"case {case} ({kind})"
                assert labels.dtype == np.int64
                counts["load_split: the images and labels written"] += 1
            if case % 5 == 0:  # the command on the folder
                out = tmp_path / f"out{case}"
                code, err = run_cli(["fashion-mnist", "--out_dir", str(out), "--source_dir", str(folder)], capsys)
                if want is None:
                    assert code == 2 and err.startswith("rar-llm fashion-mnist: error:") and "\n" not in err, \
                        f"case {case} ({kind}): exit {code}: {err}"
                    assert any(str(p) in err for p in split_files) or target in err, f"case {case} ({kind}): {err}"
                    assert not out.exists(), f"case {case} ({kind}): a refused run left {out}"
                    counts["fashion-mnist: one line, exit 2"] += 1
                else:
                    assert code == 0, f"case {case} ({kind}): exit {code}: {err}"
                    s = Shards(out, "train")
                    got = [s[i] for i in range(len(s))]
                    assert len(got) == len(want[1]) and all(
                        np.array_equal(c.reshape(SIZE), image) and y == label
                        for (c, y), image, label in zip(got, *want)  # 256 greys: each code is its pixel
                    ), f"case {case} ({kind}): shards differ from the files"
                    assert len(Shards(out, "val")) == 2
                    counts["fashion-mnist: shards of the images written"] += 1
        assert snapshot(folder) == before, f"case {case} ({kind}): the input folder changed"
        shutil.rmtree(folder)
    took = time.perf_counter() - start
    print(f"\nIDX fuzz: 300 cases in {took:.1f} s: {dict(counts)}\n  defects: {dict(kinds)}")
    assert set(kinds) == set(IDX_KINDS) and len(counts) == 6 and all(counts.values()), dict(counts)
    assert took < 30


# ---- network files (VQ tokenizer, CNN) ---------------------------------------------------------------------

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
NET_KINDS = ("as written", "format", "format missing", "other kind", "config not JSON", "config missing",
             "config not an object", "config key missing", "config key unknown", "config value type",
             "config value refused", "config value other", "report not JSON", "report missing", "tensor missing",
             "tensor extra", "tensor renamed", "tensor reshaped", "tensor dtype", "NaN", "inf",
             "truncated", "random bytes", "header length", "header byte", "data byte", "appended", "empty", "a folder")
MUST_LOAD = {"as written", "report missing"}
MAY_LOAD = {"config value other", "header byte", "data byte", "appended"}  # loaded as the file says, or refused
REFUSED_VALUES = {"codebook_size": [1, 0, -3], "grid": [5, 6, 0, -7], "image_size": [30, 0, -28, 10**12],
                  "width": [0, -1, 10**12], "dim": [0, -4], "num_classes": [0, -1], "features": [0, -8, 10**12],
                  "decay": [float("nan"), float("inf")], "dead_code": [float("-inf")], "commitment": [float("nan")]}


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The test's own reading of a safetensors file: ``(tensors, metadata)``."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors, meta


def damage_net(data: bytes, other: bytes, kind: str, rng: random.Random) -> bytes | None:
    """The bytes of a net file with one defect of ``kind`` (None: a folder in its place)."""
    from safetensors.torch import save

    if kind in ("truncated", "random bytes", "header length", "header byte", "data byte", "appended", "empty"):
        raw = bytearray(data)
        n = int.from_bytes(raw[:8], "little")
        if kind == "truncated":
            return bytes(raw[: rng.randrange(len(raw))])
        if kind == "random bytes":
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        if kind == "header length":
            raw[:8] = rng.choice([n - 1, n + 1, n + 8, 0, 2**40, 2**64 - 1, len(raw)]).to_bytes(8, "little")
        elif kind in ("header byte", "data byte"):
            lo, hi = (8, 8 + n) if kind == "header byte" else (8 + n, len(raw))
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(lo, hi)] = rng.randrange(256)
        elif kind == "appended":
            raw += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        else:
            raw = bytearray()
        return bytes(raw)
    if kind == "as written":
        return data
    if kind == "a folder":
        return None
    if kind == "other kind":
        return other
    state, meta = parse_safetensors(data)
    state = {k: v.clone() for k, v in state.items()}
    config = json.loads(meta["config"])
    key = rng.choice(sorted(config))
    floats = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel())
    name = rng.choice(floats)
    if kind == "format":
        meta["format"] = rng.choice(["rar_llm-vq2", "", "rar_llm-cnn" if meta["format"] != "rar_llm-cnn" else "rar_llm-vq"])
    elif kind == "format missing":
        del meta["format"]
    elif kind == "config not JSON":
        meta["config"] = rng.choice(["", "{", "{'width': 4}", meta["config"][:-1], "nan nan"])
    elif kind == "config missing":
        del meta["config"]
    elif kind == "config not an object":
        meta["config"] = json.dumps(rng.choice([[4, 8], 4, "width", None, True]))
    elif kind == "config key missing":
        del config[key]
    elif kind == "config key unknown":
        config[rng.choice(["channels", "self", "Width", "hidden"])] = 4
    elif kind == "config value type":
        config[key] = rng.choice(["4", None, True, [4], {"v": 4}] + ([float(config[key])] if type(config[key]) is int else []))
    elif kind == "config value refused":
        key = rng.choice([k for k in config if k in REFUSED_VALUES])
        config[key] = rng.choice(REFUSED_VALUES[key])
    elif kind == "config value other":
        config[key] = config[key] * 2 if type(config[key]) is int else config[key] / 2
    elif kind == "report not JSON":
        meta["report"] = rng.choice(["", "{", "NaN]"])
    elif kind == "report missing":
        meta.pop("report", None)
    elif kind == "tensor missing":
        del state[name]
    elif kind == "tensor extra":
        state[rng.choice(["extra.weight", f"{name}_copy", "quantizer.zero"])] = torch.zeros(3)
    elif kind == "tensor renamed":
        state[name.replace(".", "_", 1)] = state.pop(name)
    elif kind == "tensor reshaped":
        v = state[name]
        shapes = [v.reshape(-1), v[..., :-1] if v.shape[-1] > 1 else v.reshape(1, -1), torch.cat([v, v])]
        state[name] = rng.choice([w for w in shapes if w.shape != v.shape])
    elif kind == "tensor dtype":
        state[name] = state[name].to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32]))
    elif kind in ("NaN", "inf"):
        flat = state[name].reshape(-1)
        flat[rng.randrange(len(flat))] = float("nan") if kind == "NaN" else rng.choice([float("inf"), float("-inf")])
    else:
        raise AssertionError(f"no damage of kind {kind!r}")
    if "config" in meta and kind not in ("config not JSON", "config not an object"):
        meta["config"] = json.dumps(config)
    return save({k: v.contiguous() for k, v in state.items()}, metadata=meta)


def check_loaded(net: torch.nn.Module, data: bytes, case: str) -> None:
    """The net holds exactly the file's tensors and settings."""
    tensors, meta = parse_safetensors(data)
    state = net.state_dict()
    assert state.keys() == tensors.keys(), f"{case}: tensors {sorted(state.keys() ^ tensors.keys())}"
    for k, v in tensors.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), f"{case}: {k} differs from the file"
    assert net.config == json.loads(meta["config"]), f"{case}: settings {net.config}"
    assert net.report == (json.loads(meta["report"]) if "report" in meta else None), f"{case}: report"
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_fuzz_network_files(tmp_path):
    torch.manual_seed(0)
    files = {"vq": VQTokenizer(16, 7, 28, width=4, dim=4).save(tmp_path / "vq.safetensors", {"psnr_db": 20.5}),
             "cnn": CNNClassifier(28, 10, width=4, features=8).save(tmp_path / "cnn.safetensors", {"test_accuracy": 0.5})}
    data = {k: p.read_bytes() for k, p in files.items()}
    loaders = {"vq": [load_tokenizer, VQTokenizer.load], "cnn": [CNNClassifier.load]}
    rng = random.Random(23)
    counts, kinds = Counter(), Counter()
    start = time.perf_counter()
    for case in range(300):
        kind = NET_KINDS[case % len(NET_KINDS)] if case < 2 * len(NET_KINDS) else rng.choice(NET_KINDS)
        kinds[kind] += 1
        net_kind = rng.choice(["vq", "cnn"])
        other = "cnn" if net_kind == "vq" else "vq"
        raw = damage_net(data[net_kind], data[other], kind, rng)
        path = tmp_path / f"case{case}.safetensors"
        path.mkdir() if raw is None else path.write_bytes(raw)
        load = rng.choice(loaders[net_kind])
        label = f"case {case} ({net_kind} file, {kind}, {load.__qualname__})"
        try:
            with deadline(10):
                net = load(path)
        except OURS as e:
            assert ours(e, path), f"{label}: {type(e).__name__}: {e}"
            assert kind not in MUST_LOAD, f"{label}: a valid file refused: {e}"
            counts["refused, naming the file" + (" (bytes)" if kind in MAY_LOAD else "")] += 1
        except BaseException as e:
            pytest.fail(f"{label}: {type(e).__name__} leaked: {e!r}")
        else:
            assert kind in MUST_LOAD | MAY_LOAD, f"{label}: a damaged file loaded"
            check_loaded(net, raw, label)
            counts["loaded, the file's tensors and settings" + ("" if kind in MUST_LOAD else " (as edited)")] += 1
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    took = time.perf_counter() - start
    print(f"\nnetwork-file fuzz: 300 cases in {took:.1f} s: {dict(counts)}\n  defects: {dict(kinds)}")
    assert set(kinds) == set(NET_KINDS) and len(counts) == 4, dict(counts)
    assert took < 30


# ---- extend's base folders -------------------------------------------------------------------------------

BASE_KINDS = ("as given", "weights truncated", "weights byte changed", "weights empty", "weights text", "weights NaN",
              "weights tensor missing", "weights extra tensor", "weights shape", "config not yaml", "config a list",
              "config width changed", "config removed", "tokenizer.json truncated", "tokenizer.json not json",
              "tokenizer.json removed", "tokenizer_config not json", "tokenizer_config a list",
              "generation_config garbage", "hyperparameters garbage")
MUST_EXTEND = {"as given", "hyperparameters garbage"}  # files extend does not read or only copies
MAY_EXTEND = {"weights byte changed", "generation_config garbage"}  # bytes no reader depends on / copied as they are


def damage_base(folder: Path, kind: str, rng: random.Random) -> Path:
    """Apply one defect of ``kind`` to the base folder; returns the file it touched."""
    weights, config = folder / "lit_model.pth", folder / "model_config.yaml"
    if kind == "as given":
        return folder
    if kind.startswith("weights"):
        raw = bytearray(weights.read_bytes())
        if kind == "weights truncated":
            raw = raw[: rng.randrange(len(raw))]
        elif kind == "weights byte changed":
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif kind == "weights empty":
            raw = bytearray()
        elif kind == "weights text":
            raw = bytearray(b"model weights go here\n")
        else:
            sd = torch.load(weights, weights_only=True)
            name = rng.choice(sorted(sd))
            if kind == "weights NaN":
                sd[name].view(-1)[rng.randrange(sd[name].numel())] = float("nan")
            elif kind == "weights tensor missing":
                del sd[name]
            elif kind == "weights extra tensor":
                sd["transformer.h.9.attn.extra.weight"] = torch.zeros(3)
            else:
                sd[name] = sd[name][..., :-1] if sd[name].dim() else sd[name].reshape(1)
            torch.save(sd, weights)
            return weights
        weights.write_bytes(bytes(raw))
        return weights
    if kind.startswith("config"):
        if kind == "config not yaml":
            config.write_text("n_layer: [2\n  name: {")
        elif kind == "config a list":
            config.write_text("- 1\n- 2\n")
        elif kind == "config width changed":
            config.write_text(config.read_text().replace("n_embd: 32", "n_embd: 48"))
        else:
            config.unlink()
        return config
    name = {"tokenizer.json": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
            "generation_config": "generation_config.json", "hyperparameters": "hyperparameters.yaml"}[kind.split()[0]]
    path = folder / name
    if kind.endswith("truncated"):
        path.write_bytes(path.read_bytes()[: rng.randrange(1, len(path.read_bytes()) // 2)])
    elif kind.endswith("removed"):
        path.unlink()
    elif kind.endswith("a list"):
        path.write_text("[1, 2]")
    else:  # not json / garbage
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))))
    return path


def test_fuzz_extend_base_folders(tmp_path, capsys):
    pristine = make_base(tmp_path / "pristine", "llama")
    weights = torch.load(pristine / "lit_model.pth", weights_only=True)
    rng = random.Random(23)
    counts, kinds = Counter(), Counter()
    start = time.perf_counter()
    for case in range(300):
        kind = BASE_KINDS[case % len(BASE_KINDS)] if case < 2 * len(BASE_KINDS) else rng.choice(BASE_KINDS)
        kinds[kind] += 1
        base, out = tmp_path / f"base{case}", tmp_path / f"out{case}"
        shutil.copytree(pristine, base)
        touched = damage_base(base, kind, rng)
        before = snapshot(base)
        label = f"case {case} ({kind})"
        with deadline(20):
            if case % 4 == 0:  # the command: one line, exit 2
                code, err = run_cli(["extend", "--checkpoint_dir", str(base), "--layout", "digits", "--out_dir",
                                     str(out)], capsys)
                failed = None if code == 0 else err
                if code != 0:
                    assert code == 2 and err.startswith("rar-llm extend: error:") and "\n" not in err, f"{label}: {err}"
            else:
                try:
                    extend(base, "digits", out)
                    failed = None
                except OURS as e:
                    failed = str(e)
                    assert ours(e, touched, base), f"{label}: {type(e).__name__}: {e}"
                except BaseException as e:
                    pytest.fail(f"{label}: {type(e).__name__} leaked from extend: {e!r}")
        if failed is not None:
            assert kind not in MUST_EXTEND, f"{label}: a usable base refused: {failed}"
            assert str(base) in failed, f"{label}: the message does not name the base: {failed}"
            assert not out.exists(), f"{label}: a refused run left {out}"
            counts["refused, naming the file"] += 1
        else:
            assert kind in MUST_EXTEND | MAY_EXTEND, f"{label}: a damaged base extended"
            model = load_model(out, dtype=torch.float32)
            rows = weights["transformer.wte.weight"].shape[0]
            assert torch.equal(model.transformer.wte.weight[:rows], weights["transformer.wte.weight"]), label
            for name in ("generation_config.json",):
                assert (out / name).read_bytes() == (base / name).read_bytes(), f"{label}: {name} not copied as is"
            counts["extended, the base's text weights kept"] += 1
        assert snapshot(base) == before, f"{label}: the base folder changed"
        shutil.rmtree(base)
        shutil.rmtree(out, ignore_errors=True)
    took = time.perf_counter() - start
    print(f"\nextend base-folder fuzz: 300 cases in {took:.1f} s: {dict(counts)}\n  defects: {dict(kinds)}")
    assert set(kinds) == set(BASE_KINDS) and len(counts) == 2, dict(counts)
    assert took < 60
