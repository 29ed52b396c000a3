"""rar_llm: RAR image generation as a plain litgpt causal language model.

``model = rar_llm.load_model(checkpoint_dir)``, then ``rar_llm.generate(model, class_id)``. Every name
users and recipes rely on is listed here and imported on first use, so ``import rar_llm`` itself imports
nothing heavy. The layout and the training transform (``VocabLayout``, ``Permutation``, ``interleave``)
need only torch and numpy, for a plain PyTorch or nanoGPT loop; the litgpt parts register the rar-*
model configs with litgpt when they load; ``vllm_generate`` needs vLLM, ``hf_generate`` transformers.

The package's layers, bottom first (a module imports only from its own layer or below):
``vocab``, ``permute``, ``outputs``, ``nets``, ``sampling.settings``, ``data.shards`` (no torch model code);
``text``, ``tokenizers``, ``sampling.decoding``, ``sampling.speculative`` (no litgpt); ``configs``, ``checkpoint`` (the model);
``sampling`` (decoding loops); ``data``, ``eval``, ``serve``, ``extend``; the commands
(``sampling.cli``, ``demo``, ``__main__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {  # name -> module; imported on first use
    # the vocabulary and the training transform
    "VocabLayout": "rar_llm.vocab",
    "Permutation": "rar_llm.permute",
    "anneal_r": "rar_llm.permute",
    "interleave": "rar_llm.permute",
    # checkpoints
    "init": "rar_llm.checkpoint",
    "load_model": "rar_llm.checkpoint",
    # sampling
    "SamplingSettings": "rar_llm.sampling.settings",
    "RAR_PRESETS": "rar_llm.sampling.settings",
    "generate": "rar_llm.sampling.loop",
    "generate_from_prompt": "rar_llm.sampling.loop",
    "SpeculativeStats": "rar_llm.sampling.speculative",
    "hf_generate": "rar_llm.sampling.hf",
    "vllm_generate": "rar_llm.serve.batch",
    "make_llm": "rar_llm.serve.batch",
    # data
    "RARData": "rar_llm.data.rar",
    "MixedData": "rar_llm.data.mixed",
    "Shards": "rar_llm.data.shards",
    "ShardWriter": "rar_llm.data.shards",
    "read_meta": "rar_llm.data.shards",
    # image tokenizers and pictures
    "load_tokenizer": "rar_llm.tokenizers",
    "to_pixels": "rar_llm.tokenizers.draw",
    "image_grid": "rar_llm.tokenizers.draw",
    # evaluation and export
    "evaluate": "rar_llm.eval.evaluate",
    "heldout_nll": "rar_llm.eval.evaluate",
    "export": "rar_llm.serve.export",
    "import_hf": "rar_llm.serve.export",
}

if TYPE_CHECKING:
    from rar_llm.checkpoint import init, load_model
    from rar_llm.data.mixed import MixedData
    from rar_llm.data.rar import RARData
    from rar_llm.data.shards import Shards, ShardWriter, read_meta
    from rar_llm.eval.evaluate import evaluate, heldout_nll
    from rar_llm.permute import Permutation, anneal_r, interleave
    from rar_llm.sampling.hf import hf_generate
    from rar_llm.sampling.loop import generate, generate_from_prompt
    from rar_llm.sampling.settings import RAR_PRESETS, SamplingSettings
    from rar_llm.sampling.speculative import SpeculativeStats
    from rar_llm.serve.batch import make_llm, vllm_generate
    from rar_llm.serve.export import export, import_hf
    from rar_llm.tokenizers import load_tokenizer
    from rar_llm.tokenizers.draw import image_grid, to_pixels
    from rar_llm.vocab import VocabLayout


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rar_llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted(_LAZY)
