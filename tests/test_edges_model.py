"""Checkpoints and exports are checked whole: bad files give our one-line error, user files survive.

One test per case a tester found (issue 14), then a seeded fuzz over mutated checkpoint and export
folders: every case ends in success with the original data or in one of our errors, naming the file.
"""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rar_llm
from rar_llm.__main__ import USER_ERRORS
from rar_llm.checkpoint import load_checkpoint
from rar_llm.eval.evaluate import finite_json
from rar_llm.serve.export import export, import_hf


@pytest.fixture(scope="module")
def hf_folder(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("hf") / "hf")


def copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


def edit_weights(ckpt: Path, change) -> None:
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    change(state)
    torch.save(state, ckpt / "lit_model.pth")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.__setitem__("transformer.wte.weight", s["transformer.wte.weight"][:64]),
         r"do not fit the model config \(shapes \['transformer.wte.weight \(64, 128\)"),
        (lambda s: s.pop("lm_head.weight"), r"missing \['lm_head.weight'\]"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), r"unexpected \['extra.weight'\]"),
        (lambda s: s["transformer.h.0.attn.qkv.weight"].__setitem__((0, 0), float("nan")), "non-finite weights"),
    ],
)
def test_export_refuses_weights_that_do_not_fit_or_are_not_finite(tiny_checkpoint, tmp_path, change, message):
    ckpt = copy(tiny_checkpoint, tmp_path)
    edit_weights(ckpt, change)
    with pytest.raises(ValueError, match=message):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ValueError, match=message):
        rar_llm.load_model(ckpt)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b""), "not a torch checkpoint archive"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a torch checkpoint archive"),
        (lambda p: flip_middle_byte(p), "fails its checksum"),
    ],
)
def test_damaged_weight_files_name_the_file(tiny_checkpoint, tmp_path, damage, message):
    ckpt = copy(tiny_checkpoint, tmp_path)
    damage(ckpt / "lit_model.pth")
    with pytest.raises(ValueError, match=f"lit_model.pth: .*{message}"):
        load_checkpoint(ckpt)


