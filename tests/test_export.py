import json
import shutil

import numpy as np
import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT

from rar_llm.serve.export import GGUF_LAYOUT_KEY, export, import_hf, rope_to_interleaved
from rar_llm.sampling.loop import generate
from rar_llm.permute import interleave
from rar_llm.vocab import LAYOUT_KEY, VocabLayout

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model is dominated by thread hand-offs on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A rar-tiny digits checkpoint with random norm weights too, so their mapping is tested."""
    from rar_llm.checkpoint import init

    out = init(tmp_path_factory.mktemp("export") / "ckpt", model="rar-tiny", layout="digits")
    sd = torch.load(out / "lit_model.pth")
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.dim() == 1:
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
    torch.save(sd, out / "lit_model.pth")
    return out


@pytest.fixture(scope="module")
def layout(checkpoint):
    return VocabLayout.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def lit_model(checkpoint):
    model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    model.load_state_dict(torch.load(checkpoint / "lit_model.pth"))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tmp_path_factory):
    return export(checkpoint, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def rar_sequence(layout: VocabLayout, seed: int = 0) -> torch.Tensor:
    """One training-style sequence: a class, a random order, random codes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, layout.codebook_size, layout.num_positions)
    ids, _ = interleave(layout, 3, codes, rng.permutation(layout.num_positions))
    return torch.from_numpy(ids)[None]


def test_hf_folder_loads_with_auto_classes(hf_dir, layout, hf_model):
    files = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in files:
        assert (hf_dir / name).is_file(), name
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = range(layout.padded_vocab_size)
    assert tok.convert_ids_to_tokens(list(ids)) == [layout.token_name(i) for i in ids]
    assert tok("<class_3><pos_0><img_5>")["input_ids"] == [layout.class_token(3), layout.pos_offset, 5]
    assert VocabLayout.from_checkpoint(hf_dir) == layout
    cfg = hf_model.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (layout.padded_vocab_size, layout.boi, layout.eoi)
    assert not cfg.tie_word_embeddings


def test_hf_logits_equal_litgpt(lit_model, hf_model, layout, device, on_device):
    lit_model, hf_model = on_device(lit_model, device), on_device(hf_model, device)
    ids = rar_sequence(layout).to(device)
    with torch.no_grad():
        ours, theirs = lit_model(ids), hf_model(ids).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(guidance=4.0),
        dict(guidance=4.0, schedule="power_cosine", power=2.0, order="zcurve"),
        dict(order=list(range(63, -1, -1))),
    ],
)
def test_hf_generate_greedy_equals_generate(lit_model, hf_model, layout, settings, device, on_device):
    from rar_llm.sampling.hf import hf_generate

    lit_model, hf_model = on_device(lit_model, device), on_device(hf_model, device)
    classes = [1, 7]
    theirs = hf_generate(hf_model, layout, classes, temperature=0, **settings)
    ours = generate(lit_model, classes, layout=layout, temperature=0, **settings)
    assert theirs.shape == (2, layout.height, layout.width)
    assert torch.equal(theirs, ours)


def test_import_hf_round_trip_is_exact(checkpoint, hf_dir, tmp_path):
    back = import_hf(hf_dir, tmp_path / "back")
    a, b = torch.load(checkpoint / "lit_model.pth"), torch.load(back / "lit_model.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    for name in ("model_config.yaml", "tokenizer_config.json"):
        assert (checkpoint / name).read_text() == (back / name).read_text(), name


def test_export_refuses_non_empty_folder(checkpoint, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(checkpoint, out)
    export(checkpoint, out, dtype="bfloat16", overwrite=True)
    assert (out / "stale.txt").read_text() == "x"  # --overwrite replaces only what export writes
    with pytest.raises(ValueError, match="would contain the input"):
        export(checkpoint, checkpoint.parent, overwrite=True)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_checkpoint_without_layout_is_a_clear_error(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    del cfg[LAYOUT_KEY]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_config.json has no 'rar_layout'"):
        export(ckpt, tmp_path / "hf")
    export(ckpt, tmp_path / "hf", layout="digits")


def test_gguf_file(checkpoint, hf_dir, layout, lit_model, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(export(checkpoint, tmp_path, format="gguf"))
    field = reader.fields
    assert field["general.architecture"].contents() == "llama"
    assert field["tokenizer.ggml.tokens"].contents() == [layout.token_name(i) for i in range(layout.padded_vocab_size)]
    assert VocabLayout.from_dict(json.loads(field[GGUF_LAYOUT_KEY].contents())) == layout
    tensors = {t.name: t for t in reader.tensors}
    q = load_file(hf_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight"].data, rope_to_interleaved(q, lit_model.config.n_head).numpy())


@pytest.mark.slow
def test_gguf_logits_equal_llama_cpp(checkpoint, lit_model, layout, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = rar_sequence(layout)
    llm = llama_cpp.Llama(
        model_path=str(export(checkpoint, tmp_path, format="gguf")), n_ctx=ids.shape[1], n_batch=ids.shape[1],
        logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.asarray(llm.scores[: ids.shape[1]]))
    llm.close()
    with torch.no_grad():
        ours = lit_model(ids)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
