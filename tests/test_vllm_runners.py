"""The RAR logits processor on both of vLLM's model runners, driven through each runner's own interface.

Model Runner V2 (vLLM's default on GPUs) builds processors with ``(vllm_config, LogitsProcRequestState)``,
admits requests by slot (``add_request``) and calls ``apply(logits, LogitsContext)`` with rows reordered
every step and, under speculative decoding, several rows per request. The legacy runner (vLLM's CPU
build) builds them with ``(vllm_config, device, pin_memory)`` and reports batch changes through
``update_state``. Both loaders must accept the one class, and the same requests with the same logits
must get the same tokens on both. Needs vLLM installed (skipped otherwise); no engine and no GPU: the
runners' state is played here on CPU tensors.
"""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
    build_custom_logits_processors_params_validator,
)

from rar_llm.checkpoint import init  # noqa: E402
from rar_llm.sampling.settings import SamplingSettings, to_extra_args  # noqa: E402
from rar_llm.serve.plugin import RARLogitsProcessor  # noqa: E402
from rar_llm.vocab import VocabLayout  # noqa: E402

FQCN = "rar_llm.serve.plugin:RARLogitsProcessor"
MAX_LEN = 200


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    ckpt = init(tmp_path_factory.mktemp("runners") / "ckpt", model="rar-tiny", layout="digits")
    return SimpleNamespace(model_config=SimpleNamespace(model=str(ckpt))), VocabLayout.from_checkpoint(ckpt)


def requests(layout: VocabLayout) -> list[tuple[list[int], SamplingParams]]:
    """A guided pair (random order, top-k), an unguided image, and a plain request RAR leaves alone."""
    order = list(range(layout.num_positions))
    random.Random(0).shuffle(order)
    guided = SamplingSettings(guidance=3.0, schedule="linear", top_k=5, order=order)
    plain = SamplingSettings(temperature=0.7, order=list(range(layout.num_positions)))
    cls = int(layout.class_tokens(torch.tensor([4]))[0])
    out = []
    for first in (cls, layout.null_class):
        out.append(([first, layout.pos_offset + order[0]], SamplingParams(temperature=0, extra_args=to_extra_args(guided, 11, "img"))))
    out.append(([int(layout.class_tokens(torch.tensor([7]))[0]), layout.pos_offset], SamplingParams(temperature=0, extra_args=to_extra_args(plain, 5))))
    out.append(([1, 2, 3], SamplingParams(temperature=0.8)))
    return out


def v2_state(num: int, vocab: int) -> LogitsProcRequestState:
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=num, vocab_size=vocab,
        all_token_ids=SimpleNamespace(gpu=torch.zeros(num, MAX_LEN, dtype=torch.long)),
        prompt_len=SimpleNamespace(np=np.zeros(num, np.int32)), prefill_len=SimpleNamespace(np=np.zeros(num, np.int32)),
        total_len=SimpleNamespace(gpu=torch.zeros(num, dtype=torch.long)),
    )


def test_both_loaders_accept_the_one_class():
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert _load_v2_logitsprocs_by_fqcns([FQCN]) == [RARLogitsProcessor]
    assert _load_logitsprocs_by_fqcns([FQCN]) == [RARLogitsProcessor]
    validate = build_custom_logits_processors_params_validator([FQCN])  # the V2 frontend's admission check
    validate(SamplingParams(temperature=0, extra_args=to_extra_args(SamplingSettings(order=[0, 1]), 0)))
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="temperature=0"):
        validate(SamplingParams(temperature=1.0, extra_args=to_extra_args(SamplingSettings(order=[0, 1]), 0)))


