"""What every RAR decoder shares: scan orders, guidance and parallel schedules, one sampling step.

The litgpt loop (``rar_llm.sampling.loop``), transformers' ``generate`` (``rar_llm.sampling.hf``) and vLLM's logits
processor (``rar_llm.serve.plugin``) all take their orders, schedules and checks from here, so one setting
means the same thing on every engine; the settings themselves are ``rar_llm.sampling.settings``. Needs
only torch: no litgpt import.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from rar_llm.sampling.settings import ORDERS, SCHEDULES
from rar_llm.vocab import VocabLayout


# ---- schedules -----------------------------------------------------------------------------------
def guidance_scale(w: float, t: int, n: int, schedule: str = "constant", power: float = 0.0) -> float:
    """Guidance scale before decoding cell ``t`` of ``n``.

    constant: ``w``. linear (RandAR): ``1 + (w - 1) t / n``. power_cosine (RAR):
    ``1 + (w - 1) (1 - cos(pi (t / n) ** power)) / 2``; ``power`` 0 is constant ``w``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; use one of {list(SCHEDULES)}")
    if schedule == "constant":
        return w
    frac = t / n
    if schedule == "linear":
        return 1.0 + (w - 1.0) * frac
    return 1.0 + (w - 1.0) * (1.0 - math.cos(math.pi * frac**power)) / 2.0


def parallel_schedule(n: int, steps: int) -> list[int]:
    """Cells decoded at each step: RandAR's cosine schedule, at least one per step, all by the last.

    After step ``t`` about ``(1 - cos(pi/2 (t+1) / steps)) n`` cells are done; ``steps == n`` is one
    cell per step.
    """
    if not 1 <= steps <= n:
        raise ValueError(
            f"steps={steps} is outside 1..{n}: every step decodes at least one of the {n} cells to "
            f"generate; use steps={n} (one code per step) or fewer for parallel decoding"
        )
    counts, done = [], 0
    for t in range(steps):
        target = round((1.0 - math.cos(math.pi / 2 * (t + 1) / steps)) * n)
        target = min(max(target, done + 1), n - (steps - 1 - t))
        counts.append(target - done)
        done = target
    return counts


