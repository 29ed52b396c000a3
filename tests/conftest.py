import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """scikit-learn's digits as shards (train / val), written once per test session."""
    from rar_llm.prepare import digits

    return digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised rar-tiny checkpoint folder on the digits layout."""
    from rar_llm.init import init

    return init(tmp_path_factory.mktemp("ckpt") / "rar-tiny-digits", model="rar-tiny", layout="digits")