def test_the_same_tokens_on_both_runners(config):
    """Every step of three images: V2 with its rows shuffled each step equals V1, token for token."""
    vllm_config, layout = config
    reqs = requests(layout)
    vocab = layout.vocab_size
    v1 = RARLogitsProcessor(vllm_config, torch.device("cpu"), False)
    state = v2_state(8, vocab)
    v2 = RARLogitsProcessor(vllm_config, state)
    assert (v1.runner, v2.runner) == ("V1", "V2")
    slots = [5, 2, 0, 7]  # persistent slots of the four requests
    outs: list[list[int]] = [[] for _ in reqs]
    v1.update_state(BatchUpdate(batch_size=4, removed=[], moved=[],
                                added=[(i, p, prompt, outs[i]) for i, (prompt, p) in enumerate(reqs)]))
    admitted = [v2.add_request(s, p) for s, (_, p) in zip(slots, reqs)]
    assert admitted == [True, True, True, False]
    for s, (prompt, _) in zip(slots, reqs):
        state.all_token_ids.gpu[s, : len(prompt)] = torch.tensor(prompt)
        state.prompt_len.np[s] = len(prompt)
    gen, rng = torch.Generator().manual_seed(0), random.Random(1)
    steps = 2 * layout.num_positions - 1
    for k in range(steps):
        logits = torch.randn(4, vocab, generator=gen)
        a = v1.apply(logits.clone()).argmax(-1)
        perm = list(range(4))
        rng.shuffle(perm)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor([slots[i] for i in perm]), idx_mapping=torch.tensor([slots[i] for i in perm]),
            idx_mapping_np=np.array([slots[i] for i in perm]), expanded_local_pos=torch.zeros(4, dtype=torch.long),
            input_ids=torch.zeros(4, dtype=torch.long),
            pos=torch.tensor([len(reqs[i][0]) - 1 + k for i in perm]),
            seq_lens_upper_bound_np=np.array([len(reqs[i][0]) + k for i in perm]),
        )
        b = v2.apply(logits[perm].clone(), ctx).argmax(-1)
        assert torch.equal(a[perm], b), k
        for i in range(3):
            outs[i].append(int(a[i]))
    order = to_extra_args(SamplingSettings(order=list(range(64))), 0)  # the plain image's raster order
    codes = [t - layout.code_offset for t in outs[2][0::2]]
    assert all(0 <= c < layout.codebook_size for c in codes) and outs[2][1::2] == [layout.pos_offset + c for c in order["rar_order"][1:]]
    assert outs[0] == outs[1]  # both branches of the guided image got the same tokens
    assert v1.unpaired_steps == v2.unpaired_steps == 0


def test_v2_rows_of_one_request_under_speculative_decoding(config):
    """A request owning several rows (draft positions) gets, at each, the token of its own step."""
    vllm_config, layout = config
    prompt, params = requests(layout)[2]  # the unguided image
    state = v2_state(4, layout.vocab_size)
    v2 = RARLogitsProcessor(vllm_config, state)
    v2.add_request(1, params)
    state.all_token_ids.gpu[1, :2] = torch.tensor(prompt)
    state.prompt_len.np[1] = 2
    logits = torch.randn(1, layout.vocab_size)
    single = []
    for k in (3, 4, 5):  # one row per step
        ctx = LogitsContext(torch.tensor([1]), torch.tensor([1]), np.array([1]), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long), torch.tensor([1 + k]), np.array([2 + k]))
        single.append(int(v2.apply(logits.clone(), ctx).argmax()))
    ctx = LogitsContext(torch.tensor([1, 1, 1]), torch.tensor([1]), np.array([1]), torch.arange(3),
                        torch.zeros(3, dtype=torch.long), torch.tensor([4, 5, 6]), np.array([8]))
    expanded = v2.apply(logits.repeat(3, 1), ctx).argmax(-1).tolist()
    assert expanded == single
    assert single[0] == layout.pos_offset + 2 and single[2] == layout.pos_offset + 3  # raster: positions 2 and 3


def test_v2_a_lone_guided_row_ends_its_image(config):
    vllm_config, layout = config
    (prompt, params), _ = requests(layout)[:2]
    state = v2_state(4, layout.vocab_size)
    v2 = RARLogitsProcessor(vllm_config, state)
    v2.add_request(0, params)
    state.all_token_ids.gpu[0, :2] = torch.tensor(prompt)
    state.prompt_len.np[0] = 2
    ctx = LogitsContext(torch.tensor([0]), torch.tensor([0]), np.array([0]), torch.zeros(1, dtype=torch.long),
                        torch.zeros(1, dtype=torch.long), torch.tensor([1]), np.array([2]))
    assert int(v2.apply(torch.randn(1, layout.vocab_size), ctx).argmax()) == layout.eoi
    assert v2.unpaired_steps == 1
