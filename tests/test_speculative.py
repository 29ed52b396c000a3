"""Speculative decoding (``generate(..., speculative=k)``) is lossless.

(a) Greedy: code for code the sequential loop's output, guided or not, in every order, with known
    cells, prompts and batches whose rows advance at different paces.
(b) Sampling: on a 2x2 grid of 3 codes the joint distribution over all 81 grids is enumerated here from
    full forwards (every order of a random-order run, guidance, top-k), and many speculative samples
    must match it by a chi-square test; the same test with a wrong acceptance rule must fail.
"""

import importlib
import itertools
import math
from dataclasses import replace

import pytest
import torch
from litgpt.model import GPT

from rar_llm.checkpoint import init_weights, model_config
from rar_llm.sampling import speculative as S
from rar_llm.sampling.decoding import code_probs, guidance_scale
from rar_llm.sampling.loop import generate
from rar_llm.vocab import VocabLayout

G = importlib.import_module("rar_llm.sampling.loop")

LAYOUT = VocabLayout(codebook_size=17, height=4, width=4, num_classes=3)
SMALL = VocabLayout(codebook_size=3, height=2, width=2, num_classes=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    gpt = GPT(model_config("rar-tiny", LAYOUT))
    init_weights(gpt, std=0.2)
    return gpt.eval()


@pytest.fixture(scope="module")
def small():
    """A 2-layer model on the 2x2 grid whose codes depend strongly on their context."""
    torch.manual_seed(3)
    cfg = replace(model_config("rar-tiny", SMALL), n_layer=2, n_embd=32, n_head=2, head_size=16, n_query_groups=2,
                  intermediate_size=64)
    gpt = GPT(cfg)
    init_weights(gpt, std=0.6)
    return gpt.eval()


def watch_rounds(monkeypatch):
    """Each image's decided count after every speculative round."""
    seen = []
    check = G.check

    def spy(drafts, *args, **kwargs):
        out = check(drafts, *args, **kwargs)
        seen.append(drafts.done.cpu().clone())
        return out

    monkeypatch.setattr(G, "check", spy)
    return seen


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guidance=2.0),
    dict(guidance=3.0, schedule="linear", order="random"),
    dict(guidance=2.0, schedule="power_cosine", power=2.0, order="spiral_in", top_k=5),
])
def test_greedy_equals_the_sequential_loop(model, monkeypatch, kwargs, k):
    classes = [0, 1, 2, 1, 0, 2]
    want = generate(model, classes, layout=LAYOUT, temperature=0, seed=0, **kwargs)
    rounds = watch_rounds(monkeypatch)
    got = generate(model, classes, layout=LAYOUT, temperature=0, seed=0, speculative=k, **kwargs)
    assert torch.equal(got, want)
    assert len(rounds) < LAYOUT.num_positions  # fewer forwards than cells
    if k > 1:  # rows accept different numbers of proposals and still each get their own chain
        assert any(len(set(r.tolist())) > 1 for r in rounds)


def test_greedy_with_known_cells_prompts_and_chunks(model, monkeypatch):
    known = torch.arange(16).view(4, 4) % 17
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = mask[:, 0] = True
    args = dict(layout=LAYOUT, temperature=0, guidance=2.0, order="random", seed=1, known=known, known_mask=mask)
    want = generate(model, [0, 1, 2, 0, 1], **args)
    got = generate(model, [0, 1, 2, 0, 1], speculative=4, batch_size=2, **args)
    assert torch.equal(got, want) and torch.equal(got[:, mask], known[mask].expand(5, -1))


def test_greedy_on_a_text_prompt(model):
    """A prompt and its bare ``<boi>`` have different lengths: two streams, each at its own slots."""
    layout = VocabLayout(17, 4, 4, 3, text_vocab_size=20)
    torch.manual_seed(1)
    gpt = GPT(model_config("rar-tiny", layout))
    init_weights(gpt, std=0.2)
    gpt.eval()
    args = dict(layout=layout, temperature=0, guidance=2.5, num_samples=3, order="random", seed=2)
    want = generate(gpt, prompt=[3, 5, 7, 9], **args)
    assert torch.equal(generate(gpt, prompt=[3, 5, 7, 9], speculative=5, **args), want)


# ---- the distribution ---------------------------------------------------------------------------------
SETTINGS = dict(guidance=2.0, schedule="linear", top_k=2, temperature=1.0, order="random")


