"""``rar_llm.optim.RARAdamW``: RAR's clipping and decay groups, equal to torch's own on one process and on two
gloo ranks that hold disjoint shards of the same gradients (as FSDP's ranks do)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from litgpt.model import GPT

from rar_llm.checkpoint import model_config
from rar_llm.optim import RARAdamW, clip_global_norm_
from rar_llm.vocab import VocabLayout

SETTINGS = dict(lr=0.01, betas=(0.9, 0.96), weight_decay=0.1)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("rar-tiny", VocabLayout.load("digits"), n_layer=2, n_embd=32, n_head=2,
                            n_query_groups=2, intermediate_size=64))


def set_grads(params, step: int, scale: float = 10.0) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


def test_decay_groups_exempt_norms_biases_and_the_embedding():
    model = tiny_gpt()
    opt = RARAdamW(model.parameters(), **SETTINGS)
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1
    assert free == {n for n, p in model.named_parameters() if p.dim() < 2} | {"transformer.wte.weight"}
    assert "lm_head.weight" not in free and any("norm" in n for n in free)


def test_step_equals_clip_grad_norm_and_adamw():
    a = tiny_gpt()
    b = copy.deepcopy(a)
    ours = RARAdamW(a.parameters(), max_norm=1.0, **SETTINGS)
    groups = [[dict(b.named_parameters())[n] for n, p in a.named_parameters() if any(p is q for q in g["params"])]
              for g in ours.param_groups]
    ref = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.1}, {"params": groups[1], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.96))
    for step in range(3):
        set_grads(a.parameters(), step)
        set_grads(b.parameters(), step)
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        assert norm > 1.0  # the clip acts
        ref.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_no_clipping_below_the_norm_and_refused_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, 0.2])
    assert float(clip_global_norm_([p], 1.0)) == pytest.approx(0.3)
    assert torch.equal(p.grad, torch.tensor([0.1, 0.2, 0.2]))
    with pytest.raises(ValueError, match="max_norm=0"):
        RARAdamW([p], max_norm=0)


def _rank(rank: int, world: int, init: str, full: list[torch.Tensor], grads: list[list[torch.Tensor]], out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shards = [torch.nn.Parameter(t.chunk(world)[rank].clone()) for t in full]
        opt = RARAdamW([{"params": shards, "weight_decay": 0.1}], max_norm=1.0, **SETTINGS)
        for step_grads in grads:
            for p, g in zip(shards, step_grads):
                p.grad = g.chunk(world)[rank].clone()
            opt.step()
        torch.save([p.detach() for p in shards], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_disjoint_shards_clip_by_the_global_norm(tmp_path):
    torch.manual_seed(1)
    full = [torch.randn(6, 4), torch.randn(10)]
    grads = [[torch.randn(t.shape) * 5 for t in full] for _ in range(3)]
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", full, grads, str(tmp_path / "out")), nprocs=2)
    got = [torch.cat(parts) for parts in zip(*(torch.load(tmp_path / f"out.{r}") for r in range(2)))]
    ref = [torch.nn.Parameter(t.clone()) for t in full]
    opt = torch.optim.AdamW(ref, **SETTINGS)
    for step_grads in grads:
        for p, g in zip(ref, step_grads):
            p.grad = g.clone()
        assert torch.nn.utils.clip_grad_norm_(ref, 1.0) > 1.0
        opt.step()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
