import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from litgpt.tokenizer import Tokenizer

from rar_llm.vocab import ADAPTERS_DIR, VocabLayout


def test_imagenet_layout_ids_are_disjoint_and_padded():
    v = VocabLayout.load("maskgit_imagenet")
    assert (v.code_offset, v.class_offset, v.null_class, v.pos_offset, v.boi, v.eoi) == (0, 1024, 2024, 2025, 2281, 2282)
    assert v.vocab_size == 2283 and v.padded_vocab_size == 2304 and v.seq_len == 513
    names = [v.token_name(i) for i in range(v.padded_vocab_size)]
    assert len(set(names)) == len(names)
    assert names[17] == "<img_17>" and names[1027] == "<class_3>" and names[2024] == "<class_null>"
    assert names[2025 + 42] == "<pos_42>" and names[2281] == "<boi>" and names[-1] == "<unused_20>"


def test_text_vocab_shifts_every_image_id():
    v = VocabLayout(17, 8, 8, 10, text_vocab_size=1000)
    assert v.code_offset == 1000 and v.token_name(999) == "<text_999>" and v.token_name(1000) == "<img_0>"


def test_every_adapter_loads():
    files = sorted(ADAPTERS_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {"maskgit_imagenet", "digits", "llamagen_vq16_imagenet"}
    for f in files:
        assert VocabLayout.load(f).vocab_size > 0


def test_save_load_round_trip(tmp_path):
    v = VocabLayout(1024, 16, 16, 1000, pad_multiple=128)
    v.save(tmp_path / "l.json")
    assert VocabLayout.load(tmp_path / "l.json") == v


def test_bad_layouts_fail_clearly(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"codebook_size": 4, "height": 2, "width": 2, "num_clases": 3}))
    with pytest.raises(ValueError, match="num_clases"):
        VocabLayout.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="maskgit_imagenet"):
        VocabLayout.load("no_such_layout")
    with pytest.raises(ValueError, match="codebook_size must be >= 1"):
        VocabLayout(0, 2, 2, 2)


def test_out_of_range_ids_name_the_value():
    v = VocabLayout.load("digits")
    with pytest.raises(ValueError, match=r"class id 10 is outside this layout's classes 0..9"):
        v.class_token(10)
    with pytest.raises(ValueError, match=r"\[-1, 12\]"):
        v.class_tokens([3, -1, 12])
    with pytest.raises(ValueError, match=r"code 17 is outside the codebook 0..16"):
        v.check_codes([0, 16, 17])


def test_checkpoint_tokenizer_names_every_id_and_loads_in_litgpt(tiny_checkpoint):
    v = VocabLayout.from_checkpoint(tiny_checkpoint)
    assert v == VocabLayout.load("digits")
    tok = Tokenizer(tiny_checkpoint)
    ids = tok.encode("<class_3><pos_0><img_16><eoi><boi>").tolist()  # (litgpt strips a final eos)
    assert ids == [v.class_token(3), v.pos_offset, v.code_offset + 16, v.eoi, v.boi]
    assert tok.decode(tok.encode("<class_null> <pos_63>")) == "<class_null> <pos_63>"
    assert tok.processor.get_vocab_size() == v.padded_vocab_size
    assert (tok.bos_id, tok.eos_id) == (v.boi, v.eoi)


def test_tokenizer_mismatch_is_reported(tiny_checkpoint):
    imagenet = VocabLayout.load("maskgit_imagenet")
    with pytest.raises(ValueError, match="codebook_size: checkpoint 17 vs data 1024"):
        imagenet.check_tokenizer(Tokenizer(tiny_checkpoint), where="meta.json")


def test_checkpoint_without_layout_fails_clearly(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'rar_layout' entry"):
        VocabLayout.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="rar-llm init"):
        VocabLayout.from_checkpoint(tmp_path / "missing")


def test_installed_wheel_carries_the_named_layouts(tmp_path):
    """A plain (non-editable) install has no repository around it: the wheel must bring adapters/ along."""
    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"  # build from a copy so no build/ folder is left in the checkout
    skip = {".git", "build", "tests", "bench", "data", "out", "checkpoints", ".venv"}  # at the top only

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == root
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in skip)]

    shutil.copytree(root, src, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w")]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("rar_llm-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("from rar_llm.vocab import ADAPTERS_DIR, VocabLayout; import rar_llm; "
             "assert ADAPTERS_DIR.parent.samefile(rar_llm.__path__[0]), ADAPTERS_DIR; "
             "print(VocabLayout.load('maskgit_imagenet').vocab_size, (ADAPTERS_DIR / 'text' / 'pydoc_bpe1024.json').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2283", "True"]
