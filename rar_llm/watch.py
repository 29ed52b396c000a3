"""``rar-llm watch``: follow a ``litgpt finetune_full`` run from beside it, and the training plot.

For every checkpoint the run saves (``step-NNNNNN/``, then ``final/``) it writes a sample grid (a row
per class) and redraws ``training.png``: the training and validation loss from litgpt's CSV log with
the permutation probability r of RAR's annealing over the same steps, so the annealing window shows
in the curve. It only reads the run's folder and writes to its own; it stops when ``final/`` is saved.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
import yaml

from rar_llm.permute import Permutation

DONE_MARKER = "prompt_style.yaml"  # litgpt writes it last into a checkpoint folder
CSV_HINT = ("litgpt writes its CSV log only with train.log_interval 1 (Lightning flushes at steps where "
            "(step + 1) % log_interval == 0, and litgpt logs at multiples of log_interval)")


def read_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(iter, value)], "val_loss": [...]}`` from the newest ``logs/csv/version_*/metrics.csv``."""
    files = sorted((run_dir / "logs" / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    out: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
    if not files:
        return out
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key in out:
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    out[key].append((int(float(row["step"])), float(row[key])))
    return out


def read_schedule(hparams: dict) -> tuple[int, int | None, Permutation | None]:
    """Samples per logged iteration, and the data module's clock length and annealing (None without a RAR clock)."""
    train = hparams.get("train") or {}
    world = int(hparams.get("devices") or 1) * int(hparams.get("num_nodes") or 1)
    per_iter = int(train.get("micro_batch_size") or 1) * world
    args = ((hparams.get("data") or {}).get("init_args") or {})
    if "total_samples" not in args:
        return per_iter, None, None
    schedule = Permutation(**{k: args[k] for k in ("anneal_start", "anneal_end", "r_end") if k in args})
    return per_iter, int(args["total_samples"]), schedule


def r_curve(schedule: Permutation, total_samples: int, global_batch: int,
            points: int = 200) -> tuple[list[float], list[float]]:
    """RAR's permutation probability r over the run's optimizer steps, as ``RARData`` anneals it."""
    max_steps = total_samples / global_batch
    steps = [max_steps * i / (points - 1) for i in range(points)]
    return steps, [schedule.r(s / max_steps) for s in steps]


def plot_training(run_dir: Path, hparams: dict, path: Path, saved: list[int] = ()) -> Path:
    """Draw the run's loss curves and r over optimizer steps into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(run_dir)
    per_iter, total, schedule = read_schedule(hparams)
    global_batch = int((hparams.get("train") or {}).get("global_batch_size") or per_iter)
    to_step = per_iter / global_batch  # logged iterations (micro-batches) -> optimizer steps
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for key, style in (("loss", dict(color="tab:blue", lw=1, label="training loss")),
                       ("val_loss", dict(color="tab:orange", marker="o", label="validation loss"))):
        if log[key]:
            xs, ys = zip(*log[key])
            ax.plot([x * to_step for x in xs], ys, **style)
    for s in saved:
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    if not log["loss"]:
        ax.text(0.5, 0.5, "no CSV log yet\n(" + CSV_HINT.split(" (")[0] + ")", ha="center", va="center",
                transform=ax.transAxes, fontsize=7)
    if schedule is not None:
        steps, r = r_curve(schedule, total, global_batch)
        ax2 = ax.twinx()
        ax2.plot(steps, r, color="tab:green", lw=1.5, label="r (random-order probability)")
        ax2.axvspan(schedule.anneal_start * steps[-1], schedule.anneal_end * steps[-1], color="tab:green", alpha=0.08, label="annealing window")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_ylabel("r", color="tab:green")
        ax2.legend(loc="center right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(f"{run_dir.parent.name}/{run_dir.name}: loss and RAR's annealing", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, in order (``final/`` last)."""
    steps = sorted(p for p in run_dir.glob("step-*") if (p / DONE_MARKER).is_file())
    final = run_dir / "final"
    return steps + ([final] if (final / DONE_MARKER).is_file() else [])


def sample_grid(checkpoint: Path, path: Path, tokenizer, num_per_class: int, guidance: float, seed: int,
                device: str) -> Path:
    """A row of ``num_per_class`` samples per class of ``checkpoint`` into ``path`` (PNG)."""
    from rar_llm.checkpoint import load_model
    from rar_llm.sampling.loop import generate
    from rar_llm.tokenizers.draw import image_grid, to_pixels

    model = load_model(checkpoint, device, torch.float32)
    layout = model.layout
    classes = torch.arange(layout.num_classes).repeat_interleave(num_per_class)
    codes = generate(model, classes, guidance=guidance, seed=seed, progress=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    image_grid(to_pixels(codes.cpu(), layout, tokenizer), rows=layout.num_classes).save(tmp)
    tmp.replace(path)
    return path


def watch(
    out_dir: Path,
    watch_dir: Path | None = None,
    tokenizer: str | None = None,
    num_per_class: int = 8,
    guidance: float = 2.0,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    poll_seconds: float = 10.0,
    idle_minutes: float = 60.0,
) -> Path:
    """Follow a litgpt training run: a sample grid per saved checkpoint and ``training.png`` (loss and r).

    Args:
        out_dir: the run's ``out_dir`` (litgpt's ``--out_dir``); it may not exist yet.
        watch_dir: where the grids and the plot go (default: ``OUT_DIR-watch`` beside the run). Grids
            already there are kept and not redrawn, so a restarted watch goes on.
        tokenizer: the image tokenizer that decodes codes (as ``rar-llm sample``; None: the digits' greys).
        num_per_class: samples per class in each grid (a row per class).
        guidance: classifier-free guidance of the grids' samples.
        seed: the same seed for every checkpoint, so grids compare step to step.
        device: where sampling runs (``cpu`` beside a GPU run, or a spare ``cuda:1``).
        threads: CPU threads for sampling (keep them off the training run's cores).
        poll_seconds: how often to look for new checkpoints.
        idle_minutes: stop when nothing in ``out_dir`` changed for this long without a ``final/``.
    """
    out_dir = Path(out_dir)
    watch_dir = Path(watch_dir) if watch_dir is not None else out_dir.with_name(out_dir.name + "-watch")
    if watch_dir.resolve() == out_dir.resolve() or out_dir.resolve() in watch_dir.resolve().parents:
        raise ValueError(f"--watch_dir {watch_dir} is inside the run's {out_dir}; watch never writes there")
    if num_per_class < 1 or poll_seconds <= 0 or idle_minutes <= 0 or threads < 1:
        raise ValueError("num_per_class and threads must be >= 1, poll_seconds and idle_minutes > 0")
    if isinstance(tokenizer, str):
        from rar_llm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if device == "cpu":
        torch.set_num_threads(threads)
    watch_dir.mkdir(parents=True, exist_ok=True)
    print(f"watching {out_dir} -> {watch_dir} (Ctrl-C stops)", flush=True)
    last_change, warned = time.monotonic(), False
    while True:
        done = saved_checkpoints(out_dir)
        for ckpt in done:
            grid = watch_dir / f"{ckpt.name}.png"
            if grid.exists():
                continue
            hparams = yaml.safe_load((ckpt / "hyperparameters.yaml").read_text())
            sample_grid(ckpt, grid, tokenizer, num_per_class, guidance, seed, device)
            steps = [int(p.name.split("-")[1]) for p in done if p.name.startswith("step-")]
            plot_training(out_dir, hparams, watch_dir / "training.png", steps)
            print(f"{ckpt.name}: wrote {grid} and {watch_dir / 'training.png'}", flush=True)
            if not warned and int((hparams.get("train") or {}).get("log_interval") or 1) != 1:
                print(f"note: {CSV_HINT}; the plot shows r only", flush=True)
                warned = True
            last_change = time.monotonic()
        if done and done[-1].name == "final":
            print(f"the run saved final/; stopped. Grids and training.png are in {watch_dir}")
            return watch_dir
        if out_dir.is_dir() and any(p.stat().st_mtime > time.time() - poll_seconds * 2 for p in out_dir.rglob("*")):
            last_change = time.monotonic()
        if time.monotonic() - last_change > idle_minutes * 60:
            print(f"nothing in {out_dir} changed for {idle_minutes:g} minutes and it has no final/; stopped")
            return watch_dir
        time.sleep(poll_seconds)
