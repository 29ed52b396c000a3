"""``python bench/gpu_check.py --device cpu --tiny``: every part of the GPU check runs on the CPU, with finite figures."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["tests", "tokenize", "attention", "training", "finetune_full", "sampling", "speculative", "vllm", "fashion",
         "memory"]


def test_gpu_check_cpu_tiny_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out),
           "--work_dir", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)  # from another folder
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["tiny"] is True
    parts = report["parts"]
    assert list(parts) == PARTS
    vllm_installed = importlib.util.find_spec("vllm") is not None
    assert parts["vllm"]["status"] == ("ok" if vllm_installed else "skipped"), parts["vllm"]["details"]
    parts = {name: part for name, part in parts.items() if name != "vllm" or vllm_installed}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["details"])
        assert part["figures"], name
        for key, value in part["figures"].items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, key, value)
            assert math.isfinite(value), (name, key, value)
    fig = {name: part["figures"] for name, part in parts.items()}
    assert fig["tests"]["passed"] >= 5 and fig["tests"]["failed"] == 0
    assert fig["tokenize"]["codes_equal_to_cpu_encode"] == 1.0
    assert fig["fashion"]["raster_best_step"] > 0 and fig["fashion"]["rar_best_step"] > 0  # both variants trained
    assert "| rar vs raster | fd_features |" in parts["fashion"]["details"]["comparisons"]

    attention = parts["attention"]["details"]
    assert attention["training_backends_seen"] and attention["decoding_backends_seen"]  # read from the profiler
    assert fig["attention"]["train_step_s_math"] > 0 and fig["attention"]["decode_step_s_math"] > 0
    assert "train_step_efficient" in attention["forced_unavailable"]  # a CUDA-only kernel, recorded as such
    assert "honest_use" in attention["flash_attn"]

    for variant in ("plain", "checkpointing"):
        assert fig["training"][f"{variant}_img_s"] > 0 and fig["training"][f"{variant}_tokens_s"] > 0
    assert parts["training"]["details"]["peak_bf16_tflops"]["value"] is None  # no MFU on a CPU

    finetune = parts["finetune_full"]
    assert all(finetune["details"]["checks"].values()), finetune["details"]
    assert fig["finetune_full"]["r_first"] == 1.0 and fig["finetune_full"]["r_min"] == 0.0  # the clock crossed RAR's anneal
    assert finetune["details"]["fsdp_exercised"] is False and "not exercised" in finetune["details"]["fsdp_note"]

    sampling = parts["sampling"]
    assert fig["sampling"]["eager_fp32_img_s"] > 0 and fig["sampling"]["eager_bf16_img_s"] > 0
    assert fig["sampling"]["static_loop_greedy_agreement"] == 1.0  # the compiled loop's code equals generate's
    assert "CUDA only" in sampling["details"]["compiled"]
    assert fig["speculative"]["greedy_agreement"] == 1.0  # speculative greedy codes equal the sequential loop's
    assert fig["speculative"]["b1_k4_forwards"] < fig["speculative"]["b1_k0_forwards"]
    assert fig["memory"]["process_peak_rss_bytes"] > 0
