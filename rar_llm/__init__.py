"""rar_llm: RAR image generation as a plain litgpt causal language model.

``rar_llm.generate(model, class_id)`` after ``model = rar_llm.load_model(checkpoint_dir)``. The layout
and the training transform (``VocabLayout``, ``Permutation``, ``interleave``) need only torch and
numpy, for a plain PyTorch or nanoGPT loop; every name is imported on first use (the litgpt parts
register the rar-* model configs with litgpt when they load; ``vllm_generate`` needs vLLM).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {  # name -> module; imported on first use, so `import rar_llm` itself imports nothing heavy
    "RAR_PRESETS": "rar_llm.sampling.settings",
    "SamplingSettings": "rar_llm.sampling.settings",
    "Permutation": "rar_llm.permute",
    "anneal_r": "rar_llm.permute",
    "interleave": "rar_llm.permute",
    "VocabLayout": "rar_llm.vocab",
    "generate": "rar_llm.sampling.loop",
    "generate_from_prompt": "rar_llm.sampling.loop",
    "load_model": "rar_llm.checkpoint",
    "vllm_generate": "rar_llm.serve.batch",
}

if TYPE_CHECKING:
    from rar_llm.checkpoint import load_model
    from rar_llm.sampling.settings import RAR_PRESETS, SamplingSettings
    from rar_llm.permute import Permutation, anneal_r, interleave
    from rar_llm.sampling.loop import generate, generate_from_prompt
    from rar_llm.serve.batch import vllm_generate
    from rar_llm.vocab import VocabLayout


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rar_llm' has no attribute {name!r}")


__all__ = [
    "RAR_PRESETS",
    "Permutation",
    "SamplingSettings",
    "VocabLayout",
    "anneal_r",
    "generate",
    "generate_from_prompt",
    "interleave",
    "load_model",
    "vllm_generate",
]
