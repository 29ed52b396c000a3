"""The documentation runs as written: README.md and every docs/*.md page.

Each page runs in a fresh working directory holding small stand-ins for what its commands expect
(a random rar-tiny checkpoint where a trained one is named, the digits shards, a tiny text model as the
"pretrained LLM", a few JSONL lines, images and Fashion-MNIST-style IDX files): its ```python blocks in
order in one namespace, and, in page order between them, every ``rar-llm ...`` command of its ```bash
blocks (in-process, through the CLI's ``main``) and every ``python -m rar_llm.serve.client`` command up to
the point where it would contact its server. Other shell lines (pip, litgpt, python bench/...) are not run.
A command that needs a download or takes minutes is named in ``RULES`` with its reason: it is skipped, or
runs alone under the ``slow`` marker; a block that needs vLLM runs under ``slow`` where vLLM is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rar_llm.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|"}
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: the client fails at its first request

# (a substring of the command or block, "skip" | "slow" | "vllm", why)
RULES = [
    ("rar-llm demo", "slow", "trains a model for minutes"),
    ("--tokenizer maskgit-vqgan", "skip", "needs MaskGIT-VQGAN's released weights (a download); "
                                          "tests/test_tokenizers.py runs tokenize on a state dict it writes"),
    ("--inception_weights", "skip", "needs the Inception-v3 weights and a trained ImageNet model (downloads)"),
    ("rar-llm web", "skip", "serves until stopped; tests/test_web.py starts it and drives it over HTTP and in Chromium"),
    ("rar-llm watch", "skip", "follows a training run until it ends; tests/test_watch.py runs it beside litgpt"),
    ("gradio_client", "skip", "needs a running rar-llm web server; tests/test_web.py runs this call against one"),
    ("make_llm", "vllm", "needs vLLM (its own venv, docs/serving.md)"),
]


@dataclass
class Step:
    page: str
    kind: str  # "python", "rar-llm" or "client"
    text: str  # the block, or the command line
    argv: list[str]


def rule(text: str) -> tuple[str, str] | None:
    for key, kind, why in RULES:
        if key in text:
            return kind, why
    return None


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at ``&&``, ``;``, ..."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words + [";"]:
            if word in SEPARATORS:
                while current and re.fullmatch(r"[A-Z_]+=\S*", current[0]):  # VAR=value prefixes
                    current = current[1:]
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def steps(page: str) -> list[Step]:
    out = []
    for lang, body in FENCE.findall((ROOT / page).read_text()):
        if lang == "python":
            out.append(Step(page, "python", body, []))
        elif lang == "bash":
            for argv in commands(body):
                line = shlex.join(argv)
                if argv[0] == "rar-llm":
                    out.append(Step(page, "rar-llm", line, argv[1:]))
                elif argv[:3] == ["python", "-m", "rar_llm.serve.client"]:
                    out.append(Step(page, "client", line, argv[3:]))
    return out


ALL_STEPS = [s for page in PAGES for s in steps(page)]
SET_ASIDE = [s for s in ALL_STEPS if rule(s.text)]
RUNNABLE = [page for page in PAGES if steps(page)]  # gpus.md holds only python bench/... commands


# ---- the stand-ins ------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-style IDX file (unsigned bytes)."""
    array = np.asarray(array, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def fashion_files(folder: Path) -> Path:
    """Fashion-MNIST's four files with 40 train and 20 test images of class-dependent bars."""
    from rar_llm.data.fashion import FILES

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 250
        for name, array in zip(FILES[split], (images, labels)):
            write_idx(folder / name, array)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_checkpoint, digits_dir) -> Path:
    """A template working directory with what the pages' commands and blocks name, made once."""
    from test_extend import make_base

    from rar_llm.checkpoint import init
    from rar_llm.extend import extend

    root = tmp_path_factory.mktemp("docs-world")
    shutil.copytree(tiny_checkpoint, root / "out/demo/train/final")  # stands in for the demo's trained model
    shutil.copytree(digits_dir, root / "out/demo/data")
    init(root / "out/rar-tiny-mixed/final", model="rar-tiny", layout="digits_pydoc")  # a mixed model, untrained
    base = make_base(root / "checkpoints/HuggingFaceTB/SmolLM2-135M", "llama")  # a tiny "pretrained LLM"
    extend(base, "digits", root / "out/extended-digits/final")
    rng = np.random.default_rng(0)
    with open(root / "maskgitvq.jsonl", "w") as f:  # RAR's line form, 1024 codes on 16x16, 1000 classes
        for i in range(20):
            f.write(json.dumps({"class_id": i * 37 % 1000, "tokens": rng.integers(0, 1024, 256).tolist()}) + "\n")
    for c, name in enumerate(["circle", "square"]):
        (root / "icons" / name).mkdir(parents=True)
        for i in range(50):  # 100 images: tokenize's default val_fraction (0.01) holds out one
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "icons" / name / f"{i}.png")
    fashion_files(root / "fashion-mnist")
    return root


