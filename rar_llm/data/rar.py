"""litgpt data module for RAR training over pre-tokenized shards.

litgpt never tells a data module how far training has got, so the annealing clock travels with the
indices: :class:`ClockSampler` (a ``DistributedSampler``, which Fabric keeps as it is and runs in the
main process even with DataLoader workers) yields ``(index, samples_seen, draw)`` triples. The
dataset turns ``samples_seen`` into training progress and ``draw`` into the sample's random stream.
litgpt's ``--resume`` replays the sampler through every finished batch, so the clock resumes too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from litgpt.data import DataModule
from litgpt.prompts import Default, PromptStyle
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rar_llm import configs  # noqa: F401  (registers the rar-* names with litgpt)
from rar_llm.permute import Permutation, interleave
from rar_llm.data.shards import META, Shards, read_meta
from rar_llm.vocab import VocabLayout


class ClockSampler(DistributedSampler):
    """Shuffled indices for one rank, each paired with the run's clock.

    ``samples_seen`` is the number of samples the whole run (all ranks) consumed before the
    micro-batch holding this index, so every sample of a step sees the same clock on every rank.
    ``draw`` numbers every sample the run ever draws, uniquely across ranks and epochs.
    Each ``__iter__`` advances the epoch by itself; Fabric's ``set_epoch`` calls agree with that.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        if dist.is_available() and dist.is_initialized():
            super().__init__(dataset, shuffle=shuffle, seed=seed)
        else:
            super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        indices += indices[: self.total_size - n]  # pad so every rank gets the same count
        mine = indices[self.rank : self.total_size : self.num_replicas]
        W, B = self.num_replicas, self.batch_size
        for k, index in enumerate(mine):
            seen = W * (epoch * self.num_samples + B * (k // B))
            draw = epoch * self.total_size + k * W + self.rank
            yield index, seen, draw


class Prompts:
    """What litgpt's eval hook reads: ``data[i]["instruction"]``, the dataset's ``instruction(i)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {"instruction": self.dataset.instruction(i)}


class RARDataset(Dataset):
    """Samples of one split as litgpt batches: ``input_ids``, ``labels``, ``token_counts``.

    A plain integer index (litgpt's start-up pass, validation) gives the raster order with the
    true class; a ``(index, samples_seen, draw)`` triple from :class:`ClockSampler` gives RAR's
    annealed order and class dropout at that point of training.
    """

    def __init__(
        self, shards: Shards, layout: VocabLayout, permutation: Permutation, total_samples: int
    ) -> None:
        self.shards = shards
        self.layout = layout
        self.permutation = permutation
        self.total_samples = total_samples
        self.data = Prompts(self)

    def __len__(self) -> int:
        return len(self.shards)

    def instruction(self, i: int) -> str:
        """A prompt for litgpt's eval hook: the class token and the first position."""
        layout = self.layout
        return layout.token_name(layout.class_token(self.shards.labels[i])) + layout.token_name(layout.pos_offset)

    def progress(self, samples_seen: int) -> float:
        return min(1.0, samples_seen / self.total_samples)

    def __getitem__(self, item) -> dict:
        if isinstance(item, (tuple, list)):
            index, seen, draw = item
            codes, cls = self.shards[index]
            where = f"{self.shards.data_dir} {self.shards.split} sample {index}"
            try:
                ids, labels = self.permutation(self.layout, cls, codes, self.progress(seen), draw)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            codes, cls = self.shards[item]
            try:
                ids, labels = interleave(self.layout, cls, codes)
            except ValueError as e:
                raise ValueError(f"{self.shards.data_dir} {self.shards.split} sample {item}: {e}") from None
        n = self.layout.num_positions
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "token_counts": {"raw": n, "raw_plus_prompt_template": len(ids)},
        }


@dataclass
class ClockedData(DataModule):
    """What RAR's data modules share: the data folder, the run's length, RAR's schedule, the loaders' knobs.

    Args:
        data_dir: a folder of shards (``meta.json`` + ``.npy``), see ``rar_llm.data.shards``.
        total_samples: samples the whole run consumes (all ranks), the 100 % mark of the annealing
            clock; usually ``train.max_steps * train.global_batch_size``.
        epochs: alternatively, the run's length in epochs of the train split (``train.epochs``).
        anneal_start, anneal_end, r_end: RAR's schedule of the random-order probability r.
        class_dropout: share of samples trained with the null class (for guidance).
        noise: reAR's noisy context, training only: share of input code tokens replaced by random
            codes while the labels keep the true ones (see ``rar_llm.permute.Permutation``); 0: off.
        seed: fixes every sample's order and dropout (with its draw number) and the shuffle.
        num_workers: DataLoader workers; the clock is computed in the main process either way.
        train_split, val_split: split names in ``meta.json``.
    """

    data_dir: Path = Path("data/digits")
    total_samples: int | None = None
    epochs: float | None = None
    anneal_start: float = 0.5
    anneal_end: float = 0.75
    r_end: float = 0.0
    class_dropout: float = 0.1
    noise: float = 0.0
    seed: int = 42
    num_workers: int = 2
    train_split: str = "train"
    val_split: str = "val"
    prompt_style: str | PromptStyle = "default"

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)
    train_dataset: Dataset | None = field(default=None, init=False, repr=False)
    test_dataset: Dataset | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        self.data_dir = Path(self.data_dir)
        if isinstance(self.prompt_style, str):  # litgpt registers no name for its identity style
            self.prompt_style = Default() if self.prompt_style == "default" else PromptStyle.from_name(self.prompt_style)
        # the transform's knobs are this module's fields of the same names (flat, so recipes set them directly)
        self.permutation = Permutation(**{f.name: getattr(self, f.name) for f in fields(Permutation)})

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length

    def run_length(self, epoch_samples: int) -> int:
        """Samples of the whole run, the annealing clock's 100 % mark (``total_samples`` or ``epochs``)."""
        name = type(self).__name__
        if self.total_samples is None and self.epochs is None:
            raise ValueError(
                f"{name} needs the run's length for its annealing clock: set data.init_args.total_samples "
                "(train.max_steps * train.global_batch_size) or data.init_args.epochs (train.epochs)"
            )
        total = self.total_samples if self.total_samples is not None else math.ceil(self.epochs * epoch_samples)
        if total < 1:
            raise ValueError(f"{name}: the run's length must be positive, got {total} samples")
        return total


@dataclass
class RARData(ClockedData):
    """Class-conditional RAR training data for ``litgpt finetune_full`` / ``finetune``.

    The arguments are ``ClockedData``'s: the data folder, the run's length and RAR's schedule.
    """

    def layout(self) -> VocabLayout:
        """The layout of the data, placed where the checkpoint's tokenizer puts image ids."""
        meta = read_meta(self.data_dir)
        if self.tokenizer is None:
            return VocabLayout.from_meta(meta)
        # litgpt hands the data module the checkpoint's tokenizer, not its folder, so the text ids below the
        # image ids are read off the tokenizer's names, and the whole layout is checked against it once
        layout = VocabLayout.from_meta(meta, VocabLayout.infer_from_tokenizer(self.tokenizer)["code_offset"])
        layout.check_tokenizer(self.tokenizer, where=f"{self.data_dir / META}")
        return layout

    def setup(self, stage: str = "") -> None:
        layout = self.layout()
        if 0 < self.max_seq_length < layout.seq_len:
            raise ValueError(
                f"train.max_seq_length={self.max_seq_length} would cut image sequences of {layout.seq_len} tokens; "
                "unset it or raise it"
            )
        train = Shards(self.data_dir, self.train_split)
        val = Shards(self.data_dir, self.val_split)
        total = self.run_length(len(train))
        self.train_dataset = RARDataset(train, layout, self.permutation, total)
        self.test_dataset = RARDataset(val, layout, self.permutation, total)

    def train_dataloader(self) -> DataLoader:
        sampler = ClockSampler(self.train_dataset, self.batch_size, shuffle=True, seed=self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
