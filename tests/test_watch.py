"""``rar-llm watch`` beside a real ``litgpt finetune_full`` run, and the training plot it draws."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rar_llm.__main__ import main
from rar_llm.watch import r_curve, read_log, read_schedule, plot_training

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "rar_tiny.yaml"


def write_csv(run_dir: Path) -> None:
    """litgpt's CSV log as Lightning writes it: training rows, then a validation row at the same step."""
    folder = run_dir / "logs" / "csv" / "version_0"
    folder.mkdir(parents=True)
    rows = ["epoch,iter,learning_rate,loss,step,val_loss,val_ppl"]
    rows += [f"0,{i},0.001,{5 - i / 10},{i},," for i in range(1, 11)]
    rows += [",,,,10,4.2,66.7"]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_the_log_and_the_schedule_are_read_as_litgpt_writes_them(tmp_path):
    write_csv(tmp_path)
    log = read_log(tmp_path)
    assert log["loss"][0] == (1, 4.9) and log["loss"][-1] == (10, 4.0) and log["val_loss"] == [(10, 4.2)]
    hparams = yaml.safe_load(RECIPE.read_text())
    per_iter, total, schedule = read_schedule(hparams)
    assert per_iter == 32 and total == 7680 and (schedule.anneal_start, schedule.anneal_end) == (0.5, 0.75)
    steps, r = r_curve(schedule, total, global_batch=32, points=241)  # the recipe's 240 steps, one point per step
    assert steps[-1] == 240 and r[:121] == [1.0] * 121  # random orders for the first half
    assert r[150] == pytest.approx(0.5) and r[180:] == [0.0] * 61  # r falls over 50 % -> 75 % of training
    path = plot_training(tmp_path, hparams, tmp_path / "out" / "training.png", saved=[5, 10])
    assert Image.open(path).format == "PNG" and 700 < Image.open(path).size[0] < 1000  # about 7 inches at 120 dpi
    assert not list((tmp_path / "out").glob("*.tmp.png"))


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_watch_follows_a_finetune_full_run_and_stops_when_it_ends(tmp_path, digits_dir, tiny_checkpoint):
    """The user's commands: litgpt trains the tiny recipe, ``rar-llm watch`` runs beside it."""
    shutil.copytree(digits_dir, tmp_path / "data" / "digits")
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "rar-tiny-digits")
    short = ["--train.max_steps", "30", "--data.init_args.total_samples", "960", "--train.save_interval", "10",
             "--eval.interval", "10", "--eval.max_iters", "2", "--eval.initial_validation", "false"]
    watch = subprocess.Popen([sys.executable, "-m", "rar_llm", "watch", "--out_dir", "out/rar-tiny-digits",
                              "--poll_seconds", "0.5", "--num_per_class", "2", "--idle_minutes", "5"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train = subprocess.run([sys.executable, "-m", "litgpt", "finetune_full", "--config", str(RECIPE), *short],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "out" / "rar-tiny-digits"
    before = files(run)
    out, _ = watch.communicate(timeout=300)
    assert watch.returncode == 0, out
    assert "the run saved final/; stopped" in out
    made = tmp_path / "out" / "rar-tiny-digits-watch"
    assert sorted(p.name for p in made.iterdir()) == ["final.png", "step-000010.png", "step-000020.png",
                                                      "step-000030.png", "training.png"]
    assert Image.open(made / "step-000010.png").size[1] > Image.open(made / "step-000010.png").size[0]  # 10 rows of 2
    assert files(run) == before and not list(run.rglob("*.png"))  # the run's folder is as litgpt left it
    log = read_log(run)  # the recipe's log_interval 1 makes litgpt write the CSV the plot draws
    assert [s for s, _ in log["loss"]] == list(range(1, 31)) and [s for s, _ in log["val_loss"]] == [10, 20, 30, 30]


def test_watch_refuses_to_write_into_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["watch", "--out_dir", str(tmp_path / "run"), "--watch_dir", str(tmp_path / "run" / "grids")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "is inside the run's" in err and len(err.splitlines()) == 1


def test_watch_stops_when_the_run_goes_quiet(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    main(["watch", "--out_dir", str(tmp_path / "run"), "--poll_seconds", "0.1", "--idle_minutes", "0.005"])
    assert "changed for 0.005 minutes and it has no final/; stopped" in capsys.readouterr().out