def test_config_and_layout_files_that_are_not_json_or_yaml(tiny_checkpoint, tmp_path):
    ckpt = copy(tiny_checkpoint, tmp_path)
    (ckpt / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        rar_llm.load_model(ckpt)
    ckpt = copy(tiny_checkpoint, tmp_path, "c2")
    (ckpt / "model_config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="model_config.yaml: not a litgpt model config"):
        rar_llm.load_model(ckpt)
    ckpt = copy(tiny_checkpoint, tmp_path, "c3")
    cfg = yaml.safe_load((ckpt / "model_config.yaml").read_text()) | {"block_size": 100}
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="block_size 100 is shorter than the layout's 129-token"):
        rar_llm.load_model(ckpt)


def test_import_hf_checks_config_tensors_and_stray_files(hf_folder, tmp_path):
    bad = copy(hf_folder, tmp_path, "cfg")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(ValueError, match="do not fit"):
        import_hf(bad, tmp_path / "o1")
    stray = copy(hf_folder, tmp_path, "stray")
    shutil.copy(stray / "model.safetensors", stray / "model-old.safetensors")
    with pytest.raises(ValueError, match="2 .safetensors files .* no model.safetensors.index.json"):
        import_hf(stray, tmp_path / "o2")
    cut = copy(hf_folder, tmp_path, "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        import_hf(cut, tmp_path / "o3")
    (bad / "config.json").write_text("nope")
    with pytest.raises(ValueError, match="config.json: not a Llama config.json"):
        import_hf(bad, tmp_path / "o4")
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


def test_overwrite_keeps_what_the_user_put_there(tiny_checkpoint, hf_folder, tmp_path):
    out = tmp_path / "ckpt"
    import_hf(hf_folder, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite true"):
        import_hf(hf_folder, out)
    import_hf(hf_folder, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "other.safetensors").write_bytes(b"x")  # a weight file a loader would read beside ours
    with pytest.raises(FileExistsError, match="other weight files"):
        export(tiny_checkpoint, out, overwrite=True)


def test_metrics_json_is_strict(capsys):
    text = finite_json({"fd": float("nan"), "real": {"fd": float("inf"), "ok": 1.5}})
    assert json.loads(text) == {"fd": None, "real": {"fd": None, "ok": 1.5}}
    assert "metric fd is nan" in capsys.readouterr().out


def test_cli_reports_a_bad_checkpoint_in_one_line(tiny_checkpoint, tmp_path):
    ckpt = copy(tiny_checkpoint, tmp_path)
    (ckpt / "lit_model.pth").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "rar_llm", "export", "--checkpoint_dir", str(ckpt), "--out_dir",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("rar-llm export: error: ") and "lit_model.pth" in out.stderr


def mutate_json(path: Path, rng: random.Random) -> None:
    """Change one value of a JSON file (nested under rar_layout when there is one), or garble it."""
    text = path.read_text()
    if rng.random() < 0.3:
        cut = rng.randrange(len(text))
        path.write_text(text[:cut] + rng.choice(["", "}", "\x00", "[", '"'] ) + text[cut + rng.randrange(3):])
        return
    obj = json.loads(text)
    target = obj.get("rar_layout", obj)
    key = rng.choice(sorted(target))
    target[key] = rng.choice([None, -1, 0, 3, 2**40, "x", 1.5, [], {}, True, (target[key] or 0) + 1
                              if isinstance(target[key], int) and not isinstance(target[key], bool) else "y"])
    path.write_text(json.dumps(obj))


def mutate_bytes(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    kind = rng.randrange(3)
    if kind == 0:
        data = data[: rng.randrange(len(data))]
    elif kind == 1:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        data = bytearray(rng.randbytes(rng.randrange(1, 2000)))
    path.write_bytes(bytes(data))


def test_fuzz_checkpoint_and_export_folders(tiny_checkpoint, hf_folder, tmp_path):
    """Seeded mutations of each file; every case is success with the original weights or our error."""
    rng = random.Random(0)
    reference = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    outcomes: dict[str, int] = {}
    cases = 0
    for i in range(60):
        ckpt = copy(tiny_checkpoint, tmp_path, f"c{i}")
        name = rng.choice(["lit_model.pth", "lit_model.pth", "tokenizer_config.json", "model_config.yaml"])
        if name == "tokenizer_config.json":
            mutate_json(ckpt / name, rng)
        else:
            mutate_bytes(ckpt / name, rng)
        cases += 1
        try:
            config, layout, state = load_checkpoint(ckpt)
        except USER_ERRORS as e:
            assert str(ckpt) in str(e) or name in str(e), e
            outcomes["error"] = outcomes.get("error", 0) + 1
        else:
            assert all(torch.equal(state[k], v) for k, v in reference.items()), f"{name}: silently different weights"
            assert layout.vocab_size == config.vocab_size
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        shutil.rmtree(ckpt)
    for i in range(30):
        hf = copy(hf_folder, tmp_path, f"h{i}")
        name = rng.choice(["model.safetensors", "config.json", "tokenizer_config.json"])
        if name.endswith(".json"):
            mutate_json(hf / name, rng)
        else:  # safetensors has no checksum: flipped data bytes cannot be told, so cut or replace the file
            data = (hf / name).read_bytes()
            (hf / name).write_bytes(data[: rng.randrange(len(data))] if rng.random() < 0.7 else rng.randbytes(500))
        cases += 1
        try:
            import_hf(hf, tmp_path / f"o{i}")
        except USER_ERRORS as e:
            assert str(hf) in str(e) or name in str(e), e
            outcomes["error"] = outcomes.get("error", 0) + 1
        else:
            _, _, state = load_checkpoint(tmp_path / f"o{i}")
            assert all(torch.equal(state[k], v) for k, v in reference.items()), f"{name}: silently different weights"
            outcomes["imported"] = outcomes.get("imported", 0) + 1
        shutil.rmtree(hf)
    print(f"fuzz: {cases} cases, outcomes {outcomes}")
    assert cases == 90 and outcomes.get("error", 0) > 40


def test_a_layout_edited_to_another_grid_of_as_many_cells_is_caught(tmp_path, digits_dir, tiny_checkpoint):
    """The weights cannot tell 4x16 from 8x8; a training output names its data, which can."""
    ckpt = copy(tiny_checkpoint, tmp_path)
    (ckpt / "hyperparameters.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"data_dir": str(digits_dir)}}}))
    assert rar_llm.load_model(ckpt).layout.height == 8
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["rar_layout"] |= {"height": 4, "width": 16}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layout does not describe the data \(height \(8 vs 4\), width \(8 vs 16\)"):
        rar_llm.load_model(ckpt)
