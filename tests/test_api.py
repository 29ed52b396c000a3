"""The package as users call it: `rar_llm.generate(model, class_id)`, the README's examples, the CLI's errors."""

import dataclasses
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import capture_parser
from litgpt.finetune import full

import rar_llm
from rar_llm.sampling import loop as sampling
from rar_llm.__main__ import COMMANDS, command, main
from rar_llm.demo import recipe
from rar_llm.serve.export import export
from rar_llm.checkpoint import init
from rar_llm.sampling.loop import generate_from_prompt
from rar_llm.text.merged import encode_prompt

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_public_api_resolves_every_name_it_lists():
    vllm_missing = importlib.util.find_spec("vllm") is None
    for name in rar_llm.__all__:
        if vllm_missing and name in ("vllm_generate", "make_llm"):
            with pytest.raises(ImportError, match="vllm"):
                getattr(rar_llm, name)
            continue
        obj = getattr(rar_llm, name)
        assert getattr(obj, "__name__", name) == name, (name, obj)
    assert rar_llm.generate is rar_llm.sampling.loop.generate  # a function, never shadowed by a module
    assert rar_llm.RAR_PRESETS["rar-b"] == rar_llm.SamplingSettings(16.0, "power_cosine", 2.75, 1.0)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rar_llm.nope


def test_import_needs_no_litgpt():
    probe = "import sys, rar_llm; rar_llm.VocabLayout.load('digits'); rar_llm.interleave; print('litgpt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_python_examples_run(tmp_path, tiny_checkpoint, monkeypatch):
    """Every ```python block of the README, on tiny checkpoints made here at the paths it names."""
    blocks = [b for b in readme_python_blocks() if "vllm" not in b]  # vLLM's block: tests/test_vllm.py (slow)
    assert len(blocks) >= 2
    shutil.copytree(tiny_checkpoint, tmp_path / "out" / "demo" / "train" / "final")
    imagenet = init(tmp_path / "ckpt-imagenet", model="rar-tiny", layout="maskgit_imagenet")
    export(imagenet, tmp_path / "export" / "rar-b-hf")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        assert isinstance(scope["codes"], torch.Tensor) and scope["codes"].dtype == torch.long


def test_generate_uses_the_layout_the_model_carries(tiny_checkpoint):
    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    assert model.layout == rar_llm.VocabLayout.load("digits") and model.max_seq_length >= model.layout.seq_len
    assert rar_llm.generate(model, 3).shape == (1, 8, 8)
    assert torch.equal(rar_llm.generate(model, [1, 2], seed=0), rar_llm.generate(model, [1, 2], seed=0,
                                                                                  layout="digits"))
    bare = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    del bare.layout
    with pytest.raises(ValueError, match="carries no vocabulary layout: load it with rar_llm.load_model"):
        rar_llm.generate(bare, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (2.7, "class id 2.7 is not an integer"),
        (True, "class id True is not an integer"),
        ([[1, 2]], r"class id \[1, 2\] is not an integer"),
        (torch.tensor([1.0]), "integer tensor"),
        (torch.tensor([[1]]), "1-D tensor"),
        (11, r"outside this layout's classes 0..9"),
    ],
)
def test_class_ids_are_taken_as_documented(tiny_checkpoint, bad, message):
    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        rar_llm.generate(model, bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
        (dict(guidance=float("inf")), "guidance=inf must be a finite number"),
        (dict(top_p=float("nan")), "top_p=nan must be a finite number"),
        (dict(top_k=2.5), "top_k=2.5 must be an integer"),
        (dict(steps=2.0), "steps=2.0 must be an integer"),
        (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
    ],
)
def test_sampling_settings_are_checked(tiny_checkpoint, kwargs, message):
    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=re.escape(message)):
        rar_llm.generate(model, 1, **kwargs)


