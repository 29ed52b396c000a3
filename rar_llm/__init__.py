"""rar_llm: RAR image generation as a plain litgpt causal language model."""

from rar_llm import configs  # noqa: F401  (registers rar-b ... rar-xxl with litgpt)
from rar_llm.permute import Permutation, anneal_r, interleave
from rar_llm.vocab import VocabLayout

__all__ = ["Permutation", "VocabLayout", "anneal_r", "interleave"]
