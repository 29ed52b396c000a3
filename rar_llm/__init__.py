"""rar_llm: RAR image generation as a plain litgpt causal language model.

``rar_llm.generate(model, class_id)`` after ``model = rar_llm.load_model(checkpoint_dir)``. The layout
and the training transform (``VocabLayout``, ``Permutation``, ``interleave``) need only torch and
numpy, for a plain PyTorch or nanoGPT loop; the litgpt parts are imported when first used, and
importing them registers the rar-* model configs with litgpt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rar_llm.decoding import RAR_PRESETS
from rar_llm.permute import Permutation, anneal_r, interleave
from rar_llm.vocab import VocabLayout

_LAZY = {
    "generate": "rar_llm.sampling",
    "generate_from_prompt": "rar_llm.sampling",
    "load_model": "rar_llm.checkpoint",
}

if TYPE_CHECKING:
    from rar_llm.checkpoint import load_model
    from rar_llm.sampling import generate, generate_from_prompt


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rar_llm' has no attribute {name!r}")


__all__ = [
    "RAR_PRESETS",
    "Permutation",
    "VocabLayout",
    "anneal_r",
    "generate",
    "generate_from_prompt",
    "interleave",
    "load_model",
]
