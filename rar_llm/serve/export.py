"""``rar-llm export``: a checkpoint folder as a Hugging Face Llama folder or a GGUF file, and back.

The model is a plain Llama, so serving stacks load it with no rar_llm code: the HF folder has
``config.json`` (LlamaForCausalLM), ``model.safetensors``, ``generation_config.json`` and a tokenizer
naming every id; the GGUF file is the ``llama`` architecture with a token list naming every id.
Weight names are converted by litgpt's own converters, so there is one key mapping, not two.
Both carry the vocabulary layout (``tokenizer_config.json``'s ``rar_layout``; GGUF key ``rar.layout``)
so rar_llm can check ids when it reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from litgpt.config import Config
from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
from litgpt.scripts.convert_lit_checkpoint import check_conversion_supported, copy_weights_llama
from litgpt.utils import save_config
from safetensors.torch import load_file, save_file

from rar_llm.checkpoint import DTYPES, check_weights, load_checkpoint
from rar_llm.outputs import claim_outputs
from rar_llm.text.merged import checkpoint_tokenizer, write_tokenizer
from rar_llm.vocab import VocabLayout

GGUF_LAYOUT_KEY = "rar.layout"

# litgpt Config fields that must hold these values for the model to be a transformers/llama.cpp Llama
_LLAMA_FIELDS = {
    "bias": False,
    "attn_bias": False,
    "lm_head_bias": False,
    "parallel_residual": False,
    "shared_attention_norm": False,
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "norm_1": True,
    "norm_2": True,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "rotary_percentage": 1.0,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "rope_interleave": False,
    "rope_indices": None,
    "scale_embeddings": False,
    "attention_scores_scalar": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "sliding_window_size": None,
    "latent_attention": None,
    "n_expert": 0,
}


def check_llama(config: Config) -> None:
    """Raise unless the litgpt config is exactly a Llama (what the exported formats can express)."""
    bad = {k: getattr(config, k) for k, v in _LLAMA_FIELDS.items() if getattr(config, k) != v}
    if "gemma" in config.name.lower():
        bad["name"] = config.name  # litgpt gives Gemma names RMSNorm with a unit offset
    if bad:
        want = {k: _LLAMA_FIELDS.get(k, "no 'gemma'") for k in bad}
        raise ValueError(
            f"model config {config.name!r} is not a plain Llama ({bad}; export needs {want}); "
            "export supports the rar_llm configs (rar-b ... rar-xxl, rar-tiny) and other Llama-style litgpt configs"
        )


def lit_to_hf(config: Config, lit_weights: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF Llama state dict from a litgpt one (litgpt's converter), as separate contiguous tensors."""
    hf: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, hf, lit_weights)
    # q/k/v are views of one qkv tensor; safetensors refuses shared storage, so every tensor is copied
    return {k: v.to(dtype or v.dtype, copy=True).contiguous() for k, v in hf.items()}


def hf_to_lit(config: Config, hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """litgpt state dict from an HF Llama one (litgpt's converter)."""
    lit: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, lit, hf_weights)
    return lit


