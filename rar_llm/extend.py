"""``rar-llm extend``: give a pretrained litgpt language model an image vocabulary, keeping what it knows.

The new checkpoint folder is the base model with the layout's image ids appended after the base's
*padded* vocabulary: ``[base text ids 0..V-1][base padding rows V..P-1][codes][classes][null class]
[positions][<boi>, <eoi>][padding]``, so every base row keeps its id and its weights. Only the token
embedding and the output head (and its bias, if any) grow; every other weight is copied unchanged, so
on text the logits of the base's ids are exactly the base's. The new rows start from the mean of the
base's text rows plus small noise (Hewitt 2021, "Initializing new word embeddings"): each new id then
gets about the average text logit, so the text distribution barely moves (the mass it takes is
``bench/extend_digits.py``'s ``image_id_mass``). Tied embeddings (head == embedding) stay tied.

Tokenizer files: ``tokenizer.json`` is the base's tokenizer (its post-processor kept) with the base's
unnamed padding ids named ``<text_i>`` and every image id named, so litgpt's ``Tokenizer``
(``litgpt generate`` / ``chat`` / ``finetune``) encodes text as it does in the base folder;
``tokenizer_config.json`` is the base's plus the layout (``rar_layout``) and the BOS rule litgpt
applied to the base; ``generation_config.json`` and ``prompt_style.yaml`` are copied. The base
tokenizer itself is copied beside them (``base_tokenizer.json`` or ``tokenizer.model``) and the
layout's ``text_tokenizer`` names that copy, which is what rar_llm encodes training text and prompts with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from litgpt.config import Config
from litgpt.utils import save_config
from tokenizers import AddedToken, Tokenizer

from rar_llm.checkpoint import CONFIG, WEIGHTS, check_weights, read_config, read_weights
from rar_llm.outputs import check_outputs, staged_files
from rar_llm.text.base import append_tokens, load_text_tokenizer, sentencepiece_to_hf
from rar_llm.vocab import LAYOUT_KEY, VocabLayout

HF_BASE = "base_tokenizer.json"  # the base's tokenizer.json, as the layout's text_tokenizer
SP_BASE = "tokenizer.model"  # the base's SentencePiece model (litgpt copies it into its outputs too)
COPIED = ("generation_config.json", "prompt_style.yaml")
# files of a litgpt / Hugging Face folder that describe the base's vocabulary or training, not the new model
NOT_CARRIED = {
    "config.json": "a Hugging Face config of the base's vocabulary; `rar-llm export` writes one for the new model",
    "hyperparameters.yaml": "the base's training record",
    "special_tokens_map.json": "its tokens are in tokenizer_config.json and tokenizer.json",
    "vocab.json": "tokenizer.json has the vocabulary",
    "merges.txt": "tokenizer.json has the merges",
    "added_tokens.json": "tokenizer.json has the added tokens",
}
PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, emoji 🎉🚀, Ελληνικά, русский",
    "def f(x):\n    return x ** 2  # code\n",
    "numbers 1234567890 3.14159 -42 1e-9",
)


def _base_files(base_dir: Path) -> tuple[Path, str]:
    """The base tokenizer file litgpt reads (``tokenizer.json`` first, as litgpt does) and its scheme."""
    if (base_dir / "tokenizer.json").is_file():
        return base_dir / "tokenizer.json", "hf"
    if (base_dir / "tokenizer.model").is_file():
        return base_dir / "tokenizer.model", "sentencepiece"
    raise FileNotFoundError(
        f"{base_dir} has neither tokenizer.json nor tokenizer.model; extend needs the base's tokenizer "
        "(a `litgpt download` folder has one)"
    )


def _image_layout(layout: str | Path | VocabLayout) -> VocabLayout:
    image = layout if isinstance(layout, VocabLayout) else VocabLayout.load(layout)
    if image.text_vocab_size:
        raise ValueError(
            f"layout {layout!r} already has a text vocabulary ({image.text_tokenizer}, {image.text_vocab_size} ids); "
            "give an image-only layout (digits, maskgit_imagenet, llamagen_vq16_imagenet, or a JSON file): "
            "the base's tokenizer becomes its text vocabulary"
        )
    return image


def extended_config(config: Config, layout: VocabLayout) -> Config:
    """The base config with the extended vocabulary and a context that holds an image sequence."""
    return Config(**(asdict(config) | {
        "vocab_size": layout.vocab_size,
        "padded_vocab_size": layout.padded_vocab_size,
        "block_size": max(config.block_size, layout.seq_len + 2),  # captioned sequences need a few more
    }))


def extend_weights(
    state: dict[str, torch.Tensor], config: Config, layout: VocabLayout, noise: float = 0.01, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The base's state dict with rows for the layout's ids appended to the embedding and the head.

    New rows are the mean of the base's text rows (ids below ``config.vocab_size``) plus Gaussian noise
    of ``noise`` times the per-dimension spread of those rows; a tied head gets the same rows.
    """
    old, new = config.padded_vocab_size, layout.padded_vocab_size
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    wte, head = state["transformer.wte.weight"], state["lm_head.weight"]
    tied = wte.shape == head.shape and bool(torch.equal(wte, head))

    def grow(w: torch.Tensor) -> torch.Tensor:
        rows = w[: config.vocab_size].float()
        eps = torch.randn((new - old, *w.shape[1:]), generator=g)
        added = rows.mean(0) + noise * rows.std(0) * eps if w.dim() > 1 else rows.mean().expand(new - old)
        return torch.cat([w, added.to(w.dtype)])

    out["transformer.wte.weight"] = grow(wte)
    out["lm_head.weight"] = out["transformer.wte.weight"].clone() if tied else grow(head)
    if "lm_head.bias" in state:
        out["lm_head.bias"] = grow(state["lm_head.bias"])
    return out


