import json

import lightning as L
import numpy as np
import pytest
import torch
from litgpt.tokenizer import Tokenizer
from litgpt.utils import CycleIterator

from rar_llm.data.rar import ClockSampler, RARData
from rar_llm.checkpoint import init
from rar_llm.data.shards import ShardWriter, Shards

TOTAL = 1438 * 4  # digits train split, 4 epochs


def module(digits_dir, checkpoint, batch_size=32, **kw):
    kw.setdefault("num_workers", 0)
    data = RARData(data_dir=digits_dir, total_samples=TOTAL, **kw)
    data.connect(Tokenizer(checkpoint), batch_size=batch_size)
    data.setup()
    return data


def clocks(loader, n):
    """(samples_seen, draw) of every sample of the first n batches, as the sampler produced them."""
    out = []
    it = iter(loader)
    for _ in range(n):
        out.append(next(it))
    return out


# ---- shards ---------------------------------------------------------------------------------------


def test_shards_round_trip_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    codes, labels = rng.integers(0, 1024, (50, 4, 4)), rng.integers(0, 7, 50)
    with ShardWriter(tmp_path / "d", 1024, 4, 4, 7, shard_size=16) as w:
        w.add("train", codes[:30], labels[:30])
        w.add("train", codes[30:], labels[30:])
    s = Shards(tmp_path / "d", "train")
    assert len(s) == 50 and len(s.codes) == 4
    for i in range(50):
        c, y = s[i]
        assert (c == codes[i]).all() and y == labels[i]
    with pytest.raises(FileExistsError, match="already holds data"):
        ShardWriter(tmp_path / "d", 1024, 4, 4, 7)


def test_resumed_writer_appends_after_finished_shards(tmp_path):
    rng = np.random.default_rng(0)
    codes, labels = rng.integers(0, 9, (40, 2, 2)), rng.integers(0, 3, 40)
    w = ShardWriter(tmp_path / "d", 9, 2, 2, 3, shard_size=8)
    w.add("train", codes[:21], labels[:21])  # 2 shards written, 5 samples lost with the "crash"
    w2 = ShardWriter(tmp_path / "d", 9, 2, 2, 3, shard_size=8, resume=True)
    done = w2.num_samples("train")
    assert done == 16
    w2.add("train", codes[done:], labels[done:])
    w2.close()
    s = Shards(tmp_path / "d", "train")
    assert (np.stack([s[i][0] for i in range(40)]) == codes).all()
    with pytest.raises(ValueError, match="cannot resume, codebook_size"):
        ShardWriter(tmp_path / "d", 10, 2, 2, 3, resume=True)


