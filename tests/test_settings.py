"""The one sampling settings dataclass: its checks, its presets, its vLLM request form, the CLI group, the client."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from jsonargparse import capture_parser

from rar_llm.sampling.settings import (
    FIELDS,
    KEY,
    RAR_PRESETS,
    VLLM_FIELDS,
    SamplingSettings,
    from_extra_args,
    to_extra_args,
)


@pytest.mark.parametrize(
    "settings, seed, pair",
    [
        (SamplingSettings(order=[3, 0, 2, 1]), 0, None),
        (SamplingSettings(guidance=4.0, schedule="power_cosine", power=2.75, temperature=0.0, top_k=5, top_p=0.9,
                          order=[1, 0]), 2**62 - 1, "call-7"),
        (replace(RAR_PRESETS["rar-xl"], order=list(range(16))), 11, "abc-0"),
    ],
)
def test_extra_args_round_trip(settings, seed, pair):
    args = to_extra_args(settings, seed, pair)
    assert set(args) <= set(KEY.values())
    assert json.loads(json.dumps(args)) == args  # flat JSON values: what the server's vllm_xargs carries
    assert from_extra_args(args) == (settings, seed, pair)


def test_vllm_request_form_edges():
    assert from_extra_args(None) is None and from_extra_args({"other": 1}) is None  # not a RAR request
    assert from_extra_args({"rar_order": [2, 0], "rar_top_k": 0})[0].top_k is None  # 0 / -1: off, as vLLM's top_k
    assert from_extra_args({"rar_order": [2, 0]}) == (SamplingSettings(order=[2, 0]), 0, None)
    with pytest.raises(ValueError, match=r"steps \(parallel decoding\) is not supported on vLLM"):
        to_extra_args(SamplingSettings(order=[0, 1], steps=1), 0)


@pytest.mark.parametrize(
    "extra_args, message",
    [
        ({"rar_guidance": 2.0}, "RAR request without rar_order (got ['rar_guidance'])"),
        ({"rar_order": [0], "rar_bogus": 1}, "unknown RAR settings ['rar_bogus']"),
        ({"rar_order": []}, "rar_order must be a non-empty list of cell indices"),
        ({"rar_order": [0, -1]}, "rar_order must be a non-empty list of cell indices"),
        ({"rar_order": [1, 1]}, "rar_order lists a cell twice"),
        ({"rar_order": [0], "rar_top_k": 2.5}, "rar_top_k=2.5 must be an integer or absent"),
        ({"rar_order": [0], "rar_guidance": 2.0}, "guided RAR request without rar_pair"),
        ({"rar_order": [0], "rar_top_p": 0}, "top_p=0.0 must be in (0, 1]"),
        ({"rar_order": [0], "rar_schedule": "cosine"}, "unknown guidance schedule 'cosine'"),
        ({"rar_order": [0], "rar_temperature": -1}, "temperature=-1.0 must be >= 0"),
        ({"rar_order": [0], "rar_power": [2]}, "rar_power=[2] must be a number"),
    ],
)
def test_bad_requests_are_refused(extra_args, message):
    with pytest.raises(ValueError) as e:
        from_extra_args(extra_args)
    assert message in str(e.value)


def test_presets_are_named_settings():
    assert list(RAR_PRESETS) == ["rar-b", "rar-l", "rar-xl", "rar-xxl"]
    assert all(isinstance(p, SamplingSettings) and p.schedule == "power_cosine" and p.order == "raster"
               for p in RAR_PRESETS.values())
    assert RAR_PRESETS["rar-l"] == SamplingSettings(guidance=15.5, schedule="power_cosine", power=2.5, temperature=1.02)


def test_settings_and_the_client_import_without_torch():
    probe = ("import sys, rar_llm.sampling.settings, rar_llm.serve.client, rar_llm.serve; "
             "print('torch' in sys.modules, rar_llm.serve.client.UnpairedGuidanceError is rar_llm.serve.UnpairedGuidanceError)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"


def test_client_flags_are_the_request_fields():
    import argparse

    from rar_llm.serve import client

    ap = argparse.ArgumentParser()
    client.add_sampling_arguments(ap)
    args = ap.parse_args(["--guidance", "3", "--schedule", "linear", "--top_k", "4", "--order", "random"])
    assert set(vars(args)) == set(VLLM_FIELDS) == set(FIELDS) - {"steps"}
    assert SamplingSettings(**vars(args)) == SamplingSettings(guidance=3.0, schedule="linear", top_k=4, order="random")
    with pytest.raises(SystemExit):
        ap.parse_args(["--schedule", "cosine"])


def test_client_requests_carry_the_settings(monkeypatch):
    """The client's requests, read back as the server's plugin reads them; its codes land in their cells."""
    from rar_llm.serve import UnpairedGuidanceError, client

    layout = client.Layout({"codebook_size": 17, "height": 2, "width": 3, "num_classes": 4})
    sent, short = [], set()

    def server(url, body, timeout):  # both branches of an image answer the same tokens, as RAR's plugin does
        sent.append(body)
        settings, seed, pair = from_extra_args(body["vllm_xargs"])
        toks = []
        for j, cell in enumerate(settings.order):
            toks += ([layout.pos_offset + cell] if j else []) + [layout.code_offset + (7 * cell + seed) % 17]
        if body["prompt"][0] == layout.null_class and pair in short:
            toks = toks[:3]  # this pair lost lockstep on the server
        return {"choices": [{"token_ids": toks}]}

    monkeypatch.setattr(client, "_post", server)
    settings = SamplingSettings(guidance=3.0, schedule="power_cosine", power=1.5, top_k=5, order="random")
    codes = client.generate("http://x", [2, 0], layout, "m", settings=settings, seed=1, temperature=0.5)
    assert codes.shape == (2, 2, 3) and len(sent) == 4
    for b in range(2):
        cond, null = sorted(sent[2 * b : 2 * b + 2], key=lambda body: body["prompt"][0])
        assert cond["prompt"][0] == layout.class_offset + [2, 0][b] and null["prompt"][0] == layout.null_class
        got, seed, pair = from_extra_args(cond["vllm_xargs"])
        assert cond["vllm_xargs"] == null["vllm_xargs"] and pair
        assert got == replace(settings, temperature=0.5, order=got.order) and sorted(got.order) == list(range(6))
        assert cond["prompt"][1] == layout.pos_offset + got.order[0]
        want = np.array([(7 * cell + seed) % 17 for cell in range(6)]).reshape(2, 3)
        assert (codes[b] == want).all()

    monkeypatch.setattr(client.uuid, "uuid4", lambda: type("U", (), {"hex": "fixedcallid0"})())
    short.add("fixedcallid0-1")  # the second image's pair comes back short
    with pytest.raises(UnpairedGuidanceError, match="1 of 2 images came back short"):
        client.generate("http://x", [2, 0], layout, "m", settings=settings, seed=1)
    with pytest.raises(TypeError, match="generate\\(\\) got unexpected keyword argument\\(s\\) guidence"):
        client.generate("http://x", [2], layout, "m", guidence=2.0)


def test_sample_cli_takes_one_settings_group_and_presets(tmp_path):
    from rar_llm.__main__ import main
    from rar_llm.sampling.cli import with_preset

    argv = ["sample", "--checkpoint_dir", "x", "--sampling.guidance", "3", "--sampling.order", "random",
            "--sampling.top_k", "4", "--preset", "rar-b"]
    cfg = capture_parser(lambda: main(argv)).parse_args(argv)
    assert cfg.sample.preset == "rar-b"
    assert (cfg.sample.sampling.guidance, cfg.sample.sampling.order, cfg.sample.sampling.top_k) == (3.0, "random", 4)
    given = SamplingSettings(guidance=3.0, order="random", top_k=4)
    assert with_preset(given, "rar-b") == replace(RAR_PRESETS["rar-b"], order="random", top_k=4)
    env = dict(os.environ, RAR_LLM_DEBUG="")
    out = subprocess.run([sys.executable, "-m", "rar_llm", "sample", "--checkpoint_dir", str(tmp_path),
                          "--sampling.top_p", "0"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "top_p=0.0 must be in (0, 1]" in out.stderr