@pytest.fixture
def workdir(world, tmp_path, monkeypatch) -> Path:
    shutil.copytree(world, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fashion-mnist"))
    return tmp_path


# ---- running ------------------------------------------------------------------------------------------
def run_cli(step: Step, capsys) -> None:
    try:
        main(list(step.argv))
    except SystemExit as e:
        if e.code not in (0, None):
            pytest.fail(f"{step.page}: `{step.text}` exited {e.code}: {capsys.readouterr().err.strip()[-2000:]}")


def run_client(step: Step, capsys) -> None:
    """The client's flags parse into valid settings: it gets as far as asking a closed local port."""
    from rar_llm.serve import client

    argv = list(step.argv)
    if "--url" in argv:
        argv[argv.index("--url") + 1] = CLOSED_PORT
    else:
        argv += ["--url", CLOSED_PORT]
    try:
        client.main(argv)
    except SystemExit as e:  # exit 2: a value refused; exit 1: the server could not be reached
        err = capsys.readouterr().err
        if e.code == 1 and f"{CLOSED_PORT}/v1/models: cannot reach the server" in err:
            return
        pytest.fail(f"{step.page}: `{step.text}` stopped before the server (exit {e.code}): {err[-1000:]}")
    pytest.fail(f"{step.page}: `{step.text}` finished without a server")


def run_page(page: str, capsys, with_vllm: bool = False) -> None:
    scope: dict = {"__name__": "__main__"}
    for step in steps(page):
        found = rule(step.text)
        if found and not (with_vllm and found[0] == "vllm"):
            continue
        if step.kind == "python":
            try:
                exec(compile(step.text, f"{page} (python block)", "exec"), scope)
            except Exception as e:
                raise AssertionError(f"{page}: a python block failed: {type(e).__name__}: {e}\n{step.text}") from e
        elif step.kind == "rar-llm":
            run_cli(step, capsys)
        else:
            run_client(step, capsys)


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs_as_written(page, workdir, capsys):
    run_page(page, capsys)


def test_most_pages_run_something():
    assert set(PAGES) - set(RUNNABLE) == {"docs/gpus.md"}, "a page lost its last python block or rar-llm command"


def set_aside_param(step: Step):
    kind = rule(step.text)[0]
    return pytest.param(step, marks=[pytest.mark.slow] if kind != "skip" else [], id=f"{step.page}: {step.text[:60]}")


@pytest.mark.parametrize("step", [set_aside_param(s) for s in SET_ASIDE])
def test_set_aside(step, tmp_path, monkeypatch, capsys, request):
    """Each command set aside: skipped with its reason, or (slow marker) run alone in an empty folder."""
    kind, why = rule(step.text)
    if kind == "skip":
        pytest.skip(why)
    if kind == "vllm":
        pytest.importorskip("vllm", reason=why)
        request.getfixturevalue("workdir")
        run_page(step.page, capsys, with_vllm=True)
        return
    monkeypatch.chdir(tmp_path)
    run_cli(step, capsys)


def test_every_rule_names_something_the_docs_hold():
    for key, _, _ in RULES:
        assert any(key in s.text for s in ALL_STEPS), f"RULES names {key!r}, which no page holds any more"


def test_the_setup_commands_are_what_ci_runs():
    """The README's first block: the demo and the tests, installed exactly as ``.ci/run`` installs them."""
    ci = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install"))
    ci = re.sub(r"pip install -q ", "pip install ", ci)
    first = FENCE.findall((ROOT / "README.md").read_text())[0]
    lines = [line.split("  #")[0].strip() for line in first[1].strip().splitlines()]
    assert first[0] == "bash" and len(lines) == 2
    assert lines[1] == ci
    install = ci.rsplit(" && ", 1)[0]
    assert lines[0] == install + " && rar-llm demo --out_dir out/demo"


def test_illustrations_are_not_tagged_python():
    """Every ```python block is executable code (prompts, outputs and layouts are ```text)."""
    for page in PAGES:
        for lang, body in FENCE.findall((ROOT / page).read_text()):
            if lang == "python":
                compile(body, page, "exec")
            assert lang in ("python", "bash", "text", "yaml", "json"), f"{page}: untagged or unknown block ```{lang}"
