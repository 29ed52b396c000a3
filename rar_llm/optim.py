"""RAR's optimizer recipe as one class a litgpt recipe can name: ``optimizer.class_path: rar_llm.optim.RARAdamW``.

RAR trains with AdamW, gradients clipped at a global norm of 1.0 and no weight decay on norms, biases
and embeddings. ``litgpt finetune_full`` has no clipping flag (it rejects ``train.max_norm``) and hands
its optimizer ``model.parameters()``, so both live here, in the optimizer's ``step``. Torch only.

What the parameters litgpt hands over allow: on one device they have their real shapes, so 1-D ones
(norms, biases) and the token embedding are told apart (litgpt's ``GPT`` lists ``lm_head.weight`` first
and ``transformer.wte.weight`` second, same shape). With several devices litgpt wraps the model in
FSDP before building the optimizer (``use_orig_params=True``), and every parameter then arrives as a
nameless 1-D view of its shard: decay cannot be told apart there and applies to every parameter, as
plain AdamW would (a warning says so). Clipping works in both cases: FSDP's shards are disjoint, so
the squared norms of the local gradients are summed over the ranks before the clip.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist


def sharded() -> bool:
    """Whether the gradients are spread over several processes (litgpt: FSDP on more than one device)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """``[decayed, not decayed]`` param groups: no decay on 1-D parameters and litgpt's token embedding."""
    if sharded() or (params and all(p.dim() <= 1 for p in params)):
        warnings.warn("RARAdamW: the parameters arrive as 1-D shards (FSDP), so norms, biases and embeddings "
                      "cannot be told apart: weight decay applies to every parameter", stacklevel=3)
        return [{"params": params, "weight_decay": weight_decay}]
    embedding = params[1] if len(params) > 1 and params[1].dim() == 2 and params[1].shape == params[0].shape else None
    keep = [p for p in params if p.dim() >= 2 and p is not embedding]
    free = [p for p in params if p.dim() < 2 or p is embedding]
    return [{"params": keep, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


@torch.no_grad()
def clip_global_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their norm over every rank's shard is at most ``max_norm`` (as torch's
    ``clip_grad_norm_`` does on one process); returns that norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    if sharded():
        dist.all_reduce(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


class RARAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm before each step and keeps decay off norms, biases and
    the token embedding where it can tell them apart (see the module docstring).

    Args:
        params: the model's parameters (litgpt passes ``model.parameters()``) or ready param groups.
        max_norm: clip the global gradient norm to this (RAR: 1.0); None: no clipping.
        lr, betas, weight_decay, eps: AdamW's (RAR: 4e-4, (0.9, 0.96), 0.03).
    """

    def __init__(self, params, lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.96), eps: float = 1e-8,
                 weight_decay: float = 0.03, max_norm: float | None = 1.0, **kwargs) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm={max_norm} must be > 0 (None: no clipping)")
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else decay_groups(params, weight_decay)
        super().__init__(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_norm is not None:
            clip_global_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)
        super().step()
        return loss
