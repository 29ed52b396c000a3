"""The sampling settings of every engine, RAR's presets, and their form in a vLLM request.

``SamplingSettings`` is the one set of knobs: ``generate`` takes its fields as keyword arguments,
``hf_generate`` and ``vllm_generate`` the same, ``rar-llm sample`` as the ``--sampling.*`` group, and
the vLLM plugin and the stdlib client read and write it through ``to_extra_args`` /
``from_extra_args``, the flat ``rar_*`` keys a request carries (flat so the OpenAI server's
``vllm_xargs`` can hold them). Standard library only: the client imports it without torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

OrderName = Literal["raster", "random", "zcurve", "spiral_in", "spiral_out", "subsample", "alternate"]
Schedule = Literal["constant", "linear", "power_cosine"]
Preset = Literal["rar-b", "rar-l", "rar-xl", "rar-xxl"]
ORDERS: tuple[str, ...] = get_args(OrderName)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: guidance and its schedule, the per-step filters, the order and the step count.

    Args:
        guidance: classifier-free guidance scale ``w`` (1: none, no unconditional branch runs).
        schedule: ``constant``, ``linear`` (RandAR) or ``power_cosine`` (RAR, with ``power``).
        power: exponent of the power-cosine schedule (0: constant ``w``).
        temperature: softmax temperature of the guided code logits (0: greedy).
        top_k: keep only the k most likely codes (None: no top-k filter).
        top_p: nucleus sampling threshold (1: off).
        order: ``raster``, ``random`` (one permutation per sample), a named scan, or a permutation of
            the raster cell indices ``r*W+c``, ``(H*W,)`` or ``(B, H*W)`` (a list or, in Python, a tensor).
        steps: forward passes for the cells to generate (None: one per cell); fewer decodes several
            cells per step on RandAR's cosine schedule (litgpt engine only).
    """

    guidance: float = 1.0
    schedule: Schedule = "constant"
    power: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    order: OrderName | list[int] = "raster"
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown guidance schedule {self.schedule!r}; use one of {list(SCHEDULES)}")
        for name in ("guidance", "temperature", "top_p", "power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be a finite scale >= 0 (1: no guidance; RAR-B uses 16)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy, 1: the model's distribution)")
        if self.power < 0:
            raise ValueError(f"power={self.power} must be >= 0 (0: constant guidance)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise ValueError(f"top_k={k!r} must be an integer >= 1, or None for no top-k filter")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1 disables nucleus sampling")
        if isinstance(self.order, str) and self.order not in ORDERS:
            raise ValueError(
                f"unknown order {self.order!r}; use one of {list(ORDERS)} or give a permutation of the cells"
            )
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)):
            raise ValueError(f"steps={self.steps!r} must be an integer or None (one step per cell)")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingSettings))

# RAR's published sampling settings per model size (power-cosine guidance, raster order, 256 steps)
RAR_PRESETS: dict[str, SamplingSettings] = {
    "rar-b": SamplingSettings(guidance=16.0, schedule="power_cosine", power=2.75, temperature=1.0),
    "rar-l": SamplingSettings(guidance=15.5, schedule="power_cosine", power=2.5, temperature=1.02),
    "rar-xl": SamplingSettings(guidance=6.9, schedule="power_cosine", power=1.5, temperature=1.02),
    "rar-xxl": SamplingSettings(guidance=8.0, schedule="power_cosine", power=1.2, temperature=1.02),
}


def resolve(settings: SamplingSettings | None, overrides: Mapping[str, Any], caller: str) -> SamplingSettings:
    """``settings`` (default: ``SamplingSettings()``) with the fields named in ``overrides`` replaced.

    The keyword-argument form of every engine's API: ``generate(model, 3, guidance=2.0)``. A name
    that is no field is a TypeError, as an unknown keyword argument of ``caller`` would be.
    """
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; the sampling settings are "
            f"{', '.join(FIELDS)}"
        )
    if settings is None:
        settings = SamplingSettings()
    elif not isinstance(settings, SamplingSettings):
        raise TypeError(f"{caller}(): settings must be a SamplingSettings (e.g. RAR_PRESETS['rar-b']), got "
                        f"{type(settings).__name__}")
    return replace(settings, **overrides) if overrides else settings


# ---- the vLLM request form ------------------------------------------------------------------------
VLLM_FIELDS: tuple[str, ...] = tuple(f for f in FIELDS if f != "steps")  # vLLM decodes one cell per step
KEY: dict[str, str] = {name: f"rar_{name}" for name in (*VLLM_FIELDS, "seed", "pair")}  # field -> extra_args key


def to_extra_args(settings: SamplingSettings, seed: int, pair: str | None = None) -> dict[str, Any]:
    """A request's ``extra_args``: ``settings`` (its ``order``: the cells to generate, in order), the
    image's ``seed`` and, for guidance, the ``pair`` key both branches of the image share."""
    if settings.steps is not None:
        raise ValueError("steps (parallel decoding) is not supported on vLLM: it decodes one cell per step")
    if isinstance(settings.order, str):
        raise ValueError("a vLLM request names its cells: order must be the list of cells to generate")
    out = {KEY[name]: getattr(settings, name) for name in VLLM_FIELDS if getattr(settings, name) is not None}
    out[KEY["order"]] = [int(c) for c in settings.order]
    out[KEY["seed"]] = int(seed)
    if pair is not None:
        out[KEY["pair"]] = str(pair)
    return out


def from_extra_args(extra_args: Mapping[str, Any] | None) -> tuple[SamplingSettings, int, str | None] | None:
    """``(settings, seed, pair)`` of a request's ``extra_args``; None for a request that is not RAR's.

    Raises ValueError on keys or values no RAR request may carry (vLLM answers HTTP 400).
    """
    extra_args = extra_args or {}
    ours = [k for k in extra_args if k.startswith("rar_")]
    if KEY["order"] not in extra_args:
        if ours:
            raise ValueError(f"RAR request without rar_order (got {ours}); send the cells to generate, in order")
        return None
    unknown = [k for k in ours if k not in KEY.values()]
    if unknown:
        raise ValueError(f"unknown RAR settings {unknown}; known: {list(KEY.values())}")
    order = extra_args[KEY["order"]]
    if not isinstance(order, (list, tuple)) or not order or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in order
    ):
        raise ValueError("rar_order must be a non-empty list of cell indices (raster r*W+c)")
    if len(set(order)) != len(order):
        raise ValueError("rar_order lists a cell twice")
    top_k = extra_args.get(KEY["top_k"])
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ValueError(f"rar_top_k={top_k!r} must be an integer or absent")
    values: dict[str, Any] = {"schedule": str(extra_args.get(KEY["schedule"], "constant"))}
    for name in ("guidance", "power", "temperature", "top_p"):
        if KEY[name] in extra_args:
            try:
                values[name] = float(extra_args[KEY[name]])
            except (TypeError, ValueError):
                raise ValueError(f"{KEY[name]}={extra_args[KEY[name]]!r} must be a number") from None
    top_k = top_k if top_k is not None and top_k > 0 else None  # 0 / -1: no top-k, as vLLM's own
    settings = SamplingSettings(order=[int(c) for c in order], top_k=top_k, **values)  # checks the values
    pair = extra_args.get(KEY["pair"])
    if settings.guided and not pair:
        raise ValueError(
            "guided RAR request without rar_pair: send the conditional and the <class_null> branch of each "
            "image as two requests with the same rar_pair key (rar_llm.sampling.settings.to_extra_args)"
        )
    return settings, int(extra_args.get(KEY["seed"], 0)), None if pair is None else str(pair)
