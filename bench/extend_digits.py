"""Give a pretrained text model image generation (``rar-llm extend``) vs training the mix from scratch.

All on this machine, no download, every training run a ``litgpt finetune_full`` subprocess:

1. ``base``: a text-only rar-tiny-sized Llama (4 layers, width 128, the 1024-token pydoc BPE) trained
   with litgpt's own ``JSON`` data module on Python's help texts (``pydoc_data.topics``): the
   "pretrained LLM". Same text chunks as ``MixedData``'s training split; its held-out chunks are never seen.
2. ``rar-llm extend`` of that checkpoint with the digits layout (image ids after the base's 1024 text ids).
3. ``litgpt finetune_full`` of the extended folder with ``MixedData`` (captioned digits + the same texts) at
   a few ``text_share`` values, each run as long as it takes to see ``--images`` image samples (the
   from-scratch recipe ``recipes/mixed_digits.yaml`` sees 15,360: 960 steps of 32 at text share 0.5), and
   the from-scratch mixed recipe (``rar-llm init --layout digits_pydoc`` + the same data) at the same budget.

Scored on each final checkpoint: text validation loss (mean next-token cross-entropy, full softmax, on
``MixedData``'s held-out text chunks, never trained on), the probability mass the model puts on image
ids while reading that text, prompted class consistency ("a handwritten seven", 20 samples per digit,
guidance 1 and 3, by the evaluation classifier of ``rar_llm.eval.evaluate``), feature Frechet of those samples
against the held-out digits (200 samples, so compare with the 200-image floor printed last), and
class-id consistency and Frechet at guidance 3.

    python bench/extend_digits.py --runs '[base, extended]' --out ab.json       # base (~20 min busy) + extend
    python bench/extend_digits.py --runs '[extend-t0.5, extend-t0.25, extend-t0, scratch-t0.5]' --images 7680
    python bench/extend_digits.py --runs '[extend-t0.5, scratch-t0.5]' --images 15360   # the recipe's image budget
    python bench/extend_digits.py --runs '[lora-t0.5]' --images 7680              # LoRA instead of finetune_full
    python bench/extend_digits.py --merge '[bench/results/extend_digits/results.json]'   # reprint the table

Runs are cached in ``--work_dir`` (default /tmp/extdemo): a finished run is scored again, not retrained.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
TEXT_LENGTH, BATCH = 128, 32  # chunk tokens, batch
PROMPT = "a handwritten {}"
BASE_STEPS = 320  # text-only pretraining of the base: 10,240 chunks of 128 tokens (about 9 passes over the texts)
# run name: (start checkpoint, text_share)
RUNS = {
    "extend-t0.5": ("extended", 0.5),
    "extend-t0.25": ("extended", 0.25),
    "extend-t0": ("extended", 0.0),
    "scratch-t0.5": ("scratch", 0.5),
    "scratch-t0.25": ("scratch", 0.25),
    "lora-t0.5": ("lora", 0.5),  # `litgpt finetune` (LoRA) of the extended folder instead of finetune_full
}
LORA = ["--lora_r", "8", "--lora_key", "true", "--lora_projection", "true", "--lora_mlp", "true", "--lora_head", "true"]


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run a command with its output in ``log``; raise with the log's tail if it fails. Returns seconds."""
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.time() - t


def litgpt(config: dict, work: Path, name: str, script: str = "finetune_full", extra: list[str] = ()) -> float:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return run([sys.executable, "-m", "litgpt", script, "--config", str(path), *extra], work, work / f"{name}.log")


def text_stream(topics: Path):
    """The pydoc texts as ``MixedData`` packs them, and where its held-out chunks start."""
    from rar_llm.data.corpora import read_documents
    from rar_llm.data.mixed import pack
    from rar_llm.text.base import load_text_tokenizer

    base = load_text_tokenizer("hf:text/pydoc_bpe1024.json")
    stream = pack([base.encode(d) for d in read_documents([topics])], base.eos_id)
    chunks = math.ceil(len(stream) / TEXT_LENGTH)
    cut = (chunks - math.ceil(0.05 * chunks)) * TEXT_LENGTH  # MixedData's split (val_text_fraction 0.05)
    return base, stream, cut


