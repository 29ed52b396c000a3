"""The recipes parse with litgpt's own scripts, and the models they name have RAR's sizes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from litgpt.finetune import full, lora
from litgpt.model import GPT

from rar_llm.configs import RAR_PARAMS
from rar_llm.data.rar import RARData
from rar_llm.checkpoint import model_config
from rar_llm.vocab import VocabLayout

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def parse(script, recipe):
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(script.setup)
    return parser.instantiate_classes(parser.parse_args(["--config", str(recipe)]))


@pytest.mark.parametrize("size", ["b", "l", "xl", "xxl"])
def test_rar_recipes_parse_and_build_at_rar_size(size):
    recipe = RECIPES / f"rar_{size}.yaml"
    for script in (full, lora):  # `litgpt finetune_full` and `litgpt finetune` (LoRA) read the same file
        cfg = parse(script, recipe)
        assert isinstance(cfg.data, RARData) and cfg.data.total_samples == 250_000 * 2048
        assert cfg.train.global_batch_size == 2048 and cfg.train.max_steps == 250_000
        assert cfg.train.lr_warmup_steps == 62_500 and cfg.precision == "bf16-mixed"
        assert cfg.optimizer["class_path"] == "rar_llm.optim.RARAdamW"  # RAR's clipping and decay groups
        assert cfg.optimizer["init_args"] == {"lr": 4e-4, "betas": [0.9, 0.96], "weight_decay": 0.03, "max_norm": 1.0}
    name = Path(cfg.checkpoint_dir).name
    with torch.device("meta"):
        model = GPT(model_config(name, VocabLayout.load("maskgit_imagenet")))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / RAR_PARAMS[name] - 1) < 0.05, f"{name}: {n / 1e6:.1f}M parameters"
    blocks = {(b.config.n_layer, b.config.n_embd, b.config.n_head) for b in [model.transformer.h[0]]}
    assert blocks == {{"rar-b": (24, 768, 16), "rar-l": (24, 1024, 16), "rar-xl": (32, 1280, 16),
                       "rar-xxl": (40, 1408, 16)}[name]}


def run(cmd, cwd):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def losses(log):
    return [float(line.split("loss train: ")[1].split(",")[0]) for line in log.splitlines() if "loss train:" in line]


def test_tiny_recipe_trains_with_litgpt_finetune_full_and_lora(tmp_path, digits_dir):
    """The exact user commands, on the digits: the loss falls well below its start."""
    import shutil

    shutil.copytree(digits_dir, tmp_path / "data" / "digits")
    run([sys.executable, "-m", "rar_llm", "init", "--out_dir", "checkpoints/rar-tiny-digits"], tmp_path)
    litgpt = [sys.executable, "-m", "litgpt"]
    short = ["--train.max_steps", "40", "--train.global_batch_size", "32", "--train.micro_batch_size", "32",
             "--data.init_args.total_samples", "1280", "--train.save_interval", "20", "--eval.interval", "20",
             "--eval.max_iters", "2"]
    log = run(litgpt + ["finetune_full", "--config", str(RECIPES / "rar_tiny.yaml")] + short, tmp_path)
    loss = losses(log)
    assert loss[0] > 2.5 and loss[-1] < 0.75 * loss[0], loss
    final = tmp_path / "out" / "rar-tiny-digits" / "final"
    assert VocabLayout.from_checkpoint(final) == VocabLayout.load("digits")  # the layout travels with it

    # --resume continues from the last saved step (and replays the data clock) to 40
    log = run(litgpt + ["finetune_full", "--config", str(RECIPES / "rar_tiny.yaml"), "--resume", "true"] + short
              + ["--out_dir", "out/rar-tiny-digits"], tmp_path)
    assert "Resuming training from" in log and "step-000040" in log

    # LoRA over the trained checkpoint: `litgpt finetune` with the same recipe
    log = run(litgpt + ["finetune", str(final), "--config", str(RECIPES / "rar_tiny.yaml"), "--out_dir", "out/lora"]
              + short, tmp_path)
    assert "Number of trainable parameters" in log and (tmp_path / "out" / "lora" / "final" / "lit_model.pth").is_file()
