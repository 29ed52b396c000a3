"""Sampling code grids from a litgpt GPT trained on RAR sequences.

The model is a plain causal LM over ``[class, pos_a, code_a, pos_b, code_b, ...]``: the logits at a
position token predict the code of that cell. Generation therefore fills the same layout: it feeds
the class, then any known cells as ``[pos, code]`` pairs, then asks for the remaining cells in the
chosen order, one or several position tokens (queries) per step, with litgpt's own KV cache.

Cache layout. Step ``s`` puts its ``k`` queries in the ``k`` slots after the context. The first
query sits in its training slot and sees exactly the training context, so its keys/values stay. The
next step writes the accepted codes and the other queries re-interleaved, ``[code_1, pos_2, code_2,
..., pos_k, code_k]``, from the slot after the first query on, followed by its own queries. So the
cache always holds the training layout of the cells decided so far, and with one query per step a
step feeds exactly two tokens ``[code_t, pos_t+1]``. Within a step, queries attend to the earlier
queries of the same step (plain causal mask, as RandAR does); they see no code of that step.

Classifier-free guidance doubles the batch as ``[cond; null]`` and mixes ``u + g * (c - u)``; the
scale ``g`` follows a schedule over the share ``t / n`` of the cells generated before the step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from litgpt.model import GPT
from tqdm import tqdm

from rar_llm.vocab import VocabLayout

ORDERS = ("raster", "random", "zcurve", "spiral_in", "spiral_out", "subsample", "alternate")
SCHEDULES = ("constant", "linear", "power_cosine")
DIGITS_LEVELS = 17  # scikit-learn's 8x8 digits: grey levels 0..16

# RAR's published sampling settings per model size (power-cosine guidance, raster order, 256 steps)
RAR_PRESETS = {
    "rar-b": dict(guidance=16.0, schedule="power_cosine", power=2.75, temperature=1.0),
    "rar-l": dict(guidance=15.5, schedule="power_cosine", power=2.5, temperature=1.02),
    "rar-xl": dict(guidance=6.9, schedule="power_cosine", power=1.5, temperature=1.02),
    "rar-xxl": dict(guidance=8.0, schedule="power_cosine", power=1.2, temperature=1.02),
}


class CodeDecoder(Protocol):
    """What drawing samples needs of an image tokenizer; every ``rar_llm.tokenizers`` tokenizer is one."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` codes -> ``(B, C, H, W)`` floats in [0, 1]."""


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


def _orders(order, batch: int, layout: VocabLayout, generator: torch.Generator | None) -> torch.Tensor:
    """The order of each row, ``(B, H*W)`` raster cell indices, checked to be permutations."""
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