@torch.inference_mode()
def exact_distribution(model, class_id: int) -> torch.Tensor:
    """P(grid) over the 81 grids (``grid_index``) of a random-order guided run with top-k."""
    L, n = SMALL, SMALL.num_positions
    grids = torch.tensor(list(itertools.product(range(3), repeat=n)))  # (81, 4), cell c = column c
    orders = list(itertools.permutations(range(n)))
    total = torch.zeros(len(grids), dtype=torch.float64)
    for order in orders:
        seqs = []
        for prefix in (L.class_tokens(torch.tensor([class_id]))[0], L.null_class):
            body = torch.stack([torch.full((len(grids),), L.pos_offset + c) if i % 2 == 0 else L.code_offset + grids[:, c]
                                for c in order for i in range(2)], 1)
            seqs.append(torch.cat((torch.full((len(grids), 1), int(prefix)), body), 1))
        cond, uncond = (model(s)[:, 1::2, L.code_offset : L.class_offset].double() for s in seqs)
        prob = torch.ones(len(grids), dtype=torch.float64)
        for t, c in enumerate(order):
            g = guidance_scale(SETTINGS["guidance"], t, n, SETTINGS["schedule"])
            p = code_probs(uncond[:, t] + g * (cond[:, t] - uncond[:, t]), SETTINGS["temperature"], SETTINGS["top_k"])
            prob *= p.gather(1, grids[:, c : c + 1])[:, 0]
        total += prob / len(orders)
    return total


def grid_index(codes: torch.Tensor) -> torch.Tensor:
    """The place of each ``(2, 2)`` grid in ``itertools.product(range(3), repeat=4)``: cell 0 the leading digit."""
    return (codes.reshape(len(codes), -1) * 3 ** torch.arange(3, -1, -1)).sum(1)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square over the bins of expected count >= 5 (the rest pooled)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None]))
    exp = torch.cat((expected[big], expected[~big].sum()[None]))
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def sampled_counts(model, class_id: int, num: int, seed: int) -> torch.Tensor:
    codes = generate(model, class_id, layout=SMALL, num_samples=num, speculative=2, seed=seed, **SETTINGS)
    return torch.bincount(grid_index(codes), minlength=81).double()


def test_samples_follow_the_sequential_distribution(small):
    for class_id in (0, 1):
        exact = exact_distribution(small, class_id)
        assert math.isclose(float(exact.sum()), 1.0, rel_tol=1e-9)
        counts = sampled_counts(small, class_id, 6000, seed=class_id)
        assert chi_square_p(counts, exact) > 1e-4, class_id
        tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
        assert tv < 0.05, tv


@pytest.mark.parametrize("rule", [lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool),  # always accept
                                  lambda p_x, q_x, u: u * q_x < 0.8 * p_x])  # a little too strict
def test_a_wrong_acceptance_rule_fails_the_same_check(small, monkeypatch, rule):
    monkeypatch.setattr(S, "accepts", rule)
    exact = exact_distribution(small, 0)
    counts = sampled_counts(small, 0, 6000, seed=0)
    assert chi_square_p(counts, exact) < 1e-6


def test_the_sequential_sampler_passes_the_same_check(small):
    """The check itself: the one-cell-per-step sampler matches the enumerated distribution."""
    exact = exact_distribution(small, 1)
    codes = generate(small, 1, layout=SMALL, num_samples=6000, seed=5, **SETTINGS)
    counts = torch.bincount(grid_index(codes), minlength=81).double()
    assert chi_square_p(counts, exact) > 1e-4


def test_check_accepts_by_the_rule_and_draws_the_residual():
    """One round by hand: proposal q, target p, a uniform below and above p/q."""
    drafts = S.Drafts.start(1, 4, 3, 0, torch.device("cpu"))
    drafts.pending[:] = 1
    drafts.codes[0, 0] = 1
    drafts.probs[0, 0] = torch.tensor([0.1, 0.8, 0.1])
    target = torch.tensor([[[0.5, 0.4, 0.1], [0.2, 0.3, 0.5]]])  # p at the proposal, then the first query's
    accept_p = 0.4 / 0.8
    gen = torch.Generator().manual_seed(0)
    outcomes = {"accepted": 0, "rejected": 0}
    residual = torch.zeros(3)
    for _ in range(4000):
        d = S.Drafts(drafts.done.clone(), drafts.pending.clone(), drafts.codes.clone(), drafts.probs.clone(),
                     drafts.ahead.clone())
        decided = S.check(d, target, torch.tensor([1]), 2, gen)
        if decided[0, 0] == 1 and int(d.done) == 2:
            outcomes["accepted"] += 1
        else:
            outcomes["rejected"] += 1
            assert int(d.done) == 1 and decided[0, 1] == -1
            residual[decided[0, 0]] += 1
    assert abs(outcomes["accepted"] / 4000 - accept_p) < 0.03
    assert residual[1] == 0 and abs(residual[0] / residual.sum() - 1.0) < 1e-9  # max(0, p - q) = [0.4, 0, 0]


