import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT

from rar_llm.checkpoint import init, init_weights, model_config
from rar_llm.vocab import VocabLayout


def test_init_writes_a_checkpoint_litgpt_loads(tmp_path):
    ckpt = init(tmp_path / "c", model="rar-tiny", layout="digits", seed=1)
    config = Config.from_file(ckpt / "model_config.yaml")
    assert (config.vocab_size, config.padded_vocab_size, config.n_layer) == (94, 128, 4)
    model = GPT(config)
    model.load_state_dict(torch.load(ckpt / "lit_model.pth", weights_only=True))
    sd = model.state_dict()
    assert torch.equal(sd["transformer.ln_f.weight"], torch.ones(128))  # norms start at one
    assert abs(sd["transformer.wte.weight"].std().item() - 0.02) < 0.002
    assert sd["transformer.h.0.attn.proj.weight"].std().item() < 0.012  # residual projections scaled down
    assert VocabLayout.from_checkpoint(ckpt) == VocabLayout.load("digits")


def test_init_never_overwrites_without_being_told(tmp_path):
    ckpt = init(tmp_path / "c")
    (ckpt / "notes.txt").write_text("mine")
    before = (ckpt / "lit_model.pth").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite true"):
        init(ckpt, seed=5)
    assert (ckpt / "lit_model.pth").read_bytes() == before
    init(ckpt, seed=5, overwrite=True)
    assert (ckpt / "lit_model.pth").read_bytes() != before and (ckpt / "notes.txt").read_text() == "mine"


def test_sincos_position_init_puts_neighbouring_cells_close():
    layout = VocabLayout.load("digits")
    model = GPT(model_config("rar-tiny", layout))
    init_weights(model, layout=layout, pos_init="sincos")
    pos = model.transformer.wte.weight[layout.pos_offset : layout.pos_offset + 64].detach()
    d = torch.cdist(pos, pos)
    assert d[0, 1] < d[0, 7] and d[0, 8] < d[0, 63] and d[27, 28] < d[27, 0]
    assert abs(pos.pow(2).mean().sqrt().item() - 0.02) < 1e-4
    with pytest.raises(ValueError, match="needs the layout"):
        init_weights(model, pos_init="sincos")
