import copy
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402  (after OMP_NUM_THREADS: OpenMP reads it when torch loads it)


def _devices() -> list[str]:
    """The CPU, plus CUDA where a GPU is visible; ``RAR_TEST_DEVICES=cuda`` (comma-separated) picks them instead."""
    forced = os.environ.get("RAR_TEST_DEVICES", "")
    if forced.strip():
        return [d.strip() for d in forced.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """Each device the device-sensitive tests run on (ids ``[cpu]``, ``[cuda]``; ``-k cuda`` selects the GPU's)."""
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    return torch.device(request.param)


@pytest.fixture(scope="session")
def on_device():
    """``on_device(module, device)``: the module itself on the CPU, else a copy on ``device`` made once per session."""
    copies: dict[tuple[int, str], tuple[torch.nn.Module, torch.nn.Module]] = {}

    def on(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
        if torch.device(device).type == "cpu":
            return module
        key = (id(module), str(device))
        if key not in copies:  # the original is kept alive with its copy, so its id is not reused
            copies[key] = (module, copy.deepcopy(module).to(device))
        return copies[key][1]

    return on


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """scikit-learn's digits as shards (train / val), written once per test session."""
    from rar_llm.data.digits import digits

    return digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised rar-tiny checkpoint folder on the digits layout."""
    from rar_llm.checkpoint import init

    return init(tmp_path_factory.mktemp("ckpt") / "rar-tiny-digits", model="rar-tiny", layout="digits")