def test_speculative_refuses_what_it_cannot_do(model):
    for kwargs, says in [(dict(speculative=-1), "speculative=-1"), (dict(speculative=2.0), "speculative=2.0"),
                         (dict(speculative=True), "speculative=True"),
                         (dict(speculative=2, steps=4), "exclude each other"),
                         (dict(speculative=2, kv_cache=False), "KV cache")]:
        with pytest.raises(ValueError, match=says):
            generate(model, 0, layout=LAYOUT, **kwargs)


def test_sample_cli_speculative_writes_the_same_greedy_codes(tiny_checkpoint, tmp_path, capsys):
    import numpy as np

    from rar_llm.__main__ import main

    runs = {}
    for k in (0, 3):
        out = tmp_path / f"k{k}"
        main(["sample", "--checkpoint_dir", str(tiny_checkpoint), "--classes", "[1, 4]", "--num_per_class", "2",
              "--sampling.temperature", "0", "--sampling.guidance", "2", "--speculative", str(k), "--out_dir", str(out)])
        runs[k] = np.load(out / "codes.npy")
        assert (out / "samples.png").is_file()
    assert np.array_equal(runs[0], runs[3])
    capsys.readouterr()
    for args, says in ((["--speculative", "2", "--engine", "vllm"], "--speculative needs --engine litgpt"),
                       (["--speculative", "-1"], "speculative=-1")):
        with pytest.raises(SystemExit) as e:
            main(["sample", "--checkpoint_dir", str(tiny_checkpoint), "--out_dir", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and "\n" not in err, err


def test_fuzz_grids_lookaheads_batches_known_cells_and_prompts():
    """Seeded: grids from 1x2 to 6x6, k up to 14, batches, known cells, prompts; greedy equals sequential,
    sampling runs (the slot arithmetic of rows that advance at different paces never leaves the context)."""
    import random

    rng, cases = random.Random(0), 0
    for H, W in [(1, 2), (2, 1), (2, 2), (2, 3), (3, 3), (4, 4), (6, 6)]:
        layout = VocabLayout(5, H, W, 3, text_vocab_size=30)
        torch.manual_seed(H * 10 + W)
        cfg = replace(model_config("rar-tiny", layout), n_layer=1, n_embd=16, n_head=2, head_size=8, n_query_groups=2,
                      intermediate_size=32)
        gpt = GPT(cfg)
        init_weights(gpt, std=0.5)
        gpt.eval()
        n = H * W
        for _ in range(8):
            kw = dict(guidance=rng.choice([1.0, 2.0]), order=rng.choice(["raster", "random"]),
                      temperature=rng.choice([0, 1.0]), seed=rng.randint(0, 99))
            if rng.random() < 0.4:
                mask = torch.zeros(n, dtype=torch.bool)
                mask[rng.sample(range(n), rng.randint(1, n - 1))] = True
                kw.update(known=torch.randint(0, 5, (H, W)), known_mask=mask.view(H, W))
            B = rng.randint(1, 7)
            if rng.random() < 0.5:
                args = dict(prompt=[rng.randint(0, 29) for _ in range(rng.randint(1, 6))], num_samples=B)
            else:
                args = dict(class_id=[rng.randint(0, 2) for _ in range(B)])
            got = generate(gpt, layout=layout, speculative=rng.randint(1, 14), **args, **kw)
            assert got.shape == (B, H, W) and int(got.min()) >= 0 and int(got.max()) < 5
            if "known" in kw:
                assert torch.equal(got[:, kw["known_mask"]], kw["known"][kw["known_mask"]].expand(B, -1))
            if kw["temperature"] == 0:
                assert torch.equal(got, generate(gpt, layout=layout, **args, **kw)), (H, W, kw)
            cases += 1
    assert cases == 56