# ---- orders --------------------------------------------------------------------------------------
def _spiral_in(height: int, width: int) -> list[int]:
    """Clockwise from the top-left corner, ring by ring towards the centre."""
    out: list[int] = []
    top, bottom, left, right = 0, height - 1, 0, width - 1
    while top <= bottom and left <= right:
        out += [top * width + c for c in range(left, right + 1)]
        out += [r * width + right for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * width + c for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [r * width + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """A named scan of the grid (RAR Tab. 3) as raster cell indices, ``(H*W,)``.

    raster: rows top to bottom. zcurve: Morton order (row and column bits interleaved).
    spiral_in: clockwise from the border to the centre; spiral_out: its reverse.
    subsample: the four stride-2 sub-grids (even/even, even/odd, odd/even, odd/odd), each in raster.
    alternate: rows top to bottom, every other row right to left (boustrophedon).
    RAR names these scans but ships no code for them; subsample and alternate are our reading.
    """
    r, c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    n = height * width
    if name == "raster":
        return torch.arange(n)
    if name == "zcurve":
        key = torch.zeros(n, dtype=torch.long)
        for b in range(max(height, width).bit_length()):
            key |= ((c >> b) & 1) << (2 * b) | ((r >> b) & 1) << (2 * b + 1)
        return torch.argsort(key)
    if name in ("spiral_in", "spiral_out"):
        order = torch.tensor(_spiral_in(height, width))
        return order if name == "spiral_in" else order.flip(0)
    if name == "subsample":
        return torch.argsort(((r % 2) * 2 + c % 2) * n + r * width + c)
    if name == "alternate":
        return torch.argsort(r * width + torch.where(r % 2 == 1, width - 1 - c, c))
    raise ValueError(f"unknown order {name!r}; use one of {list(ORDERS)} or give a permutation of the cells")


def cell_orders(order, batch: int, layout: VocabLayout, generator: torch.Generator | None) -> torch.Tensor:
    """The order of each row, ``(B, H*W)`` raster cell indices, checked to be permutations.

    ``order``: a name of ``ORDERS`` (``random``: one permutation per row from ``generator``) or a
    permutation of the raster cell indices, ``(H*W,)`` or ``(B, H*W)``.
    """
    n = layout.num_positions
    if isinstance(order, str):
        if order == "random":
            dev = generator.device if generator is not None else "cpu"
            return torch.stack([torch.randperm(n, generator=generator, device=dev).cpu() for _ in range(batch)])
        return scan_order(order, layout.height, layout.width).expand(batch, n)
    perm = torch.as_tensor(order, dtype=torch.long).cpu()
    if perm.shape not in ((n,), (batch, n)):
        raise ValueError(
            f"order has shape {tuple(perm.shape)}; a given order is a permutation of the {n} cells, "
            f"shape ({n},) or ({batch}, {n})"
        )
    perm = perm.expand(batch, n)
    if not torch.equal(perm.sort(dim=1).values, torch.arange(n).expand(batch, n)):
        raise ValueError(f"order is not a permutation of the cells 0..{n - 1} (raster indices r*W+c)")
    return perm


def known_cells(known, known_mask, batch: int, layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Known codes and their mask as ``(B, H*W)``; nothing known without a grid."""
    H, W, n = layout.height, layout.width, layout.num_positions
    if (known is None) != (known_mask is None):
        raise ValueError("give both known (a code grid) and known_mask (True where the cell is given), or neither")
    if known is None:
        return torch.zeros(batch, n, dtype=torch.long), torch.zeros(batch, n, dtype=torch.bool)
    grid = torch.as_tensor(known).cpu()
    mask = torch.as_tensor(known_mask).cpu()
    if grid.is_floating_point() or grid.dtype == torch.bool:
        raise ValueError(f"known must hold integer codes, got dtype {grid.dtype}")
    grid = grid.long()
    for name, t in (("known", grid), ("known_mask", mask)):
        if t.shape not in ((H, W), (batch, H, W)):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected ({H}, {W}) or ({batch}, {H}, {W}) for this "
                f"layout's {H}x{W} grid and {batch} samples"
            )
    if mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be boolean (True where the cell is given), got {mask.dtype}")
    grid, mask = grid.expand(batch, H, W).reshape(batch, n), mask.expand(batch, H, W).reshape(batch, n)
    bad = grid[mask][(grid[mask] < 0) | (grid[mask] >= layout.codebook_size)]
    if bad.numel():
        raise ValueError(
            f"known: code {int(bad[0])} is outside the codebook 0..{layout.codebook_size - 1}; give codes made "
            "by the tokenizer of this layout"
        )
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(
            f"known_mask gives {counts.tolist()} cells per sample; every sample must know the same number "
            "of cells (generate differently masked samples in separate calls)"
        )
    return grid, mask


def known_first(perm: torch.Tensor, known_mask: torch.Tensor) -> torch.Tensor:
    """Each row's order with its given cells first (in the order's order), then the ones to generate."""
    return perm.gather(1, torch.sort((~known_mask.gather(1, perm)).long(), dim=1, stable=True).indices)


# ---- sampling ------------------------------------------------------------------------------------
def code_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution a step draws from, ``(..., K)``: temperature, then top-k, then top-p.

    Temperature 0 is the one-hot of the best code. top-k keeps the k best, top-p the smallest set
    whose probability reaches p (always at least the best). Speculative decoding applies the same
    filters to its proposals and its targets.
    """
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return logits.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of ``probs`` (..., K) -> (...)."""
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One draw per row of ``logits`` (..., K) -> (...) from ``code_probs``; temperature 0 is greedy.

    Batched (litgpt's ``sample`` reads only row 0).
    """
    if temperature == 0:
        return logits.argmax(-1)
    return draw(code_probs(logits, temperature, top_k, top_p), generator)


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device).manual_seed(int(seed))


def class_ids(class_id) -> torch.Tensor:
    """Class ids as a 1-D long tensor: an int, an integer tensor, or a flat sequence of ints.

    Floats, booleans and nested sequences are refused rather than rounded, cast or flattened.
    """
    if isinstance(class_id, torch.Tensor):
        if class_id.dtype == torch.bool or class_id.is_floating_point() or class_id.is_complex():
            raise ValueError(f"class ids must be an integer tensor, got dtype {class_id.dtype}")
        if class_id.dim() > 1:
            raise ValueError(f"class ids must be one id or a 1-D tensor of ids, got shape {tuple(class_id.shape)}")
        return class_id.detach().cpu().long().reshape(-1)
    items = list(class_id) if isinstance(class_id, Sequence) and not isinstance(class_id, str) else [class_id]
    bad = [c for c in items if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
    if bad:
        raise ValueError(
            f"class id {bad[0]!r} is not an integer; pass an int, a flat list of ints or an integer tensor "
            "(None is not a class: guidance adds the null class itself)"
        )
    return torch.tensor([int(c) for c in items], dtype=torch.long)
