"""Does llama.cpp compute the same logits as litgpt for a GGUF export? (needs ``pip install llama-cpp-python``)

Exports a checkpoint with ``rar-llm export --format gguf`` in each dtype, runs one RAR sequence
(class, random order, random codes) through ``llama_cpp.Llama`` and through litgpt in float32, and
prints the max abs logit difference over every position and id. A wrong rotary layout or weight
mapping shows up as differences of the size of the logits themselves.

    python bench/gguf_check.py                                 # a random rar-tiny on the digits layout
    python bench/gguf_check.py --checkpoint out/rar-b/final --dtypes '[bfloat16]'

Measured here (random rar-tiny on digits, logits up to 0.85, llama-cpp-python 0.3.36, CPU), float32 KV
cache: float32 5.4e-07, float16 4.9e-04, bfloat16 4.0e-03; float32 with the default float16 KV cache
1.6e-04. Without the q/k rotary reordering (``rope_to_interleaved``) float32 gives 1.3e-02.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def random_checkpoint(out_dir: Path) -> Path:
    """A rar-tiny digits checkpoint whose norm weights are random too (so their mapping is checked)."""
    import torch

    from rar_llm.checkpoint import init

    init(out_dir, model="rar-tiny", layout="digits")
    sd = torch.load(out_dir / "lit_model.pth")
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.dim() == 1:
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    torch.save(sd, out_dir / "lit_model.pth")
    return out_dir


def gguf_check(
    checkpoint: Path | None = None,
    dtypes: list[str] | None = None,
    kv_f32: bool = True,
    seed: int = 0,
    threads: int = 2,
) -> dict[str, float]:
    """Max abs logit difference, llama.cpp vs litgpt (float32), per export dtype.

    Args:
        checkpoint: a litgpt checkpoint folder; default: a random rar-tiny on the digits layout.
        dtypes: export dtypes to check (float32, float16, bfloat16); default all three.
        kv_f32: run llama.cpp with a float32 KV cache (its default is float16, which adds ~1e-4).
        seed: picks the class, order and codes of the sequence.
        threads: llama.cpp and torch threads.
    """
    import llama_cpp
    import numpy as np
    import torch
    from litgpt.model import GPT

    from rar_llm.checkpoint import load_checkpoint
    from rar_llm.serve.export import export
    from rar_llm.permute import interleave

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(checkpoint) if checkpoint else random_checkpoint(tmp / "ckpt")
        config, layout, weights = load_checkpoint(checkpoint)
        model = GPT(config)
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        model.eval()
        rng = np.random.default_rng(seed)
        codes = rng.integers(0, layout.codebook_size, layout.num_positions)
        ids, _ = interleave(layout, int(rng.integers(layout.num_classes)), codes, rng.permutation(layout.num_positions))
        with torch.no_grad():
            ours = model(torch.from_numpy(ids)[None])[0].numpy()
        kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if kv_f32 else {}
        diffs = {}
        for dtype in dtypes or ["float32", "float16", "bfloat16"]:
            path = export(checkpoint, tmp / dtype, format="gguf", dtype=dtype)
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                n_threads=threads, verbose=False, **kv,
            )
            llm.eval(ids.tolist())
            theirs = np.asarray(llm.scores[: len(ids)])
            diffs[dtype] = float(np.abs(theirs - ours).max())
            print(f"{dtype:>9}: max abs logit diff {diffs[dtype]:.3g} (logits up to {np.abs(ours).max():.3g})")
            llm.close()
    return diffs


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(gguf_check, as_positional=False)
