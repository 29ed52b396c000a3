"""What the small networks trained here share (the VQ tokenizer, the evaluation CNN): a safetensors file
that carries the network's settings and training figures, the report written beside it, the checks of a
training run's flags, and an endless stream of shuffled batches."""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from rar_llm.data.shards import positive_int


def save_net(net: torch.nn.Module, path: Path | str, fmt: str, config: dict, report: dict | None = None) -> Path:
    """Weights plus settings (safetensors metadata ``format``, ``config``, ``report``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "config": json.dumps(config)}
    if report is not None:
        meta["report"] = json.dumps(report)
    tmp = path.with_name(f".{path.name}.tmp")  # moved into place whole: an interrupted save leaves no half file
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def report_path(out: Path) -> Path:
    """Where a trainer writes the figures of the net it saved as ``out``: ``NAME.report.json`` beside it."""
    return out.with_name(out.stem + ".report.json")


def claim_net_files(out: Path | str, overwrite: bool) -> tuple[Path, Path]:
    """``(out, its report)`` for a trainer, checked before any work: ``out`` must name a ``.safetensors``
    file, and neither file may exist unless ``overwrite`` (which replaces just these two)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the network is saved as safetensors; name a .safetensors file")
    report = report_path(out)
    for path in (out, report):
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give --out a file name")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite true (it replaces {out.name} and "
                                  f"{report.name} only) or another --out")
    return out, report


def write_report(path: Path, report: dict) -> None:
    """The JSON report, written to a temporary name and moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def check_run(epochs: float, batch_size: int, lr: float, threads: int | None) -> None:
    """A training run's flags, before any data is read: a positive, finite length, batch and rate."""
    for name, value in (("epochs", epochs), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name} {value!r} must be a finite number > 0")
    positive_int("batch_size", batch_size)
    if threads is not None:
        positive_int("threads", threads)



def read_net(path: Path | str, fmt: str, what: str, command: str) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """``(state, config, report)`` of a file written by ``save_net``; any other file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}; train one with `rar-llm {command} --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a rar_llm {what} (metadata format {meta.get('format')!r}, expected "
                         f"{fmt!r}); train one with `rar-llm {command}`")
    try:
        config, report = json.loads(meta["config"]), json.loads(meta["report"]) if "report" in meta else None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged settings in its metadata ({e}); retrain with `rar-llm {command}`") from None
    return state, config, report


def load_net(cls, path: Path | str, fmt: str, what: str, command: str):
    """A ``cls(**config)`` with the file's weights (checked whole), its ``report`` attached, in eval mode."""
    state, config, report = read_net(path, fmt, what, command)
    retrain = f"retrain with `rar-llm {command}`"
    problem = config_problem(cls, config)
    if problem:
        raise ValueError(f"{path}: damaged settings in its metadata ({problem}); {retrain}")
    try:
        with torch.device("meta"):  # the shapes the settings imply, before allocating anything
            want = {k: (v.shape, v.dtype) for k, v in cls(**config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{path}: damaged settings in its metadata ({str(e).splitlines()[0][:200]}); {retrain}") from None
    got = {k: (v.shape, v.dtype) for k, v in state.items()}
    if got != want:
        name = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[0]
        raise ValueError(f"{path}: the weights do not fit a {what} ({name}: {fmt_tensor(got.get(name))} in the file, "
                         f"{fmt_tensor(want.get(name))} expected); {retrain}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"{path}: {bad} holds NaN or infinite weights; {retrain}")
    net = cls(**config)
    net.load_state_dict(state)
    net.report = report
    return net.eval().requires_grad_(False)


def config_problem(cls, config) -> str | None:
    """What is wrong with ``config`` as the keyword arguments of ``cls``, or None: every argument given,
    no other key, integers positive and floats finite."""
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    if not isinstance(config, dict):
        return f"config is {type(config).__name__}, not an object"
    if config.keys() != params.keys():
        return f"config keys {sorted(config)}, expected {sorted(params)}"
    for key, value in config.items():
        if isinstance(params[key].default, int):
            if type(value) is not int or value < 1:
                return f"{key} {value!r} must be a positive integer"
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"{key} {value!r} must be a finite number"
    return None


def fmt_tensor(spec) -> str:
    return "nothing" if spec is None else f"{tuple(spec[0])} {str(spec[1]).removeprefix('torch.')}"


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` samples, reshuffled each pass, forever (a run ends by its step count)."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx
