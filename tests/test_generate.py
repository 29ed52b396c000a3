import copy
import importlib
import math

import numpy as np
import pytest
import torch
from litgpt.model import GPT
from PIL import Image

from rar_llm.sampling import prepack
from rar_llm.sampling.decoding import guidance_scale, parallel_schedule, sample_codes, scan_order
from rar_llm.sampling.settings import ORDERS, RAR_PRESETS, SamplingSettings
from rar_llm.checkpoint import init, init_weights, model_config
from rar_llm.permute import interleave
from rar_llm.sampling.cli import sample
from rar_llm.sampling.loop import generate
from rar_llm.vocab import VocabLayout

G = importlib.import_module("rar_llm.sampling.loop")  # the decoding loop's module

LAYOUT = VocabLayout(codebook_size=17, height=4, width=4, num_classes=3)
N = LAYOUT.num_positions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    gpt = GPT(model_config("rar-tiny", LAYOUT))
    init_weights(gpt, std=0.2)  # peaked logits, so the sampled codes depend on the context
    return gpt.eval()


def record_logits(monkeypatch):
    """Capture the guided logits each step hands to the sampler."""
    seen = []

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample_codes(logits, *args, **kwargs)

    monkeypatch.setattr(G, "sample_codes", spy)
    return seen


def record_calls(model, monkeypatch):
    """Capture every forward call as (tokens, input_pos)."""
    calls = []
    forward = model.forward

    def spy(idx, input_pos=None, **kwargs):
        calls.append((idx.cpu().clone(), None if input_pos is None else input_pos.cpu().clone()))
        return forward(idx, input_pos=input_pos, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return calls


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(guidance=3.0, schedule="linear", order="random", steps=5),
        dict(guidance=2.0, schedule="power_cosine", power=2.0, order="spiral_in", steps=7,
             known=torch.arange(N).view(4, 4) % 17, known_mask=torch.eye(4, dtype=torch.bool)),
    ],
)
def test_kv_cache_logits_equal_full_forward(model, monkeypatch, kwargs, device, on_device):
    model = on_device(model, device)
    seen = record_logits(monkeypatch)
    cached = generate(model, [0, 2], layout=LAYOUT, seed=1, **kwargs)
    with_cache, seen[:] = list(seen), []
    full = generate(model, [0, 2], layout=LAYOUT, seed=1, kv_cache=False, **kwargs)
    assert len(with_cache) == len(seen) == kwargs.get("steps", N)
    for a, b in zip(with_cache, seen):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32; guidance amplifies the noise
    assert torch.equal(cached, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_step_logits_equal_full_forward(model, device, dtype):
    """Teacher-forced, two tokens per step on litgpt's KV cache: the full forward's logits at every position token."""
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    rows = [interleave(LAYOUT, c, rng.integers(0, 17, N), rng.permutation(N))[0] for c in (0, 2)]
    ids = torch.from_numpy(np.stack(rows)).to(device)
    with torch.inference_mode():
        full = net(ids)[:, 1::2].float()  # the logits at the position tokens predict their cells' codes
        net.set_kv_cache(2, max_seq_length=ids.shape[1], device=device, dtype=dtype)
        steps = [net(ids[:, p : p + 2], input_pos=torch.arange(p, p + 2, device=device), input_pos_maxp1=p + 2)[:, -1]
                 for p in range(0, ids.shape[1] - 1, 2)]
        net.clear_kv_cache()
    cached = torch.stack(steps, 1).float()
    assert cached.shape == full.shape == (2, N, LAYOUT.padded_vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 5e-2 * full.abs().max().item()  # bf16: 8 bits; 1.6 % seen on a CPU
    torch.testing.assert_close(cached, full, atol=tol, rtol=0)


def test_guidance_one_is_the_unguided_path(model, monkeypatch, device, on_device):
    model = on_device(model, device)
    calls = record_calls(model, monkeypatch)
    plain = generate(model, [1, 2], layout=LAYOUT, seed=3)
    assert {idx.shape[0] for idx, _ in calls} == {2}  # no doubled batch
    assert torch.equal(generate(model, [1, 2], layout=LAYOUT, seed=3, guidance=1.0, schedule="linear"), plain)

    # the doubled batch at scale 1 (the linear schedule's first step) gives the unguided logits
    seen = record_logits(monkeypatch)
    generate(model, [1, 2], layout=LAYOUT, seed=3, steps=1)
    generate(model, [1, 2], layout=LAYOUT, seed=3, steps=1, guidance=5.0, schedule="linear")
    assert calls[-1][0].shape[0] == 4
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)


def test_seed_reproduces_a_batch(model, device, on_device):
    model = on_device(model, device)
    kw = dict(layout=LAYOUT, guidance=2.0, temperature=1.2, top_k=8, top_p=0.9, order="random", steps=6)
    a = generate(model, [0, 1, 2, 0], seed=7, **kw)
    assert torch.equal(a, generate(model, [0, 1, 2, 0], seed=torch.Generator(device).manual_seed(7), **kw))
    assert not torch.equal(a, generate(model, [0, 1, 2, 0], seed=8, **kw))
    assert a.shape == (4, 4, 4) and a.dtype == torch.long and 0 <= a.min() and a.max() < LAYOUT.codebook_size


def test_kv_cache_is_left_as_the_caller_had_it(model):
    generate(model, 0, layout=LAYOUT, steps=3)
    assert model.mask_cache is None and all(b.attn.kv_cache is None for b in model.transformer.h)
    model.set_kv_cache(1, max_seq_length=8)
    caches = [b.attn.kv_cache for b in model.transformer.h]
    generate(model, [0, 1], layout=LAYOUT, steps=3, guidance=2.0)
    assert model.mask_cache.shape[-1] == 8 and [b.attn.kv_cache for b in model.transformer.h] == caches
    model.clear_kv_cache()


def test_context_length_is_left_as_the_caller_had_it(model):
    before = model.max_seq_length
    model.max_seq_length = 8  # shorter than the 1 + 2 * 16 tokens of a 4x4 grid: generate makes room
    rope = model.cos, model.sin
    try:
        generate(model, [0, 1], layout=LAYOUT, steps=3, guidance=2.0)
        assert model.max_seq_length == 8 and model.cos is rope[0] and model.sin is rope[1]
    finally:
        model.max_seq_length = before


def test_settings_and_their_fields_as_keywords(model):
    kw = dict(layout=LAYOUT, seed=3, steps=4)
    preset = RAR_PRESETS["rar-b"]
    by_preset = generate(model, [0, 2], settings=preset, **kw)
    assert torch.equal(by_preset, generate(model, [0, 2], guidance=16.0, schedule="power_cosine", power=2.75, **kw))
    # a field beside settings replaces that field of it
    assert torch.equal(generate(model, [0, 2], settings=preset, guidance=2.0, **kw),
                       generate(model, [0, 2], guidance=2.0, schedule="power_cosine", power=2.75, **kw))
    with pytest.raises(TypeError, match="generate\\(\\) got unexpected keyword argument\\(s\\) guidence; the sampling "
                                        "settings are guidance, schedule, power, temperature, top_k, top_p, order, steps"):
        generate(model, 0, layout=LAYOUT, guidence=2.0)
    with pytest.raises(TypeError, match="settings must be a SamplingSettings"):
        generate(model, 0, layout=LAYOUT, settings=dict(guidance=2.0))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="prepacking needs oneDNN (x86/ARM CPU builds)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_keep_logits_and_samples(model, dtype):
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    if not prepack.packable(net):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(interleave(LAYOUT, 1, rng.integers(0, 17, N), rng.permutation(N))[0])[None]
    plain = net(idx)
    with prepack.prepacked(net):
        assert all("forward" in m.__dict__ for m in linears)
        packed = net(idx)
        with prepack.prepacked(net):  # nested: packs nothing again
            torch.testing.assert_close(net(idx), packed, atol=0, rtol=0)
    assert not any("forward" in m.__dict__ for m in linears)  # restored
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * plain.abs().max().item()
    torch.testing.assert_close(packed, plain, atol=tol, rtol=tol)
    if dtype == torch.float32:
        kw = dict(layout=LAYOUT, seed=5, guidance=2.0, order="random")
        assert torch.equal(generate(net, [0, 1, 2], prepack=False, **kw), generate(net, [0, 1, 2], **kw))


@pytest.mark.parametrize("order", [*ORDERS, "given"])
@pytest.mark.parametrize("steps", [None, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_every_cell_is_filled_once_in_the_training_layout(model, monkeypatch, order, steps, masked, device, on_device):
    """Every call's context is the training layout of the final sample; queries cover each open cell once."""
    model = on_device(model, device)
    if order == "given":
        order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    known_mask = torch.zeros(4, 4, dtype=torch.bool)
    if masked:
        known_mask[1:3, 1:3] = True  # the centre is given: outpainting
    known = torch.full((4, 4), 5)
    calls = record_calls(model, monkeypatch)
    grid = generate(model, [2, 1], layout=LAYOUT, guidance=2.0, order=order, steps=steps, seed=0,
                    known=known, known_mask=known_mask)
    n_known = int(known_mask.sum())
    counts = parallel_schedule(N - n_known, steps or N - n_known)
    assert len(calls) == len(counts)

    prefill = calls[0][0][:, 1 : 2 * n_known : 2] - LAYOUT.pos_offset
    queries = torch.cat([idx[:, -k:] for (idx, _), k in zip(calls, counts)], dim=1) - LAYOUT.pos_offset
    cells = torch.cat([prefill, queries], dim=1)  # the full order of each row
    assert torch.equal(cells.sort(dim=1).values, torch.arange(N).expand(4, N))
    assert set(prefill[0].tolist()) == set(known_mask.view(-1).nonzero().view(-1).tolist())
    if isinstance(order, str) and order != "random":
        free = [c for c in scan_order(order, 4, 4).tolist() if not known_mask.view(-1)[c]]
        assert queries[0].tolist() == free
    elif not isinstance(order, str):
        assert queries[0].tolist() == [c for c in order.tolist() if not known_mask.view(-1)[c]]

    cache = torch.full((4, LAYOUT.seq_len), -1, dtype=torch.long)
    for (idx, pos), k in zip(calls, counts):
        cache[:, pos] = idx
        context = int(pos[-1]) + 1 - k
        for row, (cls, b) in enumerate([(2, 0), (1, 1), (None, 0), (None, 1)]):
            want, _ = interleave(LAYOUT, cls, grid[b].numpy(), cells[row].numpy())
            assert cache[row, :context].tolist() == want[:context].tolist()
    assert (grid.view(2, N)[:, known_mask.view(-1)] == 5).all()


def test_inpainting_keeps_known_cells(model, device, on_device):
    model = on_device(model, device)
    known = torch.randint(0, 17, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mask = torch.stack([torch.randperm(N, generator=g) < 8 for _ in range(3)]).view(3, 4, 4)  # 8 given per sample
    out = generate(model, [0, 1, 2], layout=LAYOUT, guidance=3.0, known=known, known_mask=mask, order="random",
                   steps=3, seed=0)
    assert torch.equal(out[mask], known[mask])


def test_sampler_filters():
    logits = torch.randn(5, 3, 17, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(sample_codes(logits, temperature=0), best)
    assert torch.equal(sample_codes(logits, top_k=1, generator=torch.Generator().manual_seed(0)), best)
    assert torch.equal(sample_codes(logits, top_p=1e-6, generator=torch.Generator().manual_seed(0)), best)
    top3 = torch.topk(logits, 3, dim=-1).indices
    draws = sample_codes(logits.expand(200, 5, 3, 17), top_k=3, generator=torch.Generator().manual_seed(0))
    assert (draws.unsqueeze(-1) == top3).any(-1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_id=3), "class ids [3] are outside this layout's classes 0..2"),
        (dict(class_id=[0, -1]), "class ids [-1] are outside"),
        (dict(known=torch.zeros(3, 3, dtype=torch.long), known_mask=torch.ones(4, 4, dtype=torch.bool)),
         "known has shape (3, 3); expected (4, 4) or (1, 4, 4)"),
        (dict(known=torch.zeros(4, 4, dtype=torch.long), known_mask=torch.ones(2, 4, 4, dtype=torch.bool)),
         "known_mask has shape (2, 4, 4)"),
        (dict(known=torch.zeros(4, 4, dtype=torch.long)), "give both known"),
        (dict(known=torch.full((4, 4), 17), known_mask=torch.eye(4, dtype=torch.bool)),
         "known: code 17 is outside the codebook 0..16"),
        (dict(steps=0), "steps=0 is outside 1..16"),
        (dict(steps=17), "steps=17 is outside 1..16"),
        (dict(steps=13, known=torch.zeros(4, 4, dtype=torch.long), known_mask=torch.eye(4, dtype=torch.bool)),
         "steps=13 is outside 1..12"),
        (dict(order="hilbert"), "unknown order 'hilbert'"),
        (dict(order=[0] * 16), "order is not a permutation"),
        (dict(schedule="cosine"), "unknown guidance schedule 'cosine'"),
        (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(layout=VocabLayout(codebook_size=16, height=4, width=4, num_classes=3)),
         "model vocabulary (vocab_size 39, padded 64) does not match the layout (vocab_size 38"),
    ],
)
def test_clear_errors(model, kwargs, message):
    kwargs = {"class_id": 0, "layout": LAYOUT, **kwargs}
    with pytest.raises(ValueError) as e:
        generate(model, kwargs.pop("class_id"), **kwargs)
    assert message in str(e.value)


def test_guidance_schedules():
    assert guidance_scale(4.0, 0, 16) == guidance_scale(4.0, 16, 16) == 4.0
    assert guidance_scale(4.0, 0, 16, "linear") == 1.0 and guidance_scale(4.0, 16, 16, "linear") == 4.0
    assert guidance_scale(4.0, 8, 16, "linear") == 2.5
    for w, p in [(16.0, 2.75), (15.5, 2.5), (6.9, 1.5), (8.0, 1.2)]:
        assert guidance_scale(w, 0, 256, "power_cosine", p) == 1.0
        assert math.isclose(guidance_scale(w, 256, 256, "power_cosine", p), w)
    assert guidance_scale(16.0, 0, 256, "power_cosine", 0.0) == 16.0  # power 0: constant w
    assert guidance_scale(16.0, 256, 256, "power_cosine", 0.0) == 16.0
    assert RAR_PRESETS["rar-b"] == SamplingSettings(guidance=16.0, schedule="power_cosine", power=2.75, temperature=1.0)


@pytest.mark.parametrize("n, steps", [(256, 88), (256, 256), (256, 1), (16, 5), (12, 11), (1, 1)])
def test_parallel_schedule(n, steps):
    counts = parallel_schedule(n, steps)
    assert len(counts) == steps and sum(counts) == n and min(counts) >= 1
    assert counts[0] <= counts[-1]  # cosine: slow start, big final steps


def test_scan_orders_are_permutations():
    for name in ORDERS[:1] + ORDERS[2:]:
        for h, w in [(4, 4), (3, 5), (16, 16)]:
            assert sorted(scan_order(name, h, w).tolist()) == list(range(h * w)), name
    assert scan_order("zcurve", 4, 4)[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert scan_order("spiral_in", 3, 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert scan_order("spiral_out", 3, 3).tolist()[0] == 4
    assert scan_order("subsample", 4, 4)[:4].tolist() == [0, 2, 8, 10]
    assert scan_order("alternate", 3, 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]


def test_sample_cli_writes_png_and_codes(tmp_path):
    ckpt = init(tmp_path / "ckpt", model="rar-tiny", layout="digits")
    out = tmp_path / "samples"
    sample(ckpt, out_dir=out, classes=[3, 7], num_per_class=2,
           sampling=SamplingSettings(guidance=2.0, schedule="linear", steps=8), seed=0)
    codes = np.load(out / "codes.npy")
    assert codes.shape == (4, 8, 8) and codes.min() >= 0 and codes.max() <= 16
    assert np.load(out / "labels.npy").tolist() == [3, 3, 7, 7]
    png = Image.open(out / "samples.png")
    assert png.mode == "L" and png.size == (2 * 66 + 2, 2 * 66 + 2)  # 8x8 codes drawn at 64 px
    with pytest.raises(FileExistsError, match="already exist.*--overwrite true"):
        sample(ckpt, out_dir=out, classes=[3], num_per_class=1, sampling=SamplingSettings(steps=2))
    sample(ckpt, out_dir=out, classes=[3], num_per_class=1, sampling=SamplingSettings(steps=2), overwrite=True)
    assert np.load(out / "codes.npy").shape == (1, 8, 8)
    with pytest.raises(ValueError, match="preset 'rar-s'"):
        sample(ckpt, out_dir=tmp_path / "other", preset="rar-s")
