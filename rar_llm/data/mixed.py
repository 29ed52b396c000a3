"""litgpt data module mixing packed text with (optionally captioned) RAR image sequences.

Sample forms (ids as in ``rar_llm.vocab``; ``pos, code`` pairs in RAR's annealed order)::

    text       [t_1, ..., t_L]                                      documents packed, eos between them
    captioned  [caption ids..., <boi>, pos, code, ..., pos, code, <eoi>]
    dropped    [<boi>, pos, code, ..., <eoi>]                       a captioned sample without its caption
    class      [class or null class, pos, code, ..., <eoi>]         RAR's form (``rar_llm.data.rar``) plus <eoi>

The class token does not stay in captioned samples: the caption is the condition, so a prompt
generates from exactly ``[prompt, <boi>]`` and guidance's unconditional branch is ``[<boi>]``, the
dropped form (``rar_llm.generate_from_prompt``). ``caption_share`` of the image samples are
captioned and the rest keep RAR's class form, so class-id generation (``rar_llm.generate``) works
on the same model; either condition is dropped with probability ``class_dropout``. Labels are the
ids except the position tokens, which are given, never predicted; padding is -100 too.

The annealing clock is ``rar_llm.data.rar.ClockSampler``'s: each drawn ``(index, samples_seen, draw)``
fixes the sample's progress, order, dropout and caption choice, so ``--resume`` replays it exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from litgpt.data.base import get_sft_collate_fn
from litgpt.prompts import PromptStyle  # noqa: F401  (jsonargparse resolves the inherited fields' annotations here)
from torch.utils.data import DataLoader, Dataset

from rar_llm.data.rar import ClockedData, ClockSampler, Prompts
from rar_llm.permute import IGNORE_INDEX, Permutation, interleave
from rar_llm.data.shards import META, Shards, read_meta
from rar_llm.data.corpora import read_documents
from rar_llm.text.base import TextBase
from rar_llm.text.merged import layout_base
from rar_llm.vocab import VocabLayout

Caption = tuple[str, np.ndarray]  # text and its base-tokenizer ids


def pack(docs: list[list[int]], eos_id: int | None) -> np.ndarray:
    """One token stream of all documents, each followed by ``eos_id`` (when the base has one)."""
    tail = [eos_id] if eos_id is not None else []
    return np.fromiter((t for d in docs for t in (*d, *tail)), dtype=np.int64)


def image_labels(layout: VocabLayout, ids: np.ndarray) -> np.ndarray:
    """Labels of a sequence: its ids, with position tokens ignored."""
    return np.where((ids >= layout.pos_offset) & (ids < layout.boi), IGNORE_INDEX, ids)


def slots(n_images: int, n_text: int, text_share: float) -> int:
    """Length of a split in which a ``text_share`` of the slots are text and every image has one
    (text-only: one slot per text chunk)."""
    if text_share == 1.0:
        return n_text
    return math.ceil(n_images / (1.0 - text_share))


class MixedDataset(Dataset):
    """Text chunks and image samples of one split, interleaved so a ``text_share`` of slots are text.

    A plain integer index (litgpt's start-up pass, validation) gives the raster order, the true
    class and the caption whenever the image has one, the longest form, so litgpt sizes the model
    for every sample; a ``(index, samples_seen, draw)`` triple gives the annealed, dropped, drawn form.
    """

    def __init__(
        self,
        layout: VocabLayout,
        shards: Shards,
        captions: list[Caption | None],
        text: np.ndarray,
        text_length: int,
        text_share: float,
        caption_share: float,
        permutation: Permutation,
        total_samples: int,
        text_prompt: str,
    ) -> None:
        self.layout, self.shards, self.captions = layout, shards, captions
        self.n_images = len(shards) if text_share < 1.0 else 0
        self.text, self.text_length = text, text_length
        self.n_text = math.ceil(len(text) / text_length) if text_share > 0.0 else 0
        if text_share > 0.0 and self.n_text == 0:
            raise ValueError("text_share > 0 but the text files hold no tokens; give text files or set text_share: 0")
        self.text_share, self.caption_share = text_share, caption_share
        self.permutation, self.total_samples = permutation, total_samples
        self.text_prompt = text_prompt
        self.length = slots(self.n_images, self.n_text, text_share)
        self.text_slots = math.floor(self.length * text_share)
        self.data = Prompts(self)

    def __len__(self) -> int:
        return self.length

    def instruction(self, i: int) -> str:
        """A prompt for litgpt's eval hook: an image's caption and ``<boi>``, or its class and first position."""
        if not self.n_images:
            return self.text_prompt
        index = i % self.n_images
        caption, layout = self.captions[index], self.layout
        if caption is not None:
            return caption[0] + layout.token_name(layout.boi)
        return layout.token_name(layout.class_token(self.shards.labels[index])) + layout.token_name(layout.pos_offset)

    def _slot(self, i: int) -> tuple[bool, int]:
        """Whether slot ``i`` is text, and its number among the text or the image slots."""
        before, after = math.floor(i * self.text_share), math.floor((i + 1) * self.text_share)
        return after > before, before if after > before else i - before

    def _text(self, j: int) -> np.ndarray:
        start = (j % self.n_text) * self.text_length
        return np.asarray(self.text[start : start + self.text_length])

    def _image(self, k: int, progress: float | None, draw: int | None) -> np.ndarray:
        codes, cls = self.shards[k]
        caption = self.captions[k]
        if draw is None:
            ids, _ = interleave(self.layout, cls, codes)
            captioned = caption is not None
        else:
            ids, _ = self.permutation(self.layout, cls, codes, progress, draw)
            rng = np.random.default_rng([self.permutation.seed, int(draw), 1])  # apart from the order's stream
            captioned = caption is not None and rng.random() < self.caption_share
        if not captioned:
            return np.concatenate((ids, [self.layout.eoi]))
        dropped = ids[0] == self.layout.null_class
        head = [self.layout.boi] if dropped else np.concatenate((caption[1], [self.layout.boi]))
        return np.concatenate((head, ids[1:], [self.layout.eoi]))

    def __getitem__(self, item) -> dict:
        clocked = isinstance(item, (tuple, list))
        i, seen, draw = item if clocked else (item, None, None)
        is_text, j = self._slot(int(i))
        if is_text:
            epoch = int(draw) // self.length if clocked else 0  # later epochs move on to unseen chunks
            ids = self._text(j + epoch * self.text_slots)
            labels = ids.copy()
        else:
            k = j % self.n_images
            progress = min(1.0, seen / self.total_samples) if clocked else None
            try:
                ids = self._image(k, progress, draw)
            except ValueError as e:
                raise ValueError(f"{self.shards.data_dir} {self.shards.split} sample {k}: {e}") from None
            labels = image_labels(self.layout, ids)
        ids = torch.as_tensor(ids, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        raw = int((labels != IGNORE_INDEX).sum())
        return {"input_ids": ids, "labels": labels, "token_counts": {"raw": raw, "raw_plus_prompt_template": len(ids)}}


@dataclass
class MixedData(ClockedData):
    """Text documents and image shards in one litgpt ``finetune_full`` / ``finetune`` run.

    Args:
        layout: the vocabulary layout with a text base (JSON file or ``adapters/`` name), the one the
            checkpoint was made with (``rar-llm init --layout``).
        text_files: plain-text (one document each) or ``.jsonl`` files (``text_key`` of each line).
        text_key: the JSON field holding a document's text.
        text_share: share of training samples that are text chunks (0: image-only, 1: text-only).
        text_length: tokens per text chunk; default ``train.max_seq_length`` when set, else an image
            sequence's length, so mixed batches pad little.
        val_text_fraction: share of the text chunks (the last ones) held out for validation.
        captions: ``class_names`` (the class names in the data's ``meta.json``), a JSON-lines file of
            ``{"split": ..., "index": ..., "caption": ...}`` (images it lacks keep the class form), or
            None for no captions.
        caption_template: how a caption is written, ``{}`` being the class name or file caption.
        caption_share: share of captioned images trained with their caption; the rest use the class form.
        num_workers: DataLoader workers.

    The data folder, the run's length (for the annealing clock) and RAR's schedule are ``ClockedData``'s;
    ``class_dropout`` drops either condition (class or caption).
    """

    layout: str = "digits_pydoc"
    text_files: list[Path] = field(default_factory=list)
    text_key: str = "text"
    text_share: float = 0.5
    text_length: int | None = None
    val_text_fraction: float = 0.05
    captions: str | None = "class_names"
    caption_template: str = "{}"
    caption_share: float = 0.5
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.text_files = [Path(p) for p in self.text_files]
        for name in ("text_share", "caption_share", "val_text_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MixedData.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.text_share > 0.0 and not self.text_files:
            raise ValueError(
                f"text_share={self.text_share} needs text: set data.init_args.text_files (or text_share: 0)"
            )
        if "{}" not in self.caption_template:
            raise ValueError(f"caption_template {self.caption_template!r} needs a '{{}}' where the caption goes")

    def vocab(self) -> tuple[VocabLayout, TextBase]:
        """The layout, checked against the image data and the checkpoint's tokenizer, and its text base."""
        layout = VocabLayout.load(self.layout)
        layout.check_meta(read_meta(self.data_dir), where=f"{self.data_dir / META} and layout {self.layout!r}")
        base = layout_base(layout)
        if self.tokenizer is not None:
            layout.check_tokenizer(self.tokenizer, where=f"layout {self.layout!r}")
            probe = "Mixed text, 12 images: héllo!"
            if self.tokenizer.processor.encode(probe, add_special_tokens=False).ids != base.encode(probe):
                raise ValueError(
                    f"the checkpoint's tokenizer encodes text differently from {layout.text_tokenizer!r}; "
                    f"create the checkpoint with `rar-llm init --layout {self.layout}`"
                )
        return layout, base

    def _captions(self, layout: VocabLayout, base: TextBase, shards: Shards) -> list[Caption | None]:
        """Each image's caption (text and ids), or None where it has none."""
        if self.captions is None:
            return [None] * len(shards)
        if self.captions == "class_names":
            names = shards.meta.get("class_names")
            if not names:
                raise ValueError(
                    f"{self.data_dir / META} has no class_names to caption with; add them there, give a caption "
                    "file (data.init_args.captions), or set captions: null"
                )
            per_class = [self._caption(base, n) for n in names]
            return [per_class[c] for c in shards.labels]
        path = Path(self.captions)
        if not path.is_file():
            raise FileNotFoundError(f"caption file {path} not found; give 'class_names', a .jsonl file, or null")
        out: list[Caption | None] = [None] * len(shards)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    split, index, caption = row["split"], int(row["index"]), str(row["caption"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"split\", \"index\", \"caption\"}} ({e})") from None
                if split != shards.split:
                    continue
                if not 0 <= index < len(shards):
                    raise ValueError(f"{path}:{n}: index {index} outside the {len(shards)} {split!r} images")
                out[index] = self._caption(base, caption)
        return out

    def _caption(self, base: TextBase, text: str) -> Caption:
        text = self.caption_template.format(text)
        return text, np.asarray(base.encode(text), dtype=np.int64)

    def setup(self, stage: str = "") -> None:
        layout, base = self.vocab()
        train, val = Shards(self.data_dir, self.train_split), Shards(self.data_dir, self.val_split)
        captions = {s.split: self._captions(layout, base, s) for s in (train, val)}
        longest = 2 + 2 * layout.num_positions + max((len(c[1]) for c in captions[train.split] if c), default=0)
        if 0 < self.max_seq_length < longest:
            raise ValueError(
                f"train.max_seq_length={self.max_seq_length} would cut captioned image sequences of {longest} tokens; "
                "unset it, raise it, or shorten the captions"
            )
        length = self.text_length or (self.max_seq_length if self.max_seq_length > 0 else layout.seq_len + 1)
        stream = pack([base.encode(d) for d in read_documents(self.text_files, self.text_key)], base.eos_id)
        chunks = math.ceil(len(stream) / length)
        cut = (chunks - math.ceil(self.val_text_fraction * chunks)) * length  # val: the last chunks
        text_train, text_val = stream[:cut], stream[cut:]
        if self.text_share > 0 and (len(text_train) == 0 or len(text_val) == 0):
            raise ValueError(
                f"{len(stream)} text tokens make too few chunks of {length} for train and val; add text, lower "
                "text_length, or change val_text_fraction"
            )
        total = self.run_length(slots(len(train), math.ceil(len(text_train) / length), self.text_share))
        common = {
            "layout": layout,
            "text_length": length,
            "text_share": self.text_share,
            "caption_share": self.caption_share,
            "permutation": self.permutation,
            "total_samples": total,
            "text_prompt": base.decode(stream[:8].tolist()),
        }
        self.train_dataset = MixedDataset(shards=train, captions=captions[train.split], text=text_train, **common)
        self.test_dataset = MixedDataset(shards=val, captions=captions[val.split], text=text_val, **common)

    def _loader(self, dataset: MixedDataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(pad_id=0, ignore_index=IGNORE_INDEX),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, ClockSampler(self.train_dataset, self.batch_size, seed=self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)