def _known(known, known_mask, batch: int, layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Known codes and their mask as ``(B, H*W)``; nothing known without a grid."""
    H, W, n = layout.height, layout.width, layout.num_positions
    if (known is None) != (known_mask is None):
        raise ValueError("give both known (a code grid) and known_mask (True where the cell is given), or neither")
    if known is None:
        return torch.zeros(batch, n, dtype=torch.long), torch.zeros(batch, n, dtype=torch.bool)
    grid = torch.as_tensor(known).long().cpu()
    mask = torch.as_tensor(known_mask).cpu()
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


# ---- sampling ------------------------------------------------------------------------------------
def sample_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One draw per row of ``logits`` (..., K) -> (...); temperature 0 is greedy.

    Batched (litgpt's ``sample`` reads only row 0). top-k keeps the k best, top-p the smallest set
    whose probability reaches p (always at least the best).
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1).reshape(-1, logits.size(-1))
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def _check_sampling(guidance: float, schedule: str, temperature: float, top_k: int | None, top_p: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; use one of {list(SCHEDULES)}")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance={guidance} must be a finite scale >= 0 (1: no guidance; RAR-B uses 16)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy, 1: the model's distribution)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or None for no top-k filter")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; 1 disables nucleus sampling")


def _generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device).manual_seed(int(seed))


def _sequence(
    layout: VocabLayout, classes: torch.Tensor, perm: torch.Tensor, known_grid: torch.Tensor, guided: bool
) -> torch.Tensor:
    """The training layout every row ends up with, ``(B or 2B, 1 + 2*H*W)``: class (null class in the
    guidance half), every position token in order, and the known codes; other code slots are written
    as they are sampled, before they are ever fed."""
    rows = torch.cat((classes, torch.full_like(classes, layout.null_class))) if guided else classes
    reps = rows.numel() // classes.numel()
    seq = torch.empty(rows.numel(), layout.seq_len, dtype=torch.long)
    seq[:, 0] = rows
    seq[:, 1::2] = (layout.pos_offset + perm).repeat(reps, 1)
    seq[:, 2::2] = (layout.code_offset + known_grid.gather(1, perm)).repeat(reps, 1)
    return seq


# ---- CPU weight prepacking -------------------------------------------------------------------------
def _packable(model: GPT) -> bool:
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


@contextlib.contextmanager
def prepacked(model: GPT, batch_hint: int = 16) -> Iterator[GPT]:
    """Run the model's ``nn.Linear`` layers on oneDNN-prepacked weights for the duration (CPU only).

    Decoding feeds a few tokens per step, so each step is a row of skinny matmuls that stream every
    weight from memory; ATen's default CPU matmul repacks the weight on every call and reaches about
    half the memory bandwidth that a weight laid out once in oneDNN's blocked format does (the same
    prepacking ``torch.compile``'s CPU freezing does). Same arithmetic (fp32 accumulation), so results
    differ only by floating-point noise. Costs one extra copy of the linear weights while active; a
    no-op off the CPU or where oneDNN cannot run the dtype. The modules are restored afterwards.
    Inference only: the packed copies carry no gradient and do not see weights changed inside the block.
    ``generate`` packs for each call (~0.4 s for RAR-B); wrap a loop of calls in ``with prepacked(model):``
    to pack once.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__]
    if not _packable(model) or not linears:  # nothing to do, or an outer ``prepacked`` already did it
        yield model
        return

    def packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), packed, module.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.size(-1))

        return forward

    try:
        for m in linears:
            m.forward = packed_forward(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint))
        yield model
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