def test_large_batches_run_in_chunks_with_the_same_result(tiny_checkpoint, monkeypatch):
    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    whole = rar_llm.generate(model, list(range(10)), guidance=2.0, temperature=0)
    need = model.layout.seq_len
    per_image = 2 * model.config.n_layer * 2 * need * model.config.n_query_groups * model.config.head_size * 4
    monkeypatch.setattr(sampling, "CACHE_BUDGET", 3 * per_image)  # three images per chunk
    assert sampling.chunk_size(model, 2, need, None) == 3
    calls = []
    decode = sampling.decode_grids
    monkeypatch.setattr(sampling, "decode_grids", lambda m, l, prefixes, *a, **k: calls.append(len(prefixes[0]))
                        or decode(m, l, prefixes, *a, **k))
    chunked = rar_llm.generate(model, list(range(10)), guidance=2.0, temperature=0)
    assert calls == [3, 3, 3, 1] and torch.equal(chunked, whole)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    out = init(tmp_path_factory.mktemp("ckpt") / "mixed", model="rar-tiny", layout="digits_pydoc")
    model = rar_llm.load_model(out, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # peaked logits, so each sampled code depends on its context
        for p in model.parameters():
            p.mul_(6.0) if p.dim() > 1 else None
    return model


def test_prompted_guided_random_parallel_generation_equals_a_full_forward_reference(text_model, monkeypatch):
    """Each step's guided logits equal those of the whole sequence run without any cache, recomputed here."""
    model, layout = text_model, text_model.layout
    seen = []
    real = sampling.sample_codes

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_codes", spy)
    g, steps, n = 3.0, 12, layout.num_positions
    codes = generate_from_prompt(model, "a handwritten two", num_samples=2, guidance=g, schedule="linear",
                                 order="random", steps=steps, seed=4)
    assert len(seen) == steps
    # the order the sampler drew: replay the generator
    gen = torch.Generator().manual_seed(4)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(2)])
    prompt = encode_prompt(layout, "a handwritten two") + [layout.boi]
    counts = rar_llm.sampling.decoding.parallel_schedule(n, steps)
    done = 0
    code_ids = slice(layout.code_offset, layout.class_offset)
    for step, k in enumerate(counts):
        rows = []
        for prefix in (prompt, [layout.boi]):
            batch = []
            for b in range(2):
                cells = perm[b, : done + k].tolist()
                seq = list(prefix)
                for j, cell in enumerate(cells):
                    seq.append(layout.pos_offset + cell)
                    if j < done:
                        seq.append(layout.code_offset + int(codes[b].view(-1)[cell]))
                batch.append(seq)
            with torch.inference_mode():
                logits = model(torch.tensor(batch))[:, -k:, code_ids].float()
            rows.append(logits)
        scale = rar_llm.sampling.decoding.guidance_scale(g, done, n, "linear")
        want = rows[1] + scale * (rows[0] - rows[1])
        torch.testing.assert_close(seen[step], want, atol=2e-5, rtol=2e-5)
        done += k


def test_demo_recipe_parses_with_litgpt(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, steps=10, batch_size=8, lr=1e-3, seed=0), sort_keys=False))
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(full.setup)
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(path)]))
    assert type(cfg.data).__name__ == "RARData" and cfg.data.total_samples == 80 and cfg.train.max_steps == 10


def _value(annotation, default):
    """A valid command-line value for a parameter (its default, or a plausible one when it has none)."""
    if dataclasses.is_dataclass(default):  # a group (e.g. --sampling): its fields as one YAML mapping
        default = dataclasses.asdict(default)
    if default is not inspect.Parameter.empty and default is not None:
        return yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(
            default, (str, Path)) else str(default)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str(args[0])
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _value(next(a for a in args if a is not type(None)), default)
    if annotation in (int, float):
        return "1"
    if typing.get_origin(annotation) is list:
        return f"[{_value(args[0], inspect.Parameter.empty)}]"
    return "x"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_parses_its_flags(name):
    fn = command(name)
    argv = [name]
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        argv += [f"--{p.name}", _value(hints.get(p.name), p.default)]
    parser = capture_parser(lambda: main(argv))
    cfg = parser.parse_args(argv)
    assert cfg.subcommand == name


