"""``rar-llm demo`` end to end at a few steps: every output, the training plot and litgpt's whole log."""

import subprocess
import sys

from PIL import Image

from rar_llm.demo import OUTPUTS
from rar_llm.watch import read_log


def test_demo_leaves_samples_training_plot_and_log(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "rar_llm", "demo", "--out_dir", str(out), "--steps", "8",
                          "--samples_per_class", "4"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert Image.open(out / "samples.png").size[1] > Image.open(out / "samples.png").size[0]  # 10 rows of 4
    assert Image.open(out / "training.png").format == "PNG"
    assert [s for s, _ in read_log(out / "train")["loss"]] == list(range(1, 9))  # the curve's every step
    log = (out / "train.log").read_text()
    assert all(f"| iter {i} step {i} |" in log for i in range(1, 9))  # train.log keeps every line
    assert "| iter 3 step 3 |" not in run.stdout  # the console shows every 25th step only
    assert "training.png (loss and r)" in run.stdout