# ---- generation ----------------------------------------------------------------------------------
@torch.inference_mode()
def generate(
    model: GPT,
    class_id: int | Sequence[int] | torch.Tensor,
    *,
    layout: VocabLayout | str | Path,
    guidance: float = 1.0,
    schedule: str = "constant",
    power: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    order: str | Sequence[int] | torch.Tensor = "raster",
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    steps: int | None = None,
    seed: int | torch.Generator | None = None,
    kv_cache: bool = True,
    prepack: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one code grid per class id; returns ``(B, H, W)`` long codes in ``0..K-1``.

    Args:
        model: a litgpt ``GPT`` whose vocabulary is ``layout``'s.
        class_id: one class id or many (one sample each).
        layout: the vocabulary layout, or a checkpoint folder / layout file / name to load it from.
        guidance: classifier-free guidance scale ``w`` (1: none, the batch is not doubled).
            ``**RAR_PRESETS["rar-b"]`` gives RAR's guidance, schedule, power and temperature.
        schedule: ``constant``, ``linear`` (RandAR) or ``power_cosine`` (RAR, with ``power``).
        power: exponent of the power-cosine schedule (0: constant ``w``).
        temperature, top_k, top_p: applied to the guided logits over the codebook only.
        order: ``raster``, ``random`` (one permutation per sample), a named scan (``scan_order``), or
            a permutation of the raster cell indices, ``(H*W,)`` or ``(B, H*W)``.
        known, known_mask: a code grid and a boolean mask of its given cells, ``(H, W)`` or
            ``(B, H, W)`` (inpainting / outpainting). Given cells are fed first, in ``order``, and
            come back unchanged; only the others are sampled.
        steps: forward passes for the cells to generate (default: one per cell); fewer decodes
            several cells per step on RandAR's cosine schedule.
        seed: an int or a ``torch.Generator`` (on the model's device) for reproducible samples.
        kv_cache: False recomputes the whole sequence every step (a reference for tests and benchmarks).
        prepack: on the CPU, run the linear layers on prepacked weights for the call (``prepacked``):
            about 1.7x faster matmuls for one extra copy of the weights in memory.
        progress: show a tqdm bar over the steps.

    The model's KV cache (and mask cache) are put back as the caller had them.
    """
    if not isinstance(layout, VocabLayout):
        layout = VocabLayout.load(layout)
    layout.check_model(model.config)
    if model.max_seq_length < layout.seq_len:
        raise ValueError(
            f"model.max_seq_length={model.max_seq_length} is shorter than the {layout.seq_len} tokens of an "
            f"image sequence; set model.max_seq_length = {layout.seq_len} (block_size is {model.config.block_size})"
        )
    _check_sampling(guidance, schedule, temperature, top_k, top_p)
    classes = layout.class_tokens(class_id)
    B = classes.numel()
    if B == 0:
        raise ValueError("no class ids given; pass one class id or a list of them")
    device = model.lm_head.weight.device
    gen = _generator(seed, device)

    known_grid, known_cells = _known(known, known_mask, B, layout)
    perm = _orders(order, B, layout, gen)
    # given cells first (in the order's order), then the ones to generate
    first = torch.sort((~known_cells.gather(1, perm)).long(), dim=1, stable=True).indices
    perm = perm.gather(1, first)
    n, n_known = layout.num_positions, int(known_cells[0].sum())
    n_gen = n - n_known
    if n_gen == 0:
        raise ValueError("known_mask marks every cell as given: there is nothing to generate")
    counts = parallel_schedule(n_gen, n_gen if steps is None else steps)

    guided = guidance != 1.0
    rows = 2 * B if guided else B
    seq = _sequence(layout, classes, perm, known_grid, guided).to(device)
    codes_slice = slice(layout.code_offset, layout.class_offset)

    saved = [block.attn.kv_cache for block in model.transformer.h], model.mask_cache
    if kv_cache:
        model.set_kv_cache(rows, max_seq_length=layout.seq_len, device=device, dtype=model.lm_head.weight.dtype)
    try:
        with prepacked(model, batch_hint=2 * rows) if prepack else contextlib.nullcontext():
            done, start = n_known, 0
            for k in tqdm(counts, desc="generate", unit="step", disable=not progress, leave=False):
                p = 1 + 2 * done  # slot of this step's first query
                queries = seq[:, p : p + 2 * k : 2]
                if kv_cache:
                    idx = torch.cat((seq[:, start:p], queries), dim=1)
                    input_pos = torch.arange(start, p + k, device=device)
                    logits = model(idx, input_pos=input_pos, input_pos_maxp1=p + k)
                else:
                    logits = model(torch.cat((seq[:, :p], queries), dim=1))
                logits = logits[:, -k:, codes_slice].float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + guidance_scale(guidance, done - n_known, n_gen, schedule, power) * (cond - uncond)
                new = sample_codes(logits, temperature, top_k, top_p, gen)
                seq[:, p + 1 : p + 2 * k : 2] = (layout.code_offset + new).repeat(rows // B, 1)
                done, start = done + k, p + 1
    finally:
        for block, cache in zip(model.transformer.h, saved[0]):
            block.attn.kv_cache = cache
        model.mask_cache = saved[1]

    grid = torch.empty(B, n, dtype=torch.long)
    grid.scatter_(1, perm, seq[:B, 2::2].cpu() - layout.code_offset)
    return grid.view(B, layout.height, layout.width)


def to_pixels(codes: torch.Tensor, layout: VocabLayout, tokenizer: CodeDecoder | None = None) -> torch.Tensor:
    """Code grids ``(B, h, w)`` -> images ``(B, C, H, W)`` in [0, 1].

    Without a tokenizer only the digits codebook (17 grey levels) can be drawn: code k is grey
    ``k / (K - 1)``, which is what the digits pixel tokenizer does.
    """
    if tokenizer is not None:
        return tokenizer.decode(codes).float().clamp(0, 1)
    check_drawable(layout)
    return (codes.float() / (layout.codebook_size - 1)).unsqueeze(1)


def check_drawable(layout: VocabLayout, tokenizer: CodeDecoder | None = None) -> None:
    """Raise before sampling if the codes could not be turned into pixels."""
    if tokenizer is None and layout.codebook_size != DIGITS_LEVELS:
        raise ValueError(
            f"no image tokenizer given and the codebook has {layout.codebook_size} codes, not the digits' "
            f"{DIGITS_LEVELS} grey levels; pass the tokenizer the data was made with (e.g. tokenizer='maskgit-vqgan')"
        )