def _merged_tokenizer(path: Path, scheme: str, text_ids: int, layout: VocabLayout) -> Tokenizer:
    """The base tokenizer (post-processor kept) naming ids ``text_ids..P-1`` ``<text_i>`` and every image id."""
    tok = Tokenizer.from_file(str(path)) if scheme == "hf" else sentencepiece_to_hf(path)
    gap = [AddedToken(layout.token_name(i), special=True, normalized=False) for i in range(text_ids, layout.code_offset)]
    names = [AddedToken(layout.token_name(i), special=False, normalized=False)
             for i in range(layout.code_offset, layout.padded_vocab_size)]
    append_tokens(tok, gap + names)
    return tok


def _read_tokenizer_config(base_dir: Path) -> dict:
    """The base's ``tokenizer_config.json`` ({} if it has none), refused if it already carries a layout."""
    path = base_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove it (litgpt reads it too)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, not {type(config).__name__}")
    if LAYOUT_KEY in config:
        raise ValueError(
            f"{path} already carries an image layout ({LAYOUT_KEY}): {base_dir} is an rar_llm checkpoint; "
            "extend a text-only litgpt checkpoint"
        )
    return config


def _tokenizer_config(config: dict, lit, merged: Tokenizer, layout: VocabLayout) -> dict:
    """The base's tokenizer config plus the layout, with litgpt's BOS rule and special tokens made explicit."""
    config = dict(config)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # litgpt's Tokenizer requires the key
    # litgpt decides BOS partly from the folder's name (Llama 3, SmolLM2-Instruct): pin what it did for the base
    config["add_bos_token"] = bool(lit.use_bos)
    for key, i in (("bos_token", lit.bos_id), ("eos_token", lit.eos_id)):
        if config.get(key) is None and i is not None and merged.id_to_token(int(i)) is not None:
            config[key] = merged.id_to_token(int(i))
    config[LAYOUT_KEY] = layout.to_dict()
    return config


def _check_text(base, out_dir: Path, layout: VocabLayout, scheme: str, base_tok: Path) -> None:
    """Raise if the new folder's tokenizers encode any probe text differently from the base's.

    The probes include the base's special tokens written in text for a ``tokenizer.json`` base (a
    SentencePiece model reads such text as plain characters, so those are left out there).
    """
    from litgpt.tokenizer import Tokenizer as LitTokenizer

    new = LitTokenizer(out_dir)
    text_base = load_text_tokenizer(layout.text_tokenizer)
    probes = list(PROBES)
    if scheme == "hf":
        added = Tokenizer.from_file(str(base_tok)).get_added_tokens_decoder().values()
        probes.append("".join(f"{t.content} x " for t in list(added)[:32]))
    for p in probes:
        a, b = base.encode(p).tolist(), new.encode(p).tolist()
        if a != b:
            raise RuntimeError(f"the extended tokenizer encodes {p!r} as {b[:12]}..., the base as {a[:12]}...")
        ids = new.processor.encode(p, add_special_tokens=False).ids
        if text_base.encode(p) != ids:
            raise RuntimeError(f"{layout.text_tokenizer} encodes {p!r} differently from {out_dir / 'tokenizer.json'}")
    if (base.bos_id, base.eos_id, base.use_bos) != (new.bos_id, new.eos_id, new.use_bos):
        raise RuntimeError(f"litgpt reads BOS/EOS of {out_dir} as {(new.bos_id, new.eos_id, new.use_bos)}, "
                           f"the base's as {(base.bos_id, base.eos_id, base.use_bos)}")