def hf_config(config: Config, vocab: VocabLayout, dtype: torch.dtype) -> dict:
    """``config.json`` of ``LlamaForCausalLM``.

    Written as plain JSON (not through transformers) with both ``rope_theta`` (transformers 4, vLLM)
    and ``rope_parameters`` (transformers 5), so every reader gets the same rotary base.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": vocab.boi,
        "eos_token_id": vocab.eoi,
        "pad_token_id": vocab.eoi,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4 / vLLM
        "dtype": str(dtype).removeprefix("torch."),  # transformers 5
        "litgpt_name": config.name,  # so import_hf restores the litgpt config's name
    }


def generation_config(vocab: VocabLayout) -> dict:
    """``generation_config.json``: one image is ``2 * H * W`` new tokens after the class token.

    Plain ancestral sampling (temperature 1, no top-k) is the distribution the model was trained
    for; positions, code masks and guidance need ``rar_llm.sampling.hf.hf_generate``'s logits processors.
    """
    return {
        "bos_token_id": vocab.boi,
        "eos_token_id": vocab.eoi,
        "pad_token_id": vocab.eoi,
        "max_new_tokens": 2 * vocab.num_positions,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
    }


HF_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
GGUF_FILES = ("model.gguf",)
LIT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


def prepare_out_dir(out_dir: Path, owned: tuple[str, ...], overwrite: bool, source: Path) -> None:
    """``out_dir`` ready for ``owned``; other weight files there would be loaded beside ours, so they are refused."""
    if out_dir.is_dir():
        stray = sorted(p.name for p in out_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name not in owned)
        if stray:
            raise FileExistsError(
                f"{out_dir} holds other weight files {stray[:3]} that a loader would read beside the export; "
                "write to an empty folder"
            )
    claim_outputs(out_dir, owned, overwrite, source)


def export_hf(config: Config, vocab: VocabLayout, lit_weights: dict, out_dir: Path, dtype: torch.dtype | None) -> None:
    hf = lit_to_hf(config, lit_weights, dtype)
    save_file(hf, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = hf_config(config, vocab, next(iter(hf.values())).dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(vocab), indent=2) + "\n")
    write_tokenizer(vocab, out_dir)  # its tokenizer_config.json carries the layout


def rope_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from HF's rotate-half rotary pairs (i, i + d/2) to llama.cpp's (2i, 2i + 1).

    llama.cpp's ``llama`` architecture rotates adjacent pairs (it expects Meta's original layout), so
    each head's rows [a_0..a_{d/2-1}, b_0..b_{d/2-1}] become [a_0, b_0, a_1, b_1, ...].
    """
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_vocab(vocab: VocabLayout) -> tuple[list[str], list[int]]:
    """Token names and GGUF token types: every id is a named token, so llama.cpp can print any id."""
    import gguf

    tok = checkpoint_tokenizer(vocab)
    names = [tok.id_to_token(i) for i in range(vocab.padded_vocab_size)]
    types = []
    for i in range(vocab.padded_vocab_size):
        if i in (vocab.boi, vocab.eoi):
            types.append(gguf.TokenType.CONTROL)
        elif i >= vocab.vocab_size:
            types.append(gguf.TokenType.UNUSED)
        elif i < vocab.code_offset:
            types.append(gguf.TokenType.NORMAL)  # base text tokens
        else:
            types.append(gguf.TokenType.USER_DEFINED)  # matched whole in text: "<class_3><pos_0>" -> 2 ids
    return names, types


