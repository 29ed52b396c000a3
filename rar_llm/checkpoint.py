"""Checkpoint folders: a fresh one for a config and a layout (``rar-llm init``), and models that know their
vocabulary out of any one.

One loader for every command (sample, evaluate, demo, export): it checks the folder's files, the
config, every tensor's name and shape against the config, that the weights are finite, and the
layout against the model, naming the file and the fix when something does not fit. The returned
litgpt ``GPT`` carries its layout as ``model.layout`` (litgpt stays unpatched), so ``generate(model,
class_id)`` needs nothing else.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import zipfile
from pathlib import Path
from typing import Literal

import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.utils import save_config

from rar_llm import configs  # noqa: F401  (registers the rar-* names a config may refer to)
from rar_llm.text.merged import write_tokenizer
from rar_llm.vocab import VocabLayout

PosInit = Literal["normal", "sincos"]
WEIGHTS, CONFIG = "lit_model.pth", "model_config.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the dtype flags' names


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device runs it natively, else float32; said once."""
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    why = "runs it natively" if dtype == torch.bfloat16 else "has no native bfloat16"
    print(f"rar_llm: sampling in {str(dtype).removeprefix('torch.')} on {device} (it {why}; pass dtype= to choose)",
          file=sys.stderr)
    return dtype