def extend(
    checkpoint_dir: Path,
    layout: str,
    out_dir: Path,
    noise: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Add an image layout's ids to a pretrained litgpt checkpoint (any model family), keeping its text.

    Args:
        checkpoint_dir: a litgpt checkpoint folder (``litgpt download``, or a training run's ``final/``)
            with lit_model.pth, model_config.yaml and tokenizer.json or tokenizer.model.
        layout: an image-only vocabulary layout: a name in ``adapters/`` (digits, maskgit_imagenet, ...)
            or a JSON file. Its ids go after the base's padded vocabulary.
        out_dir: the new checkpoint folder; must be empty (or new).
        noise: new embedding / head rows are the mean of the base's rows plus this much noise (times
            the rows' per-dimension standard deviation).
        seed: seed of that noise.
        overwrite: write into a non-empty folder, replacing only the files this command writes.
    """
    base_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {base_dir} not found; give a litgpt checkpoint folder "
                                "(`litgpt download <repo>` writes one under checkpoints/)")
    if noise < 0:
        raise ValueError(f"noise={noise} must be >= 0")
    config = read_config(base_dir)
    tok_path, scheme = _base_files(base_dir)
    image = _image_layout(layout)
    copy_name = HF_BASE if scheme == "hf" else SP_BASE
    copied = [name for name in COPIED if (base_dir / name).is_file()]
    written = [WEIGHTS, CONFIG, "tokenizer.json", "tokenizer_config.json", copy_name, *copied]  # and nothing else
    check_outputs(out_dir, written, overwrite, source=base_dir)

    base_tok_config = _read_tokenizer_config(base_dir)
    try:
        from litgpt.tokenizer import Tokenizer as LitTokenizer

        lit = LitTokenizer(base_dir)
    except Exception as e:  # litgpt's own reader: a missing tokenizer_class, an unreadable file
        raise ValueError(f"litgpt cannot read the tokenizer of {base_dir} ({type(e).__name__}: {e}); "
                         "fix its tokenizer files first") from None
    state = read_weights(base_dir / WEIGHTS)
    check_weights(config, state, str(base_dir / WEIGHTS))
    text_ids = load_text_tokenizer(f"{scheme}:{tok_path.resolve()}").size
    if text_ids > config.padded_vocab_size:
        raise ValueError(
            f"{tok_path} names {text_ids} ids but {base_dir / CONFIG} gives the model {config.padded_vocab_size} "
            "embedding rows (padded_vocab_size); the tokenizer and the weights come from different models"
        )
    spec = f"{scheme}:{(out_dir / copy_name).resolve()}"  # absolute: rar_llm reads it from any working directory
    new_layout = VocabLayout.from_dict(image.to_dict() | {
        "text_vocab_size": config.padded_vocab_size,
        "text_tokenizer": spec,
        "pad_multiple": config.padding_multiple,
    })
    new_config = extended_config(config, new_layout)
    new_layout.check_model(new_config, where="extended config")

    merged = _merged_tokenizer(tok_path, scheme, text_ids, new_layout)
    tok_config = _tokenizer_config(base_tok_config, lit, merged, new_layout)
    weights = extend_weights(state, config, new_layout, noise=noise, seed=seed)
    check_weights(new_config, weights, "extended weights")
    with staged_files(out_dir, written) as stage:  # all or nothing: a failure leaves out_dir as it was
        shutil.copyfile(tok_path, stage / copy_name)
        torch.save(weights, stage / WEIGHTS)
        save_config(new_config, stage)
        merged.save(str(stage / "tokenizer.json"))
        (stage / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        for name in copied:
            shutil.copyfile(base_dir / name, stage / name)
    _check_text(lit, out_dir, new_layout, scheme, tok_path)

    _summary(base_dir, out_dir, config, image, new_layout, weights, text_ids, scheme, tok_path, copied)
    return out_dir


def _summary(base_dir: Path, out_dir: Path, config, image: VocabLayout, new_layout: VocabLayout, weights: dict,
             text_ids: int, scheme: str, tok_path: Path, copied: list[str]) -> None:
    """What ``extend`` added, and each base file it did not carry over with the reason."""
    used = {WEIGHTS, CONFIG, tok_path.name, "tokenizer_config.json", *copied}
    skipped = sorted(p.name for p in base_dir.iterdir() if p.is_file() and p.name not in used)
    tied = bool(torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"]))
    added = (new_layout.padded_vocab_size - config.padded_vocab_size) * config.n_embd * (1 if tied else 2)
    print(f"Extended {config.name} ({base_dir}) with {image.codebook_size} codes, {image.num_classes} classes, "
          f"{image.num_positions} positions: ids {config.padded_vocab_size}..{new_layout.vocab_size - 1} "
          f"(vocabulary {config.padded_vocab_size} -> {new_layout.padded_vocab_size}, +{added:,} "
          f"parameters{', embedding and head tied' if tied else ''}) in {out_dir}")
    if text_ids < config.padded_vocab_size:
        print(f"  the base's padding ids {text_ids}..{config.padded_vocab_size - 1} keep their rows, named <text_i>")
    for name in skipped:
        why = NOT_CARRIED.get(name, "not a litgpt checkpoint file extend knows")
        if name.endswith((".safetensors", ".bin", ".pth", ".gguf")) or name.endswith(".safetensors.index.json"):
            why = "weights in another format or of the old vocabulary; lit_model.pth is the model litgpt loads"
        if name == "tokenizer.model" and scheme == "hf":
            why = "tokenizer.json is the tokenizer litgpt reads when both are present"
        print(f"  not carried over: {name} ({why})")
