"""A layout's whole vocabulary as one tokenizer: the base text ids, then every image id by name, and the
tokenizer files a checkpoint folder carries (``tokenizer.json``, and ``tokenizer_config.json`` with the layout)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from rar_llm.text.base import TextBase, append_tokens, load_text_tokenizer
from rar_llm.vocab import LAYOUT_KEY, VocabLayout


def layout_base(layout: VocabLayout) -> TextBase:
    """A text layout's base tokenizer, checked to fit the layout's text ids.

    A base may name fewer ids than ``text_vocab_size``: a pretrained model's embedding is often padded
    beyond its tokenizer (``rar-llm extend`` keeps those rows), and the base never produces those ids.
    """
    base = load_text_tokenizer(layout.text_tokenizer)
    if base.size > layout.text_vocab_size:
        raise ValueError(
            f"{layout.text_tokenizer!r} has {base.size} ids but the layout says text_vocab_size="
            f"{layout.text_vocab_size}; set text_vocab_size to {base.size}"
        )
    return base


def merged_hf_tokenizer(layout: VocabLayout) -> Tokenizer:
    """The checkpoint tokenizer of a text layout: the base, then every other id's name as an added token.

    Ids the base does not name below ``text_vocab_size`` (its model's padding) are ``<text_i>``
    special tokens; image ids get their names (``<img_3>``, ``<class_0>``, ``<pos_5>``, ``<boi>``, ...).
    """
    base = layout_base(layout)
    tok = base.hf()
    gap = [AddedToken(layout.token_name(i), special=True, normalized=False)
           for i in range(base.size, layout.code_offset)]
    names = [layout.token_name(i) for i in range(layout.code_offset, layout.padded_vocab_size)]
    append_tokens(tok, gap + [AddedToken(n, special=False, normalized=False) for n in names])
    return tok


def text_layout(base_spec: str, image_layout: VocabLayout | str | Path) -> VocabLayout:
    """An image layout moved on top of a base text vocabulary (save it into ``adapters/``)."""
    image = image_layout if isinstance(image_layout, VocabLayout) else VocabLayout.load(image_layout)
    base = load_text_tokenizer(base_spec)
    d = image.to_dict() | {"text_vocab_size": base.size, "text_tokenizer": base_spec}
    return VocabLayout.from_dict(d)


def encode_prompt(layout: VocabLayout, prompt: str | Sequence[int]) -> list[int]:
    """Base-tokenizer ids of a prompt (a string, or ids checked to lie in the text range)."""
    if layout.text_vocab_size == 0:
        raise ValueError("this layout has no text vocabulary; generate from class ids with rar_llm.generate")
    ids = layout_base(layout).encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    bad = [i for i in ids if not 0 <= i < layout.text_vocab_size]
    if bad:
        raise ValueError(
            f"prompt id {bad[0]} is outside the text ids 0..{layout.text_vocab_size - 1}; a prompt is text "
            "(or ids of the base tokenizer), image and class ids are added by generation"
        )
    return ids


def checkpoint_tokenizer(layout: VocabLayout) -> Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` naming every id of the padded vocabulary.

    Image-only layouts get a word-level model whose every token is also an added token, so
    ``"<class_3><pos_0>"`` encodes to two ids with no spaces needed; text layouts get the base
    tokenizer with the image names appended (``merged_hf_tokenizer``).
    """
    if layout.text_vocab_size:
        return merged_hf_tokenizer(layout)
    names = [layout.token_name(i) for i in range(layout.padded_vocab_size)]
    tok = Tokenizer(WordLevel({n: i for i, n in enumerate(names)}, unk_token=names[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(n, normalized=False, special=False) for n in names])
    return tok


def write_tokenizer(layout: VocabLayout, out_dir: Path | str) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` as litgpt and transformers read them.

    ``tokenizer_config.json`` carries the layout (``rar_layout``); litgpt copies it into every
    checkpoint it saves. Returns the files written.
    """
    out_dir = Path(out_dir)
    checkpoint_tokenizer(layout).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<boi>",
        "eos_token": "<eoi>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": layout.seq_len,
        LAYOUT_KEY: layout.to_dict(),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