def export_gguf(config: Config, vocab: VocabLayout, lit_weights: dict, path: Path, dtype: torch.dtype | None) -> None:
    import gguf

    hf = lit_to_hf(config, lit_weights)
    dtype = dtype or next(iter(hf.values())).dtype
    qtype = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
             torch.bfloat16: gguf.GGMLQuantizationType.BF16}[dtype]
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(config.name)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_query_groups)
    w.add_key_length(config.head_size)
    w.add_value_length(config.head_size)
    w.add_rope_dimension_count(config.head_size)
    w.add_rope_freq_base(float(config.rope_base))
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.padded_vocab_size)
    w.add_file_type({gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
                     gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
                     gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16}[qtype])
    names, types = gguf_vocab(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(names)
    w.add_token_scores([0.0] * len(names))
    w.add_token_types(types)
    w.add_bos_token_id(vocab.boi)
    w.add_eos_token_id(vocab.eoi)
    w.add_unk_token_id(vocab.padded_vocab_size - 1)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_string(GGUF_LAYOUT_KEY, json.dumps(vocab.to_dict()))

    names_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    for name, t in hf.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_head if "q_proj" in name else config.n_query_groups
            t = rope_to_interleaved(t, heads)
        gguf_name, data = names_map.get_name(name, try_suffixes=(".weight",)), t.float().numpy()
        if t.dim() > 1 and qtype != gguf.GGMLQuantizationType.F32:  # norms stay F32, as llama.cpp's converter does
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export(
    checkpoint_dir: Path,
    out_dir: Path,
    format: Literal["hf", "gguf"] = "hf",
    dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    layout: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a litgpt checkpoint folder for serving stacks.

    Args:
        checkpoint_dir: a litgpt checkpoint folder (``rar-llm init`` or training output).
        out_dir: the folder to write; ``hf``: a Hugging Face model folder; ``gguf``: ``model.gguf`` in it.
        format: ``hf`` (transformers, vLLM, TGI) or ``gguf`` (llama.cpp and its bindings).
        dtype: weight dtype of the export; default: the checkpoint's.
        layout: vocabulary layout (JSON file or name in ``adapters/``) for a checkpoint whose
            ``tokenizer_config.json`` has no ``rar_layout``; default: the checkpoint's own.
        overwrite: replace the files an earlier run of this command wrote there (other files stay).

    Returns the HF folder or the GGUF file.
    """
    if format not in ("hf", "gguf"):
        raise ValueError(f"unknown export format {format!r}; use 'hf' or 'gguf'")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config, vocab, lit_weights = load_checkpoint(checkpoint_dir, layout)
    check_llama(config)
    check_conversion_supported(lit_weights)
    prepare_out_dir(out_dir, HF_FILES if format == "hf" else GGUF_FILES, overwrite, checkpoint_dir)
    torch_dtype = DTYPES[dtype] if dtype else None
    if format == "hf":
        export_hf(config, vocab, lit_weights, out_dir, torch_dtype)
        out = out_dir
    else:
        out = out_dir / "model.gguf"
        export_gguf(config, vocab, lit_weights, out, torch_dtype)
    print(f"Exported {config.name} ({format}) to {out}")
    return out


def hf_to_lit_config(hf: dict, vocab: VocabLayout, name: str) -> Config:
    """The litgpt config of an HF Llama ``config.json`` (the inverse of ``hf_config``)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; import_hf reads Llama folders only")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    base = rope["rope_theta"]
    return Config(
        name=hf.get("litgpt_name", name),
        block_size=hf["max_position_embeddings"],
        vocab_size=vocab.vocab_size,
        padded_vocab_size=hf["vocab_size"],
        padding_multiple=vocab.pad_multiple,
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf["rms_norm_eps"],
        rope_base=int(base) if float(base).is_integer() else base,
        **_LLAMA_FIELDS,
    )


def import_hf(hf_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Turn an exported Hugging Face folder back into a litgpt checkpoint folder (exact in any dtype).

    Args:
        hf_dir: a folder written by ``export`` (or any Llama folder whose tokenizer_config.json has rar_layout).
        out_dir: the checkpoint folder to create.
        overwrite: replace the files an earlier run of this command wrote there (other files stay).
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found: {hf_dir} is not a Hugging Face model folder")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}; re-export with `rar-llm export`")
    index = hf_dir / "model.safetensors.index.json"
    if len(files) > 1 and not index.is_file():
        raise ValueError(
            f"{hf_dir} holds {len(files)} .safetensors files ({', '.join(f.name for f in files[:3])}) and no "
            "model.safetensors.index.json saying which to read; remove the stray ones"
        )
    vocab = VocabLayout.from_checkpoint(hf_dir)
    try:
        hf_cfg = json.loads((hf_dir / "config.json").read_text())
        config = hf_to_lit_config(hf_cfg, vocab, hf_dir.name)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{hf_dir / 'config.json'}: not a Llama config.json ({type(e).__name__}: {e})") from None
    vocab.check_model(config, where=str(hf_dir))
    hf_weights = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:  # safetensors raises its own error type for truncated or foreign files
            raise ValueError(f"{f}: not a readable safetensors file ({e}); re-export the folder") from None
        dup = hf_weights.keys() & part.keys()
        if dup:
            raise ValueError(f"{f}: tensor {sorted(dup)[0]} is also in another file of {hf_dir}; remove the stray file")
        hf_weights.update(part)
    try:
        lit = hf_to_lit(config, hf_weights)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{hf_dir}: the tensors do not fit config.json ({type(e).__name__}: {e})") from None
    check_weights(config, lit, str(hf_dir))
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, LIT_FILES, overwrite, hf_dir)
    torch.save(lit, out_dir / "lit_model.pth")
    save_config(config, out_dir)
    write_tokenizer(vocab, out_dir)
    print(f"Imported {hf_dir} as litgpt checkpoint {config.name} in {out_dir}")
    return out_dir
