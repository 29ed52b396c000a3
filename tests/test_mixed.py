"""The mixed text + image data module: sample forms, masks, clock, and a litgpt finetune_full run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from litgpt.finetune import full
from litgpt.tokenizer import Tokenizer

from rar_llm.checkpoint import init
from rar_llm.data.mixed import MixedData, pack
from rar_llm.permute import IGNORE_INDEX
from rar_llm.data.corpora import pydoc_topics, read_documents
from rar_llm.text.base import load_text_tokenizer
from rar_llm.vocab import VocabLayout

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "mixed_digits.yaml"
LAYOUT = VocabLayout.load("digits_pydoc")


@pytest.fixture(scope="session")
def topics(tmp_path_factory):
    return pydoc_topics(tmp_path_factory.mktemp("text") / "pydoc_topics.jsonl")


@pytest.fixture(scope="session")
def mixed_checkpoint(tmp_path_factory):
    return init(tmp_path_factory.mktemp("ckpt") / "rar-tiny-mixed", model="rar-tiny", layout="digits_pydoc")


def module(digits_dir, topics, checkpoint, batch_size=16, **kw):
    kw = {"text_files": [topics], "caption_template": "a handwritten {}", "total_samples": 10_000,
          "text_length": 128} | kw
    data = MixedData(layout="digits_pydoc", data_dir=digits_dir, **kw)
    data.connect(Tokenizer(checkpoint), batch_size=batch_size)
    data.setup()
    return data


def caption_ids(name):
    return load_text_tokenizer(LAYOUT.text_tokenizer).encode(f"a handwritten {name}")


def test_a_mixed_batch_masks_exactly_the_position_tokens_and_padding(digits_dir, topics, mixed_checkpoint):
    data = module(digits_dir, topics, mixed_checkpoint, batch_size=64)
    batch = next(iter(data.train_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = batch["token_counts"]["raw_plus_prompt_template"].squeeze(1)
    pad = torch.arange(ids.shape[1]) >= lengths[:, None]
    pos = (ids >= LAYOUT.pos_offset) & (ids < LAYOUT.boi)
    assert torch.equal(labels, torch.where(pos | pad, IGNORE_INDEX, ids))
    assert pad.any() and pos.any() and (ids[pad] == 0).all()
    is_text = (ids.lt(LAYOUT.code_offset) | pad).all(1)
    assert 0.3 < is_text.float().mean() < 0.7  # text_share 0.5
    assert (batch["token_counts"]["raw"].squeeze(1) == (labels != IGNORE_INDEX).sum(1)).all()


def test_image_sample_forms(digits_dir, topics, mixed_checkpoint):
    """Captioned, dropped and class forms, each image once per epoch; litgpt's plain index is the longest form."""
    data = module(digits_dir, topics, mixed_checkpoint, caption_share=0.5, class_dropout=0.3)
    ds = data.train_dataset
    image_slots = [i for i in range(len(ds)) if not ds._slot(i)[0]]
    assert sorted(ds._slot(i)[1] for i in image_slots) == list(range(len(ds.shards)))
    i = image_slots[0]
    label = int(ds.shards.labels[0])
    caption = caption_ids(LAYOUT.class_names[label]) + [LAYOUT.boi]
    forms = {}
    for draw in range(200):
        ids = ds[(i, 0, draw)]["input_ids"].tolist()
        assert ids[-1] == LAYOUT.eoi and len(ids) in (130, 130 + len(caption) - 1)
        if ids[: len(caption)] == caption:
            forms["captioned"] = True
        elif ids[0] == LAYOUT.boi:
            forms["dropped"] = True
        else:
            forms["class" if ids[0] == LAYOUT.class_token(label) else "null"] = True
            assert ids[0] in (LAYOUT.class_token(label), LAYOUT.null_class)
        body = ids[-129:-1]
        assert sorted(body[0::2]) == list(range(LAYOUT.pos_offset, LAYOUT.boi))  # every cell once
    assert forms.keys() == {"captioned", "dropped", "class", "null"}
    assert ds[i]["input_ids"].tolist()[: len(caption)] == caption  # the plain index: captioned, raster
    assert ds[i]["input_ids"].tolist()[len(caption)] == LAYOUT.pos_offset

    late = ds[(i, 10_000, 7)]["input_ids"].tolist()  # after the anneal: raster order
    assert late[-129:-1][0::2] == list(range(LAYOUT.pos_offset, LAYOUT.boi))

    # no captions: every image in RAR's class form
    plain = module(digits_dir, topics, mixed_checkpoint, captions=None).train_dataset
    assert all(plain[(i, 0, d)]["input_ids"][0] >= LAYOUT.class_offset for d in range(20))


