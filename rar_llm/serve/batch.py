"""Offline batch generation on upstream vLLM: ``vllm_generate(llm, class_ids, settings=..., **fields)``.

``make_llm`` builds an in-process ``vllm.LLM`` with ``rar_llm.serve.plugin``'s logits processor and
pairing scheduler; ``vllm_generate`` turns ``rar_llm.generate``'s settings into one request per branch
of each image (``rar_llm.sampling.settings.to_extra_args``) and the outputs back into code grids.
Imports only vLLM, torch and the torch-only parts of rar_llm.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from vllm import SamplingParams

from rar_llm.sampling.decoding import cell_orders, class_ids, known_cells, known_first
from rar_llm.sampling.settings import KEY, SamplingSettings, resolve, to_extra_args
from rar_llm.serve import UnpairedGuidanceError
from rar_llm.serve.plugin import RARLogitsProcessor, RARScheduler
from rar_llm.vocab import VocabLayout

def request_params(extra_args: dict, layout: VocabLayout, logprobs: bool = False) -> SamplingParams:
    """vLLM ``SamplingParams`` of one branch (the same for both branches of a pair), from ``to_extra_args``."""
    n = len(extra_args[KEY["order"]])
    return SamplingParams(
        temperature=0.0, max_tokens=2 * n - 1, stop_token_ids=[layout.eoi], detokenize=False,
        logprobs=0 if logprobs else None, extra_args=extra_args,
    )


def make_llm(model_dir: str | Path, max_images: int = 64, guidance: bool = True, **kwargs):
    """A ``vllm.LLM`` for a ``rar-llm export`` folder, set up so guidance pairs cannot be split.

    ``max_images``: images decoded together (``max_num_seqs`` = twice that with guidance). The engine
    runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), uses ``RARLogitsProcessor`` and
    ``RARScheduler`` on whichever model runner vLLM picks (it prints which); ``kwargs`` go to ``vllm.LLM``
    (e.g. ``dtype="float32"``).
    """
    from vllm import LLM

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    layout = VocabLayout.from_checkpoint(model_dir)
    settings = dict(
        model=str(model_dir), logits_processors=[RARLogitsProcessor], scheduler_cls=RARScheduler,
        max_num_seqs=(2 if guidance else 1) * max_images, max_model_len=layout.seq_len,
        logprobs_mode="raw_logprobs",
    )
    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(kwargs)
    if not sized and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        settings["kv_cache_memory_bytes"] = kv_cache_bytes(model_dir, settings["max_num_seqs"], layout.seq_len)
    settings.update(kwargs)
    llm = LLM(**settings)
    print(f"rar_llm: vLLM runs RAR on its {model_runner(llm)} model runner", flush=True)
    return llm


def model_runner(llm) -> str:
    """Which of vLLM's model runners the engine uses: ``V2`` (vLLM's default on GPUs) or ``legacy (V1)``
    (the CPU build, or ``VLLM_USE_V2_MODEL_RUNNER=0``); ``RARLogitsProcessor`` serves either."""
    return "V2" if getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", False) else "legacy (V1)"


def kv_cache_bytes(model_dir: str | Path, seqs: int, seq_len: int) -> int:
    """KV cache for ``seqs`` whole sequences plus room for rounding (at least 64 MiB): no preemption, no
    fraction-of-memory reservation (vLLM's CPU default asks for 92 % of the RAM)."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * (4 if "32" in dtype else 2)
    return max(64 << 20, int(1.25 * per_token * seqs * (seq_len + 256)))


def engine_capacity(llm) -> tuple[int, bool]:
    """(max_num_seqs, whether the engine pairs by construction: RARScheduler)."""
    cfg = llm.llm_engine.vllm_config.scheduler_config
    cls = cfg.scheduler_cls
    pairs = cls is RARScheduler or (isinstance(cls, type) and issubclass(cls, RARScheduler)) or (
        isinstance(cls, str) and cls.endswith("RARScheduler"))
    return cfg.max_num_seqs, pairs


def build_requests(
    layout: VocabLayout,
    classes: torch.Tensor,
    settings: SamplingSettings,
    known,
    known_mask,
    seed: int | torch.Generator | None,
):
    """Prompts, ``extra_args`` per image and full orders for a batch (the orders and seeds follow
    ``rar_llm.generate``'s generator)."""
    B, n = classes.numel(), layout.num_positions
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(
        int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
    grid, mask = known_cells(known, known_mask, B, layout)
    perm = known_first(cell_orders(settings.order, B, layout, gen), mask)
    n_known = int(mask[0].sum())
    if n_known == n:
        raise ValueError("known_mask marks every cell as given: there is nothing to generate")
    seeds = torch.randint(2**62, (B,), generator=gen).tolist()
    call = uuid.uuid4().hex[:12]
    prompts, extras = [], []
    for b in range(B):
        ctx = []
        for cell in perm[b, :n_known].tolist():
            ctx += [layout.pos_offset + cell, layout.code_offset + int(grid[b, cell])]
        gen_order = perm[b, n_known:].tolist()
        pair = f"{call}-{b}" if settings.guided else None
        extras.append(to_extra_args(replace(settings, order=gen_order), seeds[b], pair))
        tail = ctx + [layout.pos_offset + gen_order[0]]
        prompts.append([int(layout.class_token(int(classes[b])))] + tail)
        if settings.guided:
            prompts.append([layout.null_class] + tail)
    return prompts, extras, perm, grid, n_known


def vllm_generate(
    llm,
    class_id: int | Sequence[int] | torch.Tensor,
    *,
    settings: SamplingSettings | None = None,
    layout: VocabLayout | str | Path | None = None,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    seed: int | torch.Generator | None = None,
    batch_size: int | None = None,
    return_details: bool = False,
    use_tqdm: bool = False,
    **fields,
):
    """``rar_llm.generate``'s settings on a ``vllm.LLM`` (``make_llm``); returns ``(B, H, W)`` codes.

    Greedy results equal ``rar_llm.generate``'s (same orders for the same ``seed``); sampled codes come
    from per-image generators (``rar_seed``), so they differ from ``rar_llm.generate``'s draws but not
    in distribution. ``settings`` and ``fields`` as in ``rar_llm.generate`` (``SamplingSettings``, its
    fields as keywords overriding it); ``steps`` (parallel decoding) is not supported: vLLM adds one
    token per step.

    Pairing rule: each call queues every request at once; with ``RARScheduler`` (``make_llm``) guided
    pairs are admitted whole, so any batch size works. Without it the batch is cut into chunks of
    ``max_num_seqs // 2`` images (``batch_size`` overrides). Either way an image whose branches lost
    lockstep raises ``UnpairedGuidanceError``; it is never returned unguided.
    ``return_details``: also return ``{"order": (B, n) cells in decoding order, "tokens": (B, L)
    conditional sequences, "logprobs": (B, n_generated) model log-probabilities of the drawn codes}``.
    """
    settings = resolve(settings, fields, "vllm_generate")
    model_dir = llm.llm_engine.vllm_config.model_config.model
    layout = VocabLayout.from_checkpoint(model_dir) if layout is None else (
        layout if isinstance(layout, VocabLayout) else VocabLayout.from_checkpoint(layout))
    classes = class_ids(class_id)
    if classes.numel() == 0:
        raise ValueError("no class ids given")
    layout.class_tokens(classes)  # checks the ids
    prompts, extras, perm, grid, n_known = build_requests(layout, classes, settings, known, known_mask, seed)
    rows = 2 if settings.guided else 1
    capacity, pairs = engine_capacity(llm)
    if batch_size is None:
        batch_size = len(extras) if pairs else max(1, capacity // rows)
    B, n = len(extras), layout.num_positions
    tokens, logprobs, failed = run_requests(llm, layout, prompts, extras, rows, batch_size, return_details, use_tqdm)
    if failed:
        raise UnpairedGuidanceError(
            f"{len(failed)} of {B} images did not get their {2 * (n - n_known) - 1} tokens in lockstep "
            f"(images {failed[:10]}): the conditional and <class_null> requests of an image ran in different "
            "engine steps (or a request was preempted), so guidance could not be applied. Build the engine "
            "with rar_llm.serve.batch.make_llm (RARScheduler), or keep 2 x batch <= max_num_seqs with the "
            "engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and enough KV cache"
        )
    ordered = tokens[:, 2::2] - layout.code_offset  # codes in decoding order (known ones included)
    codes = torch.empty(B, n, dtype=torch.long).scatter_(1, perm, ordered)
    codes = codes.view(B, layout.height, layout.width)
    if return_details:
        return codes, {"order": perm, "tokens": tokens, "logprobs": logprobs}
    return codes


def run_requests(llm, layout: VocabLayout, prompts: list[list[int]], extras: list[dict], rows: int,
                 batch_size: int, logprobs: bool, use_tqdm: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Run the ``rows`` requests of each image, ``batch_size`` images per ``llm.generate``.

    Returns the conditional sequences ``(B, 1 + 2n)``, the drawn codes' log-probabilities (with
    ``logprobs``, else NaN) and the images whose branches did not get their tokens in lockstep.
    """
    B, n = len(extras), layout.num_positions
    want = 2 * len(extras[0][KEY["order"]]) - 1
    tokens = torch.zeros(B, 1 + 2 * n, dtype=torch.long)
    lp = torch.full((B, (want + 1) // 2), float("nan"))
    failed = []
    for lo in range(0, B, batch_size):
        hi = min(B, lo + batch_size)
        params = [request_params(e, layout, logprobs) for e in extras[lo:hi] for _ in range(rows)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[lo * rows : hi * rows]], params,
                            use_tqdm=use_tqdm)
        for j, b in enumerate(range(lo, hi)):
            mine = outs[j * rows : (j + 1) * rows]
            toks = [list(o.outputs[0].token_ids) for o in mine]
            if any(len(t) != want for t in toks) or any(t != toks[0] for t in toks):
                failed.append(b)
                continue
            seq = prompts[b * rows] + toks[0]
            tokens[b] = torch.tensor(seq)
            if logprobs:
                lps = mine[0].outputs[0].logprobs
                lp[b] = torch.tensor([lps[k][seq[len(prompts[b * rows]) + k]].logprob for k in range(0, want, 2)])
    return tokens, lp, failed