def prepare(work: Path) -> dict:
    from rar_llm.data.corpora import pydoc_topics
    from rar_llm.data.digits import digits

    paths = {"digits": work / "data" / "digits", "topics": work / "data" / "pydoc_topics.jsonl",
             "chunks": work / "data" / "pydoc_train_chunks.json"}
    if not (paths["digits"] / "meta.json").is_file():
        digits(paths["digits"])
    if not paths["topics"].is_file():
        pydoc_topics(paths["topics"])
    if not paths["chunks"].is_file():
        base, stream, cut = text_stream(paths["topics"])
        rows = [{"instruction": "", "output": base.decode(stream[i : i + TEXT_LENGTH].tolist())}
                for i in range(0, cut, TEXT_LENGTH)]
        paths["chunks"].write_text(json.dumps(rows))
    return paths


def base_checkpoint(work: Path, paths: dict) -> Path:
    """A text-only litgpt checkpoint: random init, then BASE_STEPS of litgpt finetune_full on the texts."""
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import save_config

    from rar_llm.checkpoint import init_weights

    final = work / "out" / "base" / "final"
    if (final / "lit_model.pth").is_file():
        return final
    init = work / "checkpoints" / "pydoc-tiny"
    init.mkdir(parents=True, exist_ok=True)
    config = Config(name="pydoc-tiny", block_size=1024, vocab_size=1024, padded_vocab_size=1024, padding_multiple=64,
                    n_layer=4, n_embd=128, n_head=4, n_query_groups=4, intermediate_size=512, bias=False,
                    parallel_residual=False, norm_class_name="RMSNorm", norm_eps=1e-6, mlp_class_name="LLaMAMLP",
                    rotary_percentage=1.0, rope_base=10000)
    torch.manual_seed(0)
    model = GPT(config)
    init_weights(model)
    torch.save(model.state_dict(), init / "lit_model.pth")
    save_config(config, init)
    shutil.copy(ROOT / "adapters" / "text" / "pydoc_bpe1024.json", init / "tokenizer.json")
    (init / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "add_bos_token": False}))
    cfg = {
        "checkpoint_dir": str(init), "out_dir": str(work / "out" / "base"), "precision": "32-true", "devices": 1,
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": str(paths["chunks"]), "mask_prompt": False, "val_split_fraction": 0.05,
            "prompt_style": {"class_path": "litgpt.prompts.Default"}, "num_workers": 0}},
        "train": {"save_interval": BASE_STEPS, "log_interval": 20, "global_batch_size": BATCH,
                  "micro_batch_size": BATCH, "lr_warmup_steps": 30, "epochs": 1000, "max_steps": BASE_STEPS,
                  "max_seq_length": TEXT_LENGTH + 2},
        # no litgpt eval: its sample step cannot start from the empty instruction (scored here instead)
        "eval": {"interval": 10**6, "initial_validation": False, "final_validation": False},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": 0.002, "betas": [0.9, 0.96], "weight_decay": 0.03}},
        "logger_name": "csv", "seed": 1337,
    }
    print(f"base: {litgpt(cfg, work, 'base'):.0f} s", flush=True)
    return final


def mixed_config(start: Path, layout: str, out_dir: Path, paths: dict, text_share: float, images: int) -> dict:
    """``recipes/mixed_digits.yaml`` with another start, text share and a length for ``images`` image samples."""
    recipe = yaml.safe_load((ROOT / "recipes" / "mixed_digits.yaml").read_text())
    steps = round(images / (1.0 - text_share) / BATCH)
    recipe["checkpoint_dir"], recipe["out_dir"] = str(start), str(out_dir)
    recipe["data"]["init_args"] |= {"layout": layout, "data_dir": str(paths["digits"]),
                                    "text_files": [str(paths["topics"])], "text_share": text_share,
                                    "total_samples": steps * BATCH}
    recipe["train"] |= {"max_steps": steps, "save_interval": steps}
    recipe["eval"] |= {"interval": 10**6, "final_validation": False}  # scored here instead
    return recipe


