"""Decode faster on the CPU: linear layers on weights prepacked once in oneDNN's blocked layout.

Decoding feeds a few tokens per step, so each step is a row of skinny matmuls that stream every
weight from memory; ATen's default CPU matmul repacks the weight on every call and reaches about
half the memory bandwidth that a weight laid out once in oneDNN's blocked format does (the same
prepacking ``torch.compile``'s CPU freezing does; figures in docs/benchmarks.md).
The ops are private to PyTorch (``torch.ops.mkldnn``), so anything missing or failing falls back
to the plain layers with one warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def packable(model: torch.nn.Module) -> bool:
    """Whether oneDNN can run this model's linear layers here (CPU, float32 or native bfloat16)."""
    weight = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    if weight is None or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        ops._reorder_linear_weight, ops._linear_pointwise  # noqa: B018  (both must exist)
        if weight.dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return weight.dtype == torch.float32


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), packed, module.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.size(-1))

    return forward


@contextlib.contextmanager
def prepacked(model: torch.nn.Module, batch_hint: int = 16) -> Iterator[torch.nn.Module]:
    """Run the model's ``nn.Linear`` layers on oneDNN-prepacked weights for the duration (CPU only).

    Same arithmetic (fp32 accumulation), so results differ only by floating-point noise. Costs one
    extra copy of the linear weights while active; a no-op off the CPU, where oneDNN cannot run the
    dtype, or inside an outer ``prepacked`` of the same model (nested use packs once). Inference only:
    the packed copies carry no gradient and do not see weights changed inside the block.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__]
    if not linears or not packable(model):
        yield model
        return
    try:
        probe = linears[0]
        x = torch.zeros(1, probe.in_features, dtype=probe.weight.dtype)
        _packed_forward(probe, torch.ops.mkldnn._reorder_linear_weight(probe.weight.detach(), batch_hint))(x)
        for m in linears:
            m.forward = _packed_forward(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint))
    except RuntimeError as e:  # a torch build whose private oneDNN ops differ: plain layers
        for m in linears:
            m.__dict__.pop("forward", None)
        warnings.warn(f"oneDNN weight prepacking failed ({e}); decoding with the plain linear layers", stacklevel=3)
        yield model
        return
    try:
        yield model
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
