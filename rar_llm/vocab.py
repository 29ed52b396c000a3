"""Where image codes, classes, target positions and image delimiters live in an LLM vocabulary.

Ids are laid out after an optional base text vocabulary, in this order:
``[text ids][codes][classes][null class][positions][<boi>, <eoi>][unused padding]``.
The layout is small and serialisable (JSON), so a checkpoint folder carries the exact mapping it was
trained with and every later tool (data, generation, export) can check it before it trusts an id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

LAYOUT_KEY = "rar_layout"  # the layout rides in tokenizer_config.json, which litgpt copies into every checkpoint
# named layouts: adapters/ at the repository root in a checkout, rar_llm/adapters inside an installed wheel
_HERE = Path(__file__).resolve().parent
ADAPTERS_DIR = _HERE / "adapters" if (_HERE / "adapters").is_dir() else _HERE.parent / "adapters"
_NAME = re.compile(r"<(img|class|pos|unused)_(\d+)>")


@dataclass(frozen=True)
class VocabLayout:
    """Token-id layout of an image (or image + text) vocabulary.

    codebook_size: number of VQ codes (or pixel levels) of the image tokenizer.
    height, width: the code grid; one position token per cell.
    num_classes: class-conditioning tokens; one more token is the null class used for guidance.
    text_vocab_size: ids ``[0, text_vocab_size)`` belong to a base text tokenizer (0: image only).
    text_tokenizer: how to rebuild that base tokenizer (see ``rar_llm.text.base``); informational here.
    pad_multiple: the model's embedding is padded to a multiple of this (fast matmuls on GPUs).
    class_names: optional human names of the classes (captions, grids, prompts).
    """

    codebook_size: int
    height: int
    width: int
    num_classes: int
    text_vocab_size: int = 0
    text_tokenizer: str | None = None
    pad_multiple: int = 64
    class_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "height", "width", "num_classes", "pad_multiple", "text_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"VocabLayout.{name} must be an integer, got {value!r}")
        for name in ("codebook_size", "height", "width", "num_classes", "pad_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VocabLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_vocab_size < 0:
            raise ValueError(f"VocabLayout.text_vocab_size must be >= 0, got {self.text_vocab_size}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"VocabLayout has {self.num_classes} classes but {len(self.class_names)} class names"
                )

    # ---- offsets: the id blocks in order, each starting where the one before ends -------------------
    num_positions = property(lambda self: self.height * self.width, doc="Cells of the grid (position tokens).")
    code_offset = property(lambda self: self.text_vocab_size, doc="Id of code 0.")
    class_offset = property(lambda self: self.code_offset + self.codebook_size, doc="Id of class 0.")
    null_class = property(lambda self: self.class_offset + self.num_classes, doc="Id of the null (unconditional) class.")
    pos_offset = property(lambda self: self.null_class + 1, doc="Id of the position token of cell 0 (raster index).")
    boi = property(lambda self: self.pos_offset + self.num_positions, doc="Id of ``<boi>`` (begin of image).")
    eoi = property(lambda self: self.boi + 1, doc="Id of ``<eoi>`` (end of image).")

    @property
    def vocab_size(self) -> int:
        """Ids with a meaning (the model's ``vocab_size``)."""
        return self.eoi + 1

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the model's embedding and output head."""
        m = self.pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def seq_len(self) -> int:
        """Tokens of one class-conditioned image sequence: ``[class, pos, code] * H*W``."""
        return 1 + 2 * self.num_positions

    # ---- mapping ---------------------------------------------------------------------------------
    def class_token(self, class_id: int | None) -> int:
        """Token of a class id; ``None`` is the null (unconditional) class."""
        if class_id is None:
            return self.null_class
        class_id = int(class_id)
        if not 0 <= class_id < self.num_classes:
            raise ValueError(
                f"class id {class_id} is outside this layout's classes 0..{self.num_classes - 1}; "
                "pass a class of the data the model was trained on (or None for the null class)"
            )
        return self.class_offset + class_id

    def class_tokens(self, class_ids) -> torch.Tensor:
        ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        bad = (ids < 0) | (ids >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"class ids {ids[bad].unique().tolist()[:10]} are outside this layout's classes "
                f"0..{self.num_classes - 1}; pass classes of the data the model was trained on"
            )
        return ids + self.class_offset

    def check_codes(self, codes, where: str = "") -> None:
        """Raise if any code lies outside the codebook."""
        arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            bad = arr[(arr < 0) | (arr >= self.codebook_size)]
            raise ValueError(
                f"{where + ': ' if where else ''}code {int(bad.flat[0])} is outside the codebook 0..{self.codebook_size - 1}; "
                "the data was tokenized with a different tokenizer than this layout describes "
                "(check codebook_size in the data's meta.json and the layout)"
            )

    def token_name(self, token_id: int) -> str:
        i = int(token_id)
        if i < 0 or i >= self.padded_vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary 0..{self.padded_vocab_size - 1}")
        if i < self.code_offset:
            return f"<text_{i}>"
        if i < self.class_offset:
            return f"<img_{i - self.code_offset}>"
        if i < self.null_class:
            return f"<class_{i - self.class_offset}>"
        if i == self.null_class:
            return "<class_null>"
        if i < self.boi:
            return f"<pos_{i - self.pos_offset}>"
        if i == self.boi:
            return "<boi>"
        if i == self.eoi:
            return "<eoi>"
        return f"<unused_{i - self.vocab_size}>"

    # ---- files -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        return d

    def save(self, path: Path | str) -> None:
        """Write the layout as a JSON file (``adapters/*.json``)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "layout") -> VocabLayout:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{source}: unknown layout keys {sorted(unknown)}; expected some of {sorted(known)}")
        missing = {"codebook_size", "height", "width", "num_classes"} - set(d)
        if missing:
            raise ValueError(f"{source}: layout is missing {sorted(missing)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed layout ({e})") from None

    @classmethod
    def from_meta(cls, meta: dict, text_vocab_size: int = 0) -> VocabLayout:
        """The layout of a data folder's ``meta.json`` (``rar_llm.data.shards.read_meta``, which checked it)."""
        return cls(meta["codebook_size"], meta["height"], meta["width"], meta["num_classes"],
                   text_vocab_size=text_vocab_size)

    @classmethod
    def load(cls, path_or_name: Path | str) -> VocabLayout:
        """Load a layout from a name in ``adapters/``, a JSON file, or a checkpoint folder.

        A ``str`` without a path separator that does not end in ``.json`` is a name and only a name
        (``"digits"``), so a folder of that name in the working directory never shadows it; anything
        else (a ``Path``, ``"./digits"``, ``"ckpt/final"``, ``"mine.json"``) is a path.
        """
        names = sorted(p.stem for p in ADAPTERS_DIR.glob("*.json")) if ADAPTERS_DIR.is_dir() else []
        if is_layout_name(path_or_name):
            path = ADAPTERS_DIR / f"{path_or_name}.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"no named layout {path_or_name!r}; the named layouts are {names} (a file or folder in the working "
                    f"directory is given as a path: ./{path_or_name})"
                )
        else:
            path = Path(path_or_name)
            if path.is_dir():
                return cls.from_checkpoint(path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"no vocabulary layout at {str(path_or_name)!r}: give a layout JSON file, a checkpoint folder, "
                    f"or one of the named layouts {names}"
                )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); re-create it with VocabLayout.save") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a layout file holds a JSON object, not {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | str) -> VocabLayout:
        """The layout a checkpoint folder was made with (``tokenizer_config.json``'s ``rar_layout``)."""
        path = Path(checkpoint_dir) / "tokenizer_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {checkpoint_dir} is not an rar_llm checkpoint folder; create one with `rar-llm init`"
            )
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); re-create the folder with `rar-llm init`") from None
        d = config.get(LAYOUT_KEY) if isinstance(config, dict) else None
        if d is None:
            raise ValueError(
                f"{path} has no {LAYOUT_KEY!r} entry, so the image vocabulary is unknown; pass the layout "
                "explicitly (layout=...) or re-create the folder with `rar-llm init`"
            )
        if not isinstance(d, dict):
            raise ValueError(f"{path}: {LAYOUT_KEY!r} must be a JSON object, not {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    # ---- checks against tokenizers, models and data ------------------------------------------------
    @classmethod
    def infer_from_tokenizer(cls, tokenizer) -> dict:
        """What a tokenizer's names say about its layout: offsets and counts (no grid shape).

        Accepts a ``tokenizers.Tokenizer`` or a litgpt ``Tokenizer`` (its ``processor``).
        """
        proc = getattr(tokenizer, "processor", tokenizer)
        if not hasattr(proc, "get_vocab"):
            raise ValueError("the checkpoint's tokenizer is not a Hugging Face tokenizer.json; re-run `rar-llm init`")
        counts: dict[str, list[int]] = {"img": [], "class": [], "pos": []}
        for name, i in proc.get_vocab(with_added_tokens=True).items():
            m = _NAME.fullmatch(name)
            if m and m.group(1) in counts:
                counts[m.group(1)].append(i)
        if not counts["img"]:
            raise ValueError("the checkpoint's tokenizer has no <img_k> tokens: it is not an rar_llm vocabulary")
        return {
            "code_offset": min(counts["img"]),
            "codebook_size": len(counts["img"]),
            "num_classes": len(counts["class"]),
            "num_positions": len(counts["pos"]),
        }

    def check_tokenizer(self, tokenizer, where: str) -> None:
        """Raise if a checkpoint's tokenizer names a different layout than this one."""
        found = self.infer_from_tokenizer(tokenizer)
        want = {
            "code_offset": self.code_offset,
            "codebook_size": self.codebook_size,
            "num_classes": self.num_classes,
            "num_positions": self.num_positions,
        }
        diff = {k: (found[k], want[k]) for k in want if found[k] != want[k]}
        if diff:
            pretty = ", ".join(f"{k}: checkpoint {a} vs data {b}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{where}: the checkpoint's vocabulary does not match the data ({pretty}); "
                "create the checkpoint with `rar-llm init --layout` for this data's codebook, grid and classes"
            )

    def check_model(self, config, where: str = "model") -> None:
        """Raise if a litgpt ``Config`` cannot hold this layout's ids."""
        if config.padded_vocab_size < self.vocab_size or config.vocab_size != self.vocab_size:
            raise ValueError(
                f"{where}: model vocabulary (vocab_size {config.vocab_size}, padded {config.padded_vocab_size}) "
                f"does not match the layout (vocab_size {self.vocab_size}, padded {self.padded_vocab_size}); "
                "use the layout the checkpoint was created with (its rar_layout.json)"
            )


    def check_meta(self, meta: dict, where: str) -> None:
        """Raise unless a data folder's ``meta.json`` describes this layout's codebook, grid and classes."""
        keys = ("codebook_size", "height", "width", "num_classes")
        diff = [f"{k} ({meta.get(k)} vs {getattr(self, k)})" for k in keys if meta.get(k) != getattr(self, k)]
        if diff:
            raise ValueError(
                f"{where}: the layout does not describe the data ({', '.join(diff)}: data vs layout); "
                "use the layout the data was made for, or the data the model was trained on"
            )


def is_layout_name(path_or_name: Path | str) -> bool:
    """A ``str`` with no path separator and no ``.json`` suffix names a packaged layout."""
    if not isinstance(path_or_name, str):
        return False
    return not ("/" in path_or_name or os.sep in path_or_name or path_or_name.endswith(".json") or path_or_name in (".", ".."))
