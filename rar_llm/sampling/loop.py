"""Sampling code grids from a litgpt GPT trained on RAR sequences: one decoding loop, two front ends.

The model is a plain causal LM over ``[condition, pos_a, code_a, pos_b, code_b, ...]``; the logits
at a position token predict the code of that cell. The condition is a class token (``generate``)
or a text prompt and ``<boi>`` (``generate_from_prompt``); both run through ``decode_grids``, which
feeds the condition and any known cells (prefill), then asks for the remaining cells in the chosen
order, one or several position tokens (queries) per step, on litgpt's own KV cache.

Cache layout. Step ``s`` puts its ``k`` queries in the ``k`` slots after the context. The first
query sits in its training slot and sees exactly the training context, so its keys/values stay. The
next step writes the accepted codes and the other queries re-interleaved, ``[code_1, pos_2, code_2,
..., pos_k, code_k]``, from the slot after the first query on, followed by its own queries. So the
cache always holds the training layout of the cells decided so far, and with one query per step a
step feeds exactly two tokens ``[code_t, pos_t+1]``. Within a step, queries attend to the earlier
queries of the same step (plain causal mask, as RandAR does); they see no code of that step.

Classifier-free guidance runs a second, unconditional branch (the null class, or a bare ``<boi>``)
and mixes ``u + g * (c - u)``, ``g`` following a schedule over the share of cells generated before
the step. Branches whose conditions have the same length share one batch and one KV cache (the
class case: ``[cond; null]``); a text prompt and its bare ``<boi>`` differ in length, so each keeps
its own cache, swapped into litgpt's blocks for its forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from litgpt.model import GPT
from tqdm import tqdm

from rar_llm.checkpoint import model_layout
from rar_llm.sampling.decoding import (
    cell_orders,
    class_ids,
    code_probs,
    guidance_scale,
    known_cells,
    known_first,
    make_generator,
    parallel_schedule,
    sample_codes,
)
from rar_llm.sampling.prepack import prepacked
from rar_llm.sampling.settings import SamplingSettings, resolve
from rar_llm.sampling.speculative import Drafts, SpeculativeStats, check
from rar_llm.text.merged import encode_prompt
from rar_llm.vocab import VocabLayout

CACHE_BUDGET = 1 << 30  # bytes of KV cache per chunk of a large batch


def _fit_context(model: GPT, need: int) -> None:
    """Make room for ``need`` tokens (up to the config's block size) so no caller sets it by hand."""
    if need > model.config.block_size:
        raise ValueError(
            f"the condition plus the image need {need} tokens but the model's context (block_size) is "
            f"{model.config.block_size}; shorten the prompt"
        )
    if model.max_seq_length < need:
        model.max_seq_length = need


@contextlib.contextmanager
def callers_state(model: GPT) -> Iterator[None]:
    """Put back the KV caches, the mask cache, ``max_seq_length`` and the RoPE cache the caller had."""
    caches = [block.attn.kv_cache for block in model.transformer.h]
    mask, length, rope = model.mask_cache, model.max_seq_length, (model.cos, model.sin)
    try:
        yield
    finally:
        for block, cache in zip(model.transformer.h, caches):
            block.attn.kv_cache = cache
        model.mask_cache = mask
        if model.max_seq_length != length:
            model.max_seq_length = length
        model.cos, model.sin = rope


def chunk_size(model: GPT, rows_per_image: int, need: int, batch_size: int | None) -> int:
    """Images per forward batch: ``batch_size``, or as many as keep the KV cache within ``CACHE_BUDGET``."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1 (or None: sized to memory)")
        return batch_size
    c = model.config
    per_image = rows_per_image * c.n_layer * 2 * need * c.n_query_groups * c.head_size * model.lm_head.weight.element_size()
    return max(1, CACHE_BUDGET // per_image)


# ---- the decoding loop: stream setup, one forward, one step ------------------------------------------
@dataclass
class Stream:
    """Branches whose conditions have the same length: one batch and one KV cache."""

    length: int  # condition tokens
    branches: list[int]  # which of ``prefixes`` its rows hold, in batch order
    seq: torch.Tensor  # (rows, length + 2 n): the conditions, then ``pos, code`` of each cell in feeding order
    start: int = 0  # first slot not in the KV cache yet
    cache: list | None = None  # the blocks' KV caches of this stream


def make_streams(prefixes: Sequence[torch.Tensor], body: torch.Tensor, device: torch.device) -> list[Stream]:
    """Group the branches by condition length (the class case ``[cond; null]`` is one stream)."""
    groups: dict[int, list[int]] = {}
    for b, prefix in enumerate(prefixes):
        groups.setdefault(prefix.shape[1], []).append(b)
    return [
        Stream(length, branches, torch.cat((torch.cat([prefixes[b].cpu() for b in branches]),
                                            body.repeat(len(branches), 1)), 1).to(device))
        for length, branches in groups.items()
    ]


def forward_step(model: GPT, s: Stream, done: int, k: int, kv_cache: bool) -> torch.Tensor:
    """Logits ``(rows, k, V)`` of the stream's next ``k`` queries, ``done`` cells into the order.

    On the KV cache it feeds only what the cache lacks: the first call is the prefill (conditions and
    known cells), later ones the codes accepted last step re-interleaved with their queries.
    """
    seq, p = s.seq, s.length + 2 * done  # p: slot of this step's first query
    queries = seq[:, p : p + 2 * k : 2]
    if kv_cache:
        for block, c in zip(model.transformer.h, s.cache):
            block.attn.kv_cache = c
        idx = torch.cat((seq[:, s.start : p], queries), dim=1)
        out = model(idx, input_pos=torch.arange(s.start, p + k, device=seq.device), input_pos_maxp1=p + k)
    else:
        out = model(torch.cat((seq[:, :p], queries), dim=1))
    s.start = p + 1
    return out[:, -k:]


def decode_step(
    model: GPT,
    layout: VocabLayout,
    streams: list[Stream],
    settings: SamplingSettings,
    done: int,
    k: int,
    scale: float | None,
    kv_cache: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One step: each branch's code logits, guidance ``u + scale (c - u)`` (None: unguided), ``(B, k)`` codes.

    The codes are written into every stream, so the next step feeds them.
    """
    codes = slice(layout.code_offset, layout.class_offset)
    logits: dict[int, torch.Tensor] = {}
    for s in streams:
        out = forward_step(model, s, done, k, kv_cache)[..., codes].float()
        logits.update(zip(s.branches, out.chunk(len(s.branches))))
    mixed = logits[0] if scale is None else logits[1] + scale * (logits[0] - logits[1])
    new = sample_codes(mixed, settings.temperature, settings.top_k, settings.top_p, generator)
    for s in streams:
        p = s.length + 2 * done
        s.seq[:, p + 1 : p + 2 * k : 2] = (layout.code_offset + new).repeat(len(s.branches), 1)
    return new


def lookahead(k: int, n: int, n_gen: int, streams: list[Stream]) -> int:
    """The proposals in flight a round can hold: ``k``, at most what the grid and context leave room for."""
    shortest = min(s.length for s in streams)
    return max(0, min(k, n_gen - 1, (n + shortest - 1) // 2, (2 * n + shortest - 2) // 3))


def speculative_forward(model: GPT, s: Stream, drafts: Drafts, queries: torch.Tensor, first: bool) -> torch.Tensor:
    """Logits ``(rows, J, V)`` at the cells ``done + t``: the pending proposals, then ``queries`` position queries.

    Each image feeds from its last decided code (the prefill on the first round) to its last query, at its
    own cache slots; a row with less to feed starts earlier and recomputes cached slots, so every row
    has the same length. The first query sits in its training slot, the others follow it.
    """
    P, branches = s.length, len(s.branches)
    dev = s.seq.device
    done, pending, queries = drafts.done.to(dev), drafts.pending.to(dev), queries.to(dev)
    q0 = 2 * (done + pending)  # slot of the first query after the conditions
    end = q0 + queries
    begin = torch.full_like(done, -P) if first else 2 * done - 1
    T = int((end - begin).max())
    slots = (end - T)[:, None] + torch.arange(T, device=dev)  # after the conditions
    src = torch.where(slots < q0[:, None], slots, q0[:, None] + 2 * (slots - q0[:, None]))
    pos = (P + slots).repeat(branches, 1)
    for block, c in zip(model.transformer.h, s.cache):
        block.attn.kv_cache = c
    out = model(s.seq.gather(1, (P + src).repeat(branches, 1)), input_pos=pos, input_pos_maxp1=int(pos.max()) + 1)
    J = int((pending + queries).max())
    t = torch.arange(J, device=dev)
    at = torch.where(t < pending[:, None], 2 * (done[:, None] + t), q0[:, None] + t - pending[:, None])
    at = (at - (end - T)[:, None]).clamp(0, T - 1).repeat(branches, 1)
    return out.gather(1, at[..., None].expand(-1, -1, out.shape[-1]))


def speculate(
    model: GPT,
    layout: VocabLayout,
    streams: list[Stream],
    settings: SamplingSettings,
    ordered: torch.Tensor,
    n_known: int,
    k: int,
    generator: torch.Generator | None,
    bar: tqdm | None,
    stats: SpeculativeStats | None,
) -> None:
    """Decode every cell of ``ordered`` after the known ones by speculative rounds, one forward per round.

    The model drafts up to ``k`` cells ahead of each image's frontier and the next round checks them
    (``rar_llm.sampling.speculative``); images advance at their own pace, each at its own cache slots.
    """
    B, n = ordered.shape
    n_gen, device = n - n_known, model.lm_head.weight.device
    codes = slice(layout.code_offset, layout.class_offset)
    scales = torch.tensor([guidance_scale(settings.guidance, t, n_gen, settings.schedule, settings.power)
                           for t in range(n_gen)], device=device)
    drafts = Drafts.start(B, n, layout.codebook_size, n_known, device)
    first = True
    while bool((drafts.done < n).any()):
        queries = (n - drafts.done - drafts.pending).clamp(max=k + 1)
        logits = {}
        for s in streams:
            out = speculative_forward(model, s, drafts, queries, first)[..., codes].float()
            logits.update(zip(s.branches, out.chunk(len(s.branches))))
        mixed = logits[0]
        if settings.guided:
            cells = (drafts.done[:, None] + torch.arange(mixed.shape[1], device=device)).clamp(max=n - 1)
            mixed = logits[1] + scales[cells - n_known][..., None] * (logits[0] - logits[1])
        target = code_probs(mixed, settings.temperature, settings.top_k, settings.top_p)
        start = drafts.done.cpu()
        decided = check(drafts, target, queries.to(device), k, generator, stats, settings.temperature == 0).cpu()
        rows, t = (decided >= 0).nonzero(as_tuple=True)
        ordered[rows, start[rows] + t] = decided[rows, t]
        fed = torch.where(torch.arange(n, device=device) < drafts.done[:, None], ordered.to(device), drafts.codes)
        for s in streams:  # decided codes and the proposals in flight, for the next round to feed
            s.seq[:, s.length + 1 :: 2] = (layout.code_offset + fed).repeat(len(s.branches), 1)
        if stats is not None:
            stats.forwards += 1
        if bar is not None:
            bar.update(int(drafts.done.min()) - int(start.min()))
        first = False


@torch.inference_mode()
def decode_grids(
    model: GPT,
    layout: VocabLayout,
    prefixes: Sequence[torch.Tensor],
    settings: SamplingSettings,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    prepack: bool = True,
    bar: tqdm | None = None,
    speculative: int = 0,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """The one decoding loop: ``(B, H, W)`` codes after the conditions ``prefixes``.

    ``prefixes``: the conditional branch ``(B, P)`` and, when guided, the unconditional one ``(B, P')``.
    ``speculative``: proposals in flight per image (0: one cell per step, or ``settings.steps``); needs
    the KV cache. ``stats`` collects what speculative rounds did.
    The model's KV caches, mask cache and context length are put back as the caller had them.
    """
    B, n = prefixes[0].shape[0], layout.num_positions
    known_grid, known_mask = known_cells(known, known_mask, B, layout)
    perm = known_first(cell_orders(settings.order, B, layout, generator), known_mask)
    n_known = int(known_mask[0].sum())
    n_gen = n - n_known
    if n_gen == 0:
        raise ValueError("known_mask marks every cell as given: there is nothing to generate")
    counts = parallel_schedule(n_gen, n_gen if settings.steps is None else settings.steps)
    ordered = known_grid.gather(1, perm)  # codes in the order they are fed; generated ones are written in
    body = torch.empty(B, 2 * n, dtype=torch.long)
    body[:, 0::2] = layout.pos_offset + perm
    body[:, 1::2] = layout.code_offset + ordered
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    streams = make_streams(prefixes, body, device)
    need = max(s.seq.shape[1] for s in streams)
    rows = sum(s.seq.shape[0] for s in streams)
    with callers_state(model), prepacked(model, batch_hint=2 * rows) if prepack else contextlib.nullcontext():
        _fit_context(model, need)
        if kv_cache:
            for s in streams:
                model.set_kv_cache(s.seq.shape[0], max_seq_length=need, device=device, dtype=dtype)
                s.cache = [block.attn.kv_cache for block in model.transformer.h]
        k = lookahead(speculative, n, n_gen, streams) if kv_cache else 0
        if k:
            speculate(model, layout, streams, settings, ordered, n_known, k, generator, bar, stats)
        done = n_known
        for k in [] if k else counts:
            scale = guidance_scale(settings.guidance, done - n_known, n_gen, settings.schedule, settings.power)
            new = decode_step(model, layout, streams, settings, done, k, scale if settings.guided else None,
                              kv_cache, generator)
            ordered[:, done : done + k] = new.cpu()
            done += k
            if stats is not None:
                stats.forwards, stats.cells = stats.forwards + 1, stats.cells + B * k
            if bar is not None:
                bar.update(1)
    grid = torch.empty(B, n, dtype=torch.long).scatter_(1, perm, ordered)
    return grid.view(B, layout.height, layout.width)


def _chunked(
    model: GPT,
    layout: VocabLayout,
    prefixes: Sequence[torch.Tensor],
    settings: SamplingSettings,
    known,
    known_mask,
    seed: int | torch.Generator | None,
    kv_cache: bool,
    prepack: bool,
    progress: bool,
    batch_size: int | None,
    speculative: int,
    stats: SpeculativeStats | None,
) -> torch.Tensor:
    """``decode_grids`` over chunks of the batch that fit the memory, with one progress bar, packing once."""
    B, H, W = prefixes[0].shape[0], layout.height, layout.width
    grid, mask = known_cells(known, known_mask, B, layout)  # checked once for the whole batch
    n_gen = layout.num_positions - int(mask[0].sum())
    per_chunk = n_gen if speculative else settings.steps or n_gen  # the bar counts steps, or cells when speculative
    need = max(p.shape[1] for p in prefixes) + 2 * layout.num_positions
    size = chunk_size(model, len(prefixes), need, batch_size)
    generator = make_generator(seed, model.lm_head.weight.device)
    out = []
    with (prepacked(model, batch_hint=2 * len(prefixes) * min(size, B)) if prepack else contextlib.nullcontext(),
          tqdm(total=per_chunk * -(-B // size), desc="generate", unit="step", disable=not progress, leave=False) as bar):
        for lo in range(0, B, size):
            hi = min(B, lo + size)
            part = replace(settings, order=_rows(settings.order, lo, hi, B))
            out.append(decode_grids(
                model, layout, [p[lo:hi] for p in prefixes], part, grid[lo:hi].view(-1, H, W),
                mask[lo:hi].view(-1, H, W), generator, kv_cache, prepack, bar, speculative, stats,
            ))
    return torch.cat(out)


def _rows(order, lo: int, hi: int, batch: int):
    """Rows ``lo:hi`` of a per-sample order ``(B, H*W)``; a name or a shared permutation passes through."""
    if isinstance(order, str):
        return order
    t = torch.as_tensor(order)
    return t[lo:hi] if t.dim() == 2 and t.shape[0] == batch else order


def generate(
    model: GPT,
    class_id: int | Sequence[int] | torch.Tensor | None = None,
    *,
    prompt: str | Sequence[int] | None = None,
    num_samples: int = 1,
    layout: VocabLayout | str | Path | None = None,
    settings: SamplingSettings | None = None,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    seed: int | torch.Generator | None = None,
    batch_size: int | None = None,
    speculative: int = 0,
    stats: SpeculativeStats | None = None,
    kv_cache: bool = True,
    prepack: bool = True,
    progress: bool = False,
    **fields,
) -> torch.Tensor:
    """Sample code grids for class ids or a text prompt; returns ``(B, H, W)`` long codes in ``0..K-1``.

    Args:
        model: a litgpt ``GPT`` from ``rar_llm.load_model`` (it carries its layout).
        class_id: one class id or many (one sample each): ints, a flat list or an integer tensor.
        prompt: instead of class ids, a text (or base-tokenizer ids) for a model trained on captioned
            images (``rar_llm.data.mixed``): the model reads ``[prompt, <boi>, pos, code, ...]`` and guidance's
            unconditional branch is ``[<boi>, ...]``, the training form of a dropped caption.
        num_samples: samples per class id, or of the prompt.
        layout: the vocabulary layout (or a checkpoint folder / layout file / name) for a GPT that
            carries none.
        settings: how to sample (``SamplingSettings``: guidance, schedule, power, temperature, top_k,
            top_p, order, steps); ``RAR_PRESETS["rar-b"]`` is RAR-B's. Default: ``SamplingSettings()``.
        known, known_mask: a code grid and a boolean mask of its given cells, ``(H, W)`` or
            ``(B, H, W)`` (inpainting / outpainting). Given cells are fed first, in the order, and
            come back unchanged; only the others are sampled.
        seed: an int or a ``torch.Generator`` (on the model's device) for reproducible samples.
        batch_size: images per forward batch; default: as many as keep the KV cache under 1 GiB
            (``CACHE_BUDGET``), so 10,000 images run in chunks rather than out of memory.
        speculative: lossless speculative decoding with up to this many cells proposed ahead per image
            (``rar_llm.sampling.speculative``): fewer forwards, samples distributed exactly as with 0,
            one cell per forward. Not with ``steps``.
        stats: a ``SpeculativeStats`` to fill with the forwards run, the cells decided and (speculative) the
            acceptance by lookahead.
        kv_cache: False recomputes the whole sequence every step (a reference for tests and benchmarks).
        prepack: on the CPU, run the linear layers on prepacked weights for the call (``rar_llm.sampling.prepack``).
        progress: show a tqdm bar over the steps.
        fields: ``SamplingSettings`` fields that override ``settings``: ``generate(model, 3, guidance=2.0)``.

    The model's KV cache, mask cache and context length are put back as the caller had them.
    """
    settings = resolve(settings, fields, "generate")
    layout = model_layout(model, layout)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    if (class_id is None) == (prompt is None):
        raise ValueError("give class ids or a prompt (generate_from_prompt), not both and not neither")
    if prompt is not None:
        cond = torch.tensor(encode_prompt(layout, prompt) + [layout.boi]).expand(num_samples, -1)
        uncond = torch.full((num_samples, 1), layout.boi)
    else:
        classes = layout.class_tokens(class_ids(class_id)).repeat_interleave(num_samples)
        if classes.numel() == 0:
            raise ValueError("no class ids given; pass one class id or a list of them")
        cond, uncond = classes[:, None], torch.full_like(classes, layout.null_class)[:, None]
    prefixes = [cond, uncond] if settings.guided else [cond]
    check_speculative(speculative, settings, kv_cache)
    return _chunked(model, layout, prefixes, settings, known, known_mask, seed, kv_cache, prepack, progress, batch_size,
                    speculative, stats)


def check_speculative(speculative: int, settings: SamplingSettings, kv_cache: bool) -> None:
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
        raise ValueError(f"speculative={speculative!r} must be an integer >= 0 (cells proposed ahead; 0: off)")
    if speculative and settings.steps is not None:
        raise ValueError("speculative decoding and steps (parallel decoding) exclude each other; drop one")
    if speculative and not kv_cache:
        raise ValueError("speculative decoding runs on the KV cache; drop kv_cache=False")


def generate_from_prompt(model: GPT, prompt: str | Sequence[int], **kwargs) -> torch.Tensor:
    """``num_samples`` code grids for a text prompt: ``generate(model, prompt=prompt, **kwargs)``."""
    return generate(model, prompt=prompt, **kwargs)