@torch.inference_mode()
def text_scores(model, stream: np.ndarray, cut: int, text_vocab: int) -> dict:
    """Mean next-token loss on the held-out chunks (full softmax) and the mass on ids >= text_vocab."""
    chunks = [stream[i : i + TEXT_LENGTH] for i in range(cut, len(stream), TEXT_LENGTH)]
    losses, masses, n = 0.0, 0.0, 0
    for c in chunks:
        if len(c) < 2:
            continue
        x = torch.as_tensor(c, dtype=torch.long)[None]
        logits = model(x)[0, :-1].float()
        logp = logits.log_softmax(-1)
        losses += float(F.nll_loss(logp, x[0, 1:], reduction="sum"))
        masses += float(logp[:, text_vocab:].exp().sum())
        n += len(c) - 1
    return {"text_val_loss": losses / n, "image_id_mass": masses / n}


def image_scores(model, paths: dict, per_class: int = 20) -> dict:
    """Prompted (guidance 1 and 3) and class-id (guidance 3) samples, scored by rar_llm.eval.evaluate."""
    from rar_llm.eval.evaluate import evaluate
    from rar_llm.sampling.loop import generate, generate_from_prompt

    layout = model.layout
    out: dict = {}
    classes = np.repeat(np.arange(layout.num_classes), per_class)
    for g in (1.0, 3.0):
        codes = np.concatenate([
            generate_from_prompt(model, PROMPT.format(name), num_samples=per_class, guidance=g, seed=c).numpy()
            for c, name in enumerate(layout.class_names)])
        m = evaluate(codes, classes, paths["digits"], layout=layout)
        out[f"prompted_g{g:g}"] = {k: m[k] for k in ("consistency", "fd_features", "fd_pixels", "copies")}
        out["real"] = {k: m["real"][k] for k in ("consistency", "fd_features", "fd_pixels")}
    codes = generate(model, classes.tolist(), guidance=3.0, seed=0).numpy()
    m = evaluate(codes, classes, paths["digits"], layout=layout)
    out["class_g3"] = {k: m[k] for k in ("consistency", "fd_features", "fd_pixels", "copies")}
    return out


def score(ckpt: Path, paths: dict, images: bool = True) -> dict:
    from rar_llm.checkpoint import load_model

    _, stream, cut = text_stream(paths["topics"])
    if (ckpt / "tokenizer_config.json").is_file() and "rar_layout" in (ckpt / "tokenizer_config.json").read_text():
        model = load_model(ckpt, device="cpu", dtype=torch.float32)
        text_vocab = model.layout.text_vocab_size
    else:  # the text-only base
        from litgpt.config import Config
        from litgpt.model import GPT

        model = GPT(Config.from_file(ckpt / "model_config.yaml"))
        from rar_llm.checkpoint import read_weights

        model.load_state_dict(read_weights(ckpt / "lit_model.pth"))
        model.eval()
        text_vocab, images = model.config.padded_vocab_size, False
    out = text_scores(model, stream, cut, text_vocab)
    # the same on the first 60 training chunks: a low figure here and a high one above is overfitting, not forgetting
    out["text_train_loss"] = text_scores(model, stream[: 60 * TEXT_LENGTH], 0, text_vocab)["text_val_loss"]
    if images:
        out |= image_scores(model, paths)
    return out