def test_cli_user_errors_print_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, RAR_LLM_DEBUG="")
    out = subprocess.run([sys.executable, "-m", "rar_llm", "sample", "--checkpoint_dir", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("rar-llm sample: error: ")
    assert "missing" in out.stderr and "Traceback" not in out.stderr
    debug = subprocess.run([sys.executable, "-m", "rar_llm", "--debug", "sample", "--checkpoint_dir",
                            str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("flags, says", [
    (["--val_fraction", "abc"], "rar-llm digits: error: --val_fraction: expected a float, got 'abc'"),
    (["--seed", "1", "--bogus", "3"], "rar-llm digits: error: Unrecognized arguments: --bogus 3"),
])
def test_flags_the_parser_rejects_are_one_line_and_exit_2(flags, says):
    out = subprocess.run([sys.executable, "-m", "rar_llm", "digits", *flags], capture_output=True, text=True,
                         env=dict(os.environ, RAR_LLM_DEBUG=""))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(says), out.stderr


def test_help_lists_closed_choices():
    parser = capture_parser(lambda: main(["sample", "--checkpoint_dir", "x"]))
    text = parser._subcommands_action.choices["sample"].format_help()
    for choice in ("{constant,linear,power_cosine}", "{auto,float32,bfloat16,float16}", "spiral_in"):
        assert choice in text
    parser = capture_parser(lambda: main(["init", "--out_dir", "x"]))  # a parser holds the command it runs
    assert "{normal,sincos}" in parser._subcommands_action.choices["init"].format_help()


def test_help_without_a_command_lists_every_command_and_imports_none():
    code = ("import sys; from rar_llm.__main__ import main\n"
            "try: main(['--help'])\n"
            "except SystemExit as e: print(e.code)\n"
            "print(sorted(m for m in sys.modules if m.startswith('rar_llm.')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *listing, code_line, modules = out.strip().splitlines()
    assert code_line == "0" and modules == "['rar_llm.__main__'] False"
    for name in COMMANDS:
        assert any(line.split()[:1] == [name] for line in listing), name


@pytest.mark.parametrize("argv", [["bogus"], []])
def test_an_unknown_or_missing_command_is_one_line(argv):
    out = subprocess.run([sys.executable, "-m", "rar_llm", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "import-jsonl" in out.stderr


def test_a_command_imports_only_its_own_module():
    import subprocess
    import sys

    code = ("import sys; from rar_llm.__main__ import main\n"
            "try: main(['import-jsonl', '--help'])\n"
            "except SystemExit: pass\n"
            "print('litgpt' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"  # rar-llm import-jsonl starts in a fraction of a second


def test_a_folder_never_shadows_a_layout_name(tmp_path, monkeypatch):
    (tmp_path / "digits").mkdir()  # an unrelated folder named like a packaged layout
    monkeypatch.chdir(tmp_path)
    assert rar_llm.VocabLayout.load("digits").codebook_size == 17
    with pytest.raises(FileNotFoundError, match="is not an rar_llm checkpoint folder"):
        rar_llm.VocabLayout.load("./digits")  # a path: the empty folder is read as a checkpoint, and refused
    with pytest.raises(FileNotFoundError, match=r"no named layout 'nope'.*\./nope"):
        rar_llm.VocabLayout.load("nope")


def _package_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the rar_llm modules it imports anywhere (top level or in functions); private names imported."""
    import ast

    pkg = ROOT / "rar_llm"
    modules = {".".join(("rar_llm", *p.relative_to(pkg).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rar_llm"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
                    if a.name.startswith("_") and full not in modules:
                        private.append(f"{name} imports {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rar_llm")}
        graph[name] = {d for d in deps if d not in (name, "rar_llm")}
    return graph, private


def test_dependencies_point_one_way():
    graph, private = _package_imports()
    assert not private, private
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for dep in graph.get(node, ()):
            visit(dep, path + (node,))
        done.add(node)

    for module in graph:
        visit(module, ())
    for module, deps in graph.items():
        for dep in deps:
            assert layer(dep) <= layer(module), f"{module} (layer {layer(module)}) imports {dep} (layer {layer(dep)})"


# The package's layers, bottom first: a module imports only from its own layer or below (the folders'
# __init__ docstrings say the same). Layers 0 and 1 need no litgpt.
LAYERS = [
    ["rar_llm.vocab", "rar_llm.permute", "rar_llm.outputs", "rar_llm.nets", "rar_llm.sampling.settings",
     "rar_llm.data.shards"],
    ["rar_llm.text", "rar_llm.tokenizers", "rar_llm.sampling.decoding", "rar_llm.sampling.speculative",
     "rar_llm.optim"],
    ["rar_llm.configs", "rar_llm.checkpoint"],
    ["rar_llm.sampling"],
    ["rar_llm.data", "rar_llm.eval", "rar_llm.serve", "rar_llm.extend", "rar_llm.tokenizers.train_vq",
     "rar_llm.watch"],
    ["rar_llm.sampling.cli", "rar_llm.demo", "rar_llm.__main__", "rar_llm"],
]


def layer(module: str) -> int:
    """The layer of the longest ``LAYERS`` entry that ``module`` is or lies under."""
    best = max((name for names in LAYERS for name in names if module == name or module.startswith(name + ".")),
               key=len)
    return next(i for i, names in enumerate(LAYERS) if best in names)


def test_the_two_bottom_layers_import_without_litgpt():
    graph, _ = _package_imports()
    bottom = sorted(m for m in graph if layer(m) <= 1)
    probe = f"import sys; import {', '.join(bottom)}; print('litgpt' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False", bottom


def test_prepacking_falls_back_to_plain_layers_when_onednn_fails(tiny_checkpoint, monkeypatch):
    from rar_llm.sampling import prepack

    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    want = rar_llm.generate(model, [1, 2], seed=0, prepack=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no such op in this build")

    monkeypatch.setattr(prepack, "packable", lambda m: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken, raising=False)
    with pytest.warns(UserWarning, match="prepacking failed"):
        got = rar_llm.generate(model, [1, 2], seed=0)
    assert torch.equal(got, want)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_known_mask_of_the_wrong_shape_gets_our_message(tiny_checkpoint):
    model = rar_llm.load_model(tiny_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"known_mask has shape \(3, 3\); expected \(8, 8\)"):
        rar_llm.generate(model, [1, 2], known=torch.zeros(8, 8, dtype=torch.long),
                         known_mask=torch.zeros(3, 3, dtype=torch.bool))