def read_config(checkpoint_dir: Path) -> Config:
    path = Path(checkpoint_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {checkpoint_dir} is not a litgpt checkpoint folder (it needs {WEIGHTS} and "
            f"{CONFIG}, as `rar-llm init` and litgpt training write them)"
        )
    try:
        return Config.from_file(path)
    except Exception as e:  # yaml errors, unknown keys, a config name litgpt does not know
        raise ValueError(f"{path}: not a litgpt model config ({type(e).__name__}: {' '.join(str(e).split())})") from None


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A litgpt state dict (memory-mapped, no pickled code), unwrapped from a training run's ``{"model": ...}``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder holds {WEIGHTS} and {CONFIG}")
    try:  # torch's zip records carry CRC32s that torch.load does not check: a flipped byte would load
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise ValueError(f"{path}: not a torch checkpoint archive ({type(e).__name__}: {e}); the file is damaged "
                         "or was not written by torch.save") from None
    if damaged is not None:
        raise ValueError(f"{path}: damaged ({damaged} fails its checksum); restore the file or use another checkpoint")
    try:
        state = torch.load(path, map_location=device, mmap=True, weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or pickled code weights_only refuses
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "the file is damaged or not a litgpt checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # litgpt training runs save {"model": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def check_weights(config: Config, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise unless ``state`` holds exactly the tensors of a litgpt GPT with ``config``, finite."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    reshaped = [f"{k} {got[k]} (config: {want[k]})" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
    problems = [f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []
    problems += [f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else []
    problems += [f"shapes {reshaped[:3]}"] if reshaped else []
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model config ({'; '.join(problems)}); "
                         f"the checkpoint's {WEIGHTS} and {CONFIG} come from different models")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: non-finite weights (NaN or inf) in {bad[:3]}; the training run diverged, "
                         "use an earlier checkpoint")


def load_checkpoint(
    checkpoint_dir: Path | str, layout: VocabLayout | str | Path | None = None
) -> tuple[Config, VocabLayout, dict[str, torch.Tensor]]:
    """Config, layout and state dict (memory-mapped, checked whole) of a checkpoint folder.

    ``layout`` is for a folder whose ``tokenizer_config.json`` has no ``rar_layout``; default: its own.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} not found; give a folder made by `rar-llm init` "
                                "or a litgpt run's final/")
    config = read_config(checkpoint_dir)
    if layout is None:
        layout = VocabLayout.from_checkpoint(checkpoint_dir)
    elif not isinstance(layout, VocabLayout):
        layout = VocabLayout.load(layout)
    layout.check_model(config, where=str(checkpoint_dir))
    if config.block_size < layout.seq_len:
        raise ValueError(f"{checkpoint_dir / CONFIG}: block_size {config.block_size} is shorter than the layout's "
                         f"{layout.seq_len}-token image sequence; set block_size >= {layout.seq_len}")
    check_training_data(checkpoint_dir, layout)
    state = read_weights(checkpoint_dir / WEIGHTS)
    check_weights(config, state, str(checkpoint_dir / WEIGHTS))
    return config, layout, state


def check_training_data(checkpoint_dir: Path, layout: VocabLayout) -> None:
    """A litgpt training output names its data folder (``hyperparameters.yaml``); where that folder is
    still there, its grid, codebook and classes must be the layout's. The weights cannot tell a 4x16
    layout from the 8x8 one they were trained on (both have 64 position tokens); the data can."""
    path = checkpoint_dir / "hyperparameters.yaml"
    if not path.is_file():
        return
    try:
        data_dir = yaml.safe_load(path.read_text())["data"]["init_args"]["data_dir"]
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    except Exception:  # no data module with a data_dir, or the data has moved: nothing to check against
        return
    if isinstance(meta, dict):
        layout.check_meta(meta, where=f"{checkpoint_dir} (trained on {data_dir}, per {path.name})")


def context_length(layout: VocabLayout, config: Config) -> int:
    """Tokens the model must hold: one image sequence, or the whole context when prompts can precede it."""
    return config.block_size if layout.text_vocab_size else layout.seq_len


def load_model(
    checkpoint_dir: Path | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    layout: VocabLayout | str | Path | None = None,
) -> GPT:
    """The litgpt ``GPT`` of a checkpoint folder, in eval mode, carrying its layout as ``model.layout``.

    Args:
        checkpoint_dir: a folder with ``lit_model.pth``, ``model_config.yaml`` and the tokenizer files.
        device: default CUDA when available, else the CPU.
        dtype: default bfloat16 where the device runs it natively, else float32 (``default_dtype``).
        layout: only for folders that do not carry one.

    Its context (``max_seq_length``) holds what the layout can generate, prompts included.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    config, layout, state = load_checkpoint(checkpoint_dir, layout)  # a bad folder fails before any notice
    dtype = dtype if dtype is not None else default_dtype(device)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    model.max_seq_length = context_length(layout, config)
    model.cos, model.sin = model.rope_cache(device=device)  # not in the checkpoint
    model.layout = layout
    return model.eval()


def model_layout(model: GPT, layout: VocabLayout | str | Path | None = None) -> VocabLayout:
    """The layout to decode ``model`` with: the one given, else the one the model carries; checked against it."""
    if layout is None:
        layout = getattr(model, "layout", None)
        if layout is None:
            raise ValueError(
                "this GPT carries no vocabulary layout: load it with rar_llm.load_model(checkpoint_dir), set "
                "model.layout = rar_llm.VocabLayout.load(...), or pass layout=..."
            )
    elif not isinstance(layout, VocabLayout):
        layout = VocabLayout.load(layout)
    layout.check_model(model.config)
    return layout


# ---- a fresh checkpoint (rar-llm init) ------------------------------------------------------------


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """``(H*W, dim)`` 2D sine-cosine codes of the grid cells (half the channels per axis), unit RMS."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = [f(axis.reshape(-1, 1).float() * freqs) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb / emb.pow(2).mean().sqrt()


def init_weights(model: GPT, std: float = 0.02, layout: VocabLayout | None = None, pos_init: PosInit = "normal") -> None:
    """GPT-2/RAR-style init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * layers).

    ``pos_init="sincos"`` starts the position tokens' embeddings from 2D sine-cosine codes of their
    cells (scaled to ``std``), so neighbouring cells start close, as RandAR's 2D rotary queries do.
    """
    if pos_init not in ("normal", "sincos"):
        raise ValueError(f"pos_init={pos_init!r}: use 'normal' or 'sincos'")
    proj_std = std / math.sqrt(2 * model.config.n_layer)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norms (ones), biases (zeros)
            torch.nn.init.ones_(p) if "norm" in name or "ln_f" in name else torch.nn.init.zeros_(p)
        elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            torch.nn.init.normal_(p, 0.0, proj_std)
        else:
            torch.nn.init.normal_(p, 0.0, std)
    if pos_init == "sincos":
        if layout is None:
            raise ValueError("pos_init='sincos' needs the layout (which ids are position tokens)")
        with torch.no_grad():
            rows = slice(layout.pos_offset, layout.pos_offset + layout.num_positions)
            model.transformer.wte.weight[rows] = std * sincos_2d(layout.height, layout.width, model.config.n_embd)


def model_config(model: str, layout: VocabLayout, **overrides) -> Config:
    """The named config with the layout's vocabulary and a context that holds its sequences."""
    base = Config.from_name(model)
    block_size = max(base.block_size, layout.seq_len)
    return Config.from_name(
        model,
        vocab_size=layout.vocab_size,
        padded_vocab_size=layout.padded_vocab_size,
        padding_multiple=layout.pad_multiple,
        block_size=block_size,
        **overrides,
    )


def init(
    out_dir: Path,
    model: str = "rar-tiny",
    layout: str = "digits",
    seed: int = 0,
    pos_init: PosInit = "normal",
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised litgpt checkpoint folder.

    Args:
        out_dir: the checkpoint folder to create.
        model: a registered config name (rar-b, rar-l, rar-xl, rar-xxl, rar-tiny) or any litgpt name.
        layout: a vocabulary layout: a JSON file or a name in ``adapters/`` (maskgit_imagenet, digits, ...).
        seed: seed of the random init.
        pos_init: ``normal`` or ``sincos`` (position tokens start from 2D sine-cosine codes of their cells).
        overwrite: replace the checkpoint files of an existing folder (other files are left alone).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out_dir or pass --overwrite true")
    vocab = VocabLayout.load(layout)
    config = model_config(model, vocab)
    torch.manual_seed(seed)
    with torch.device("meta"):
        gpt = GPT(config)
    gpt.to_empty(device="cpu")
    init_weights(gpt, layout=vocab, pos_init=pos_init)
    gpt.max_seq_length = config.block_size  # rebuild the rope cache on real memory

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(gpt.state_dict(), out_dir / "lit_model.pth")
    save_config(config, out_dir)
    write_tokenizer(vocab, out_dir)  # its tokenizer_config.json carries the layout
    n = sum(p.numel() for p in gpt.parameters())
    print(f"Wrote {config.name} ({n / 1e6:.1f}M parameters, vocabulary {vocab.vocab_size} -> "
          f"{vocab.padded_vocab_size}) to {out_dir}")
    return out_dir