def main(
    work_dir: Path = Path("/tmp/extdemo"),
    out: Path = Path("bench/results/extend_digits/results.json"),
    runs: list[str] | None = None,
    images: int = 15360,
    threads: int = 1,
    merge: list[Path] | None = None,
) -> None:
    """Train and score the runs (``base``, ``extended`` and RUNS); write ``out``; print the table.

    Args:
        work_dir: data, checkpoints and training outputs (reused: finished runs are not trained again).
        out: the result file (updated after every run).
        runs: ``base``, ``extended`` and names of RUNS (default: all).
        images: image samples each mixed run sees (the recipe's 960 steps at text share 0.5: 15,360);
            the run is named ``<run>@<images>`` in the result file.
        threads: torch threads here and in the litgpt subprocesses.
        merge: only print the table of these result files.
    """
    if merge:
        results = {}
        for path in merge:
            results |= json.loads(Path(path).read_text())["runs"]
        print(table(results))
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out)
    results = json.loads(out.read_text())["runs"] if out.is_file() else {}
    todo = runs or ["base", "extended", *RUNS]
    paths = prepare(work)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"batch": BATCH, "base_steps": BASE_STEPS,
                                   "runs": results}, indent=2) + "\n")

    extended = work / "checkpoints" / "extended"
    if "base" in todo or "extended" in todo or any(RUNS[r][0] != "scratch" for r in todo if r in RUNS):
        base = base_checkpoint(work, paths)
    if "base" in todo:
        results["base"] = {"steps": BASE_STEPS, "text_share": 1.0} | score(base, paths)
        save()
    if not (extended / "lit_model.pth").is_file() and "base" in locals():
        run([sys.executable, "-m", "rar_llm", "extend", "--checkpoint_dir", str(base), "--layout", "digits",
             "--out_dir", str(extended)], work, work / "extend.log")
    if "extended" in todo:
        results["extended"] = {"steps": 0, "text_share": None} | score(extended, paths)
        save()
    scratch = work / "checkpoints" / "scratch"
    for name in [r for r in todo if r in RUNS]:
        start, share = RUNS[name]
        if start == "scratch" and not (scratch / "lit_model.pth").is_file():
            run([sys.executable, "-m", "rar_llm", "init", "--out_dir", str(scratch), "--model", "rar-tiny",
                 "--layout", "digits_pydoc"], work, work / "init.log")
        ckpt = scratch if start == "scratch" else extended
        layout = "digits_pydoc" if start == "scratch" else str(extended)
        tag = f"{name}@{images}"
        cfg = mixed_config(ckpt, layout, work / "out" / tag, paths, share, images)
        final = work / "out" / tag / "final"
        seconds = None
        if not (final / "lit_model.pth").is_file():
            seconds = litgpt(cfg, work, tag, *(("finetune", LORA) if start == "lora" else ()))
        results[tag] = {"steps": cfg["train"]["max_steps"], "text_share": share, "images": images,
                        "train_seconds": seconds} \
            | score(final, paths)
        save()
        print(f"{tag}: done", flush=True)
    print(table(results))


def table(results: dict) -> str:
    cols = ["run", "image samples", "steps", "text val loss (train chunks)", "image-id mass on text", "prompted, guidance 1 / 3",
            "Frechet (features), prompted g3", "class id, guidance 3", "Frechet, class id g3"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]['consistency']:.1f}" if key in r else "-"

    def fd(r: dict, key: str) -> str:
        return f"{r[key]['fd_features']:.1f}" if key in r else "-"

    for name, r in results.items():
        prompted = f"{pct(r, 'prompted_g1')} / {pct(r, 'prompted_g3')} %" if "prompted_g1" in r else "-"
        cls = f"{pct(r, 'class_g3')} %" if "class_g3" in r else "-"
        lines.append(f"| {name} | {r.get('images') or ''} | {r.get('steps', '')} | {r['text_val_loss']:.3f} ({r.get('text_train_loss', float('nan')):.2f}) | "
                     f"{100 * r['image_id_mass']:.2f} % | {prompted} | {fd(r, 'prompted_g3')} | {cls} | "
                     f"{fd(r, 'class_g3')} |")
    real = next((r["real"] for r in results.values() if "real" in r), None)
    if real:
        lines.append(f"| real held-out digits | | | | | {100 * real['consistency']:.1f} % | "
                     f"{real['fd_features']:.2f} (floor) | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    CLI(main, as_positional=False)