def test_text_chunks_are_the_packed_documents(digits_dir, topics, mixed_checkpoint):
    data = module(digits_dir, topics, mixed_checkpoint, text_share=1.0)
    train, val = data.train_dataset, data.test_dataset
    base = load_text_tokenizer(LAYOUT.text_tokenizer)
    stream = pack([base.encode(d) for d in read_documents([topics])], base.eos_id)
    chunks = [ds[i]["input_ids"] for ds in (train, val) for i in range(len(ds))]
    assert torch.equal(torch.cat(chunks), torch.from_numpy(stream))
    assert len(train) == train.n_text and all(len(c) == 128 for c in chunks[:-1])
    assert (stream == base.eos_id).sum() == 79  # one per help topic

    # few text slots per epoch: the next epoch moves on to other chunks
    ds = module(digits_dir, topics, mixed_checkpoint, text_share=0.1).train_dataset
    text = [i for i in range(len(ds)) if ds._slot(i)[0]]
    first, second = ({tuple(ds[(i, 0, e * len(ds) + i)]["input_ids"].tolist()) for i in text} for e in (0, 1))
    assert len(first) == len(second) == len(text) and not first & second


def test_caption_file_and_clear_errors(digits_dir, topics, mixed_checkpoint, tmp_path, tiny_checkpoint):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"split": "train", "index": 0, "caption": "a very round digit"}) + "\n")
    ds = module(digits_dir, topics, mixed_checkpoint, captions=str(captions), caption_template="{}").train_dataset
    assert ds.captions[0][0] == "a very round digit" and ds.captions[1] is None
    assert ds.data[0]["instruction"] == "a very round digit<boi>"

    with pytest.raises(ValueError, match="text_share=0.5 needs text"):
        MixedData(data_dir=digits_dir)
    with pytest.raises(ValueError, match="does not match the data|checkpoint's vocabulary"):
        module(digits_dir, topics, tiny_checkpoint)  # an image-only checkpoint
    d = tmp_path / "nonames"
    shutil.copytree(digits_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(meta | {"class_names": None}))
    with pytest.raises(ValueError, match="no class_names to caption with"):
        module(d, topics, mixed_checkpoint)
    (d / "meta.json").write_text(json.dumps(meta | {"codebook_size": 18}))
    with pytest.raises(ValueError, match=r"codebook_size \(18 vs 17\)"):
        module(d, topics, mixed_checkpoint)


def test_recipe_parses_and_trains_with_litgpt_finetune_full(tmp_path, digits_dir, topics, mixed_checkpoint):
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(full.setup)
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(RECIPE)]))
    assert isinstance(cfg.data, MixedData)
    assert cfg.data.total_samples == cfg.train.max_steps * cfg.train.global_batch_size

    shutil.copytree(digits_dir, tmp_path / "data" / "digits")
    shutil.copy(topics, tmp_path / "data" / "pydoc_topics.jsonl")
    shutil.copytree(mixed_checkpoint, tmp_path / "checkpoints" / "rar-tiny-mixed")
    short = ["--train.max_steps", "6", "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
             "--data.init_args.total_samples", "48", "--train.save_interval", "6", "--eval.interval", "6",
             "--eval.max_iters", "2", "--train.log_interval", "1", "--train.lr_warmup_steps", "2"]
    out = subprocess.run([sys.executable, "-m", "litgpt", "finetune_full", "--config", str(RECIPE)] + short,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "loss train:" in line]
    losses = [float(line.split("loss train: ")[1].split(",")[0]) for line in lines]
    assert len(losses) == 6 and np.isfinite(losses).all()
    final = tmp_path / "out" / "rar-tiny-mixed" / "final"
    assert VocabLayout.from_checkpoint(final) == LAYOUT and Tokenizer(final).encode("a handwritten seven").tolist() \
        == caption_ids("seven")