def test_truncated_and_mismatched_shards_name_the_file(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    f = d / "train-00000.codes.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-00000.codes.npy is truncated or corrupt"):
        Shards(d, "train")

    shutil.rmtree(d)
    shutil.copytree(digits_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["train"][0]["num_samples"] += 1
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train-00000.codes.npy: shape \(1438, 8, 8\) disagrees with meta.json"):
        Shards(d, "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        Shards(digits_dir, "test")


def test_labels_outside_the_classes_fail_at_open(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    lab = np.load(d / "val-00000.labels.npy")
    lab[5] = 12
    np.save(d / "val-00000.labels.npy", lab)
    with pytest.raises(ValueError, match=r"val-00000.labels.npy: class id 12 outside 0..9"):
        Shards(d, "val")


def test_codes_outside_the_codebook_name_file_sample_and_value(tmp_path, digits_dir, tiny_checkpoint):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(digits_dir, d)
    codes = np.load(d / "train-00000.codes.npy")
    codes[7, 0, 0] = 40
    np.save(d / "train-00000.codes.npy", codes)
    data = module(d, tiny_checkpoint)
    with pytest.raises(ValueError, match=r"train sample 7: code 40 is outside the codebook 0..16"):
        data.train_dataset[(7, 0, 0)]


# ---- the data module ------------------------------------------------------------------------------


def test_batches_are_what_finetune_full_expects(digits_dir, tiny_checkpoint):
    data = module(digits_dir, tiny_checkpoint, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 129)
    assert batch["token_counts"]["raw"].tolist() == [64] * 4
    assert batch["token_counts"]["raw_plus_prompt_template"].tolist() == [129] * 4
    # litgpt's start-up pass and eval hook
    assert len(data.train_dataset[0]["input_ids"]) == 129
    instruction = data.test_dataset.data[0]["instruction"]
    assert data.prompt_style.apply(instruction) == instruction
    assert Tokenizer(tiny_checkpoint).encode(instruction).tolist()[1] == data.train_dataset.layout.pos_offset
    # validation is raster order with the true class
    val = data.test_dataset[3]["input_ids"]
    assert (val[1::2] - data.test_dataset.layout.pos_offset == torch.arange(64)).all()


def test_checkpoint_vocabulary_must_match_the_data(tmp_path, digits_dir):
    ckpt = init(tmp_path / "imagenet", model="rar-tiny", layout="maskgit_imagenet")
    data = RARData(data_dir=digits_dir, total_samples=10)
    data.connect(Tokenizer(ckpt), batch_size=2)
    with pytest.raises(ValueError, match=r"meta.json: the checkpoint's vocabulary does not match the data \(.*codebook_size: checkpoint 1024 vs data 17"):
        data.setup()


def test_run_length_is_required(digits_dir, tiny_checkpoint):
    data = RARData(data_dir=digits_dir)
    data.connect(Tokenizer(tiny_checkpoint))
    with pytest.raises(ValueError, match="total_samples"):
        data.setup()


def test_clock_counts_samples_consumed_across_epochs():
    data = list(range(10))
    s = ClockSampler(data, batch_size=4, shuffle=True, seed=1)
    epoch0, epoch1 = list(s), list(s)  # each pass advances the epoch by itself
    assert [c for _, c, _ in epoch0] == [0] * 4 + [4] * 4 + [8] * 2
    assert [c for _, c, _ in epoch1] == [10] * 4 + [14] * 4 + [18] * 2
    assert [d for _, _, d in epoch0 + epoch1] == list(range(20))
    assert sorted(i for i, _, _ in epoch0) == data and [i for i, *_ in epoch0] != [i for i, *_ in epoch1]
    s.set_epoch(1)  # what Fabric does before each pass agrees with the self-advancing epoch
    assert list(s) == epoch1


def test_annealing_reaches_the_dataset(digits_dir, tiny_checkpoint):
    """At progress 0 every order is random; at the end of the run every order is raster."""
    data = module(digits_dir, tiny_checkpoint)
    pos = data.train_dataset.layout.pos_offset
    early = data.train_dataset[(0, 0, 0)]["input_ids"]
    late = data.train_dataset[(0, TOTAL - 32, 0)]["input_ids"]
    assert (early[1::2] - pos != torch.arange(64)).any()
    assert (late[1::2] - pos == torch.arange(64)).all()


def test_workers_give_the_same_batches(digits_dir, tiny_checkpoint):
    b0 = clocks(module(digits_dir, tiny_checkpoint, num_workers=0).train_dataloader(), 3)
    b2 = clocks(module(digits_dir, tiny_checkpoint, num_workers=2).train_dataloader(), 3)
    for a, b in zip(b0, b2):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_clock_continues_after_resume(digits_dir, tiny_checkpoint):
    """litgpt's --resume replays the data loader through the finished iterations; the clock follows."""
    fabric = L.Fabric(accelerator="cpu", devices=1)

    def loader():
        return fabric.setup_dataloaders(module(digits_dir, tiny_checkpoint).train_dataloader())

    run = CycleIterator(loader())
    first = [next(run) for _ in range(60)]  # 45 batches per epoch: crosses an epoch boundary
    resumed = CycleIterator(loader())
    for _ in range(50):  # what litgpt's fit() does on resume
        next(resumed)
    for a in first[50:]:
        b = next(resumed)
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert resumed.epoch == 1


def _rank_clocks(fabric, digits_dir, checkpoint, out):
    data = module(digits_dir, checkpoint, batch_size=8)
    loader = fabric.setup_dataloaders(data.train_dataloader())
    assert isinstance(loader.sampler, ClockSampler)  # Fabric keeps it: it is a DistributedSampler
    seen = [(s, d) for _, s, d in list(loader.sampler)[:40]]
    torch.save(seen, out / f"rank{fabric.global_rank}.pt")


def test_identical_clocks_on_two_ranks(tmp_path, digits_dir, tiny_checkpoint):
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_rank_clocks, digits_dir, tiny_checkpoint, tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [s for s, _ in r0] == [s for s, _ in r1] == [16 * (k // 8) for k in range(40)]
    draws = [d for _, d in r0 + r1]
    assert len(set(draws)) == 80 and sorted(draws) == list(range(80))
