"""Image generation with transformers' own ``generate`` on an exported model (``rar-llm export``).

Two logits processors turn a plain causal-LM ``generate`` into RAR sampling: ``RARPositions`` forces
the position token of each step of the chosen order and keeps code steps on image codes;
``RARGuidance`` applies classifier-free guidance with ``rar_llm.sampling.decoding``'s schedules.

transformers' own guidance (``generate(guidance_scale=...)``, i.e.
``UnbatchedClassifierFreeGuidanceLogitsProcessor``) runs the unconditional branch as a second forward
with its own KV cache, which is what RAR needs, but its scale is constant and it skips that forward
when the scale is 1 (the power-cosine schedule at step 0), which would desynchronise the cache; so
``RARGuidance`` subclasses it for the unconditional branch and mixes with a per-step scale.
``ClassifierFreeGuidanceLogitsProcessor`` expects MusicGen's doubled-batch ``generate``; it does not
apply to Llama.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from rar_llm.sampling.decoding import cell_orders, class_ids, guidance_scale
from rar_llm.sampling.settings import FIELDS, SamplingSettings, resolve
from rar_llm.vocab import VocabLayout


class RARPositions(LogitsProcessor):
    """Force position tokens on even steps (the order's next cell) and image codes on odd steps."""

    def __init__(self, layout: VocabLayout, order: torch.Tensor, prompt_len: int) -> None:
        self.layout = layout
        self.order = order
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        out = torch.full_like(scores, -math.inf)
        if step % 2 == 0:
            cells = self.order.to(scores.device)[:, step // 2]
            out[torch.arange(scores.shape[0], device=scores.device), self.layout.pos_offset + cells] = 0.0
        else:
            codes = slice(self.layout.code_offset, self.layout.code_offset + self.layout.codebook_size)
            out[:, codes] = scores[:, codes]
        return out


class RARGuidance(UnbatchedClassifierFreeGuidanceLogitsProcessor):
    """Classifier-free guidance on code steps, ``uncond + g_t * (cond - uncond)`` on raw logits (as RAR).

    The unconditional branch is the same sequence with the null class; it runs every step (position
    steps too) so its KV cache stays in step with the conditional one.
    """

    def __init__(
        self,
        model,
        layout: VocabLayout,
        batch: int,
        prompt_len: int,
        guidance: float,
        schedule: str = "constant",
        power: float = 0.0,
    ) -> None:
        guidance_scale(guidance, 0, 1, schedule, power)  # validates the schedule name
        null = torch.full((batch, 1), layout.null_class, dtype=torch.long, device=model.device)
        super().__init__(guidance, model, unconditional_ids=null)
        self.layout = layout
        self.prompt_len = prompt_len
        self.schedule = schedule
        self.power = power

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uncond = self.get_unconditional_logits(input_ids)[:, -1].to(scores.dtype)
        step = input_ids.shape[1] - self.prompt_len
        if step % 2 == 0:
            return scores
        g = guidance_scale(self.guidance_scale, step // 2, self.layout.num_positions, self.schedule, self.power)
        return uncond + g * (scores - uncond)


@torch.inference_mode()
def hf_generate(
    model,
    layout: VocabLayout,
    class_id: int | Sequence[int] | torch.Tensor,
    settings: SamplingSettings | None = None,
    **fields,
) -> torch.Tensor:
    """Sample ``(B, H, W)`` code grids with ``model.generate`` of a transformers causal LM.

    Same settings and same greedy result as ``rar_llm.generate`` (one cell per step; use
    ``torch.manual_seed`` for reproducible samples: transformers draws from the global generator).

    Args:
        model: ``AutoModelForCausalLM.from_pretrained(folder)`` of a ``rar-llm export`` folder.
        layout: ``VocabLayout.from_checkpoint(folder)``.
        class_id: one class id or many (one image each).
        settings: how to sample (``SamplingSettings``; guidance runs a second forward per step);
            ``steps`` (parallel decoding) is not supported: ``generate`` adds one token per step.
        fields: ``SamplingSettings`` fields override ``settings`` (``hf_generate(model, layout, 3,
            guidance=2.0)``); any other keyword goes to ``model.generate`` (e.g. ``use_cache``).
    """
    generate_kwargs = {k: fields.pop(k) for k in list(fields) if k not in FIELDS}
    settings = resolve(settings, fields, "hf_generate")
    if settings.steps is not None:
        raise ValueError("steps (parallel decoding) is not supported by hf_generate: it decodes one cell per step")
    prompt = layout.class_tokens(class_ids(class_id)).to(model.device)[:, None]
    batch = prompt.shape[0]
    cells = cell_orders(settings.order, batch, layout, None)
    processors = LogitsProcessorList()
    if settings.guided:
        processors.append(RARGuidance(model, layout, batch, prompt.shape[1], settings.guidance, settings.schedule,
                                      settings.power))
    processors.append(RARPositions(layout, cells, prompt.shape[1]))
    if settings.temperature == 0:
        sampling = dict(do_sample=False, top_k=None)
    else:
        sampling = dict(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or 0,
                        top_p=settings.top_p)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        logits_processor=processors,
        max_new_tokens=2 * layout.num_positions,
        eos_token_id=layout.eoi,  # never sampled (code steps are masked to codes): every image is complete
        pad_token_id=layout.eoi,
        **sampling,
        **generate_kwargs,
    )
    codes = out[:, prompt.shape[1] + 1 :: 2].cpu() - layout.code_offset
    grid = torch.empty_like(codes).scatter_(1, cells, codes)
    return grid.view(batch, layout.height, layout.width)
