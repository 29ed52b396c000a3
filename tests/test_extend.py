"""``rar-llm extend``: a pretrained text model gets image ids without its text behaviour moving.

The bases are tiny litgpt models built here, one Llama-style (RMSNorm, SwiGLU, full rotary, tied
embedding and head, a BOS-adding post-processor) and one GPT-NeoX-style like Pythia (parallel
residual, LayerNorm, GptNeoxMLP, biases, partial rotary, plus a head bias), each with a byte-level BPE
trained here whose model is padded beyond its tokenizer (so the padding ids must be kept).
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer as LitTokenizer
from litgpt.utils import save_config
from tokenizers import Tokenizer, processors

from rar_llm.checkpoint import load_model
from rar_llm.data.corpora import train_bpe
from rar_llm.extend import extend
from rar_llm.vocab import VocabLayout

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def square(x):\n    return x * x\n\n\nprint(square(12))\n",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🎉, Ελληνικά.",
    "   leading spaces\tand\ttabs\n\n   trailing   ",
]
STYLES = {
    "llama": dict(bias=False, parallel_residual=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  rotary_percentage=1.0, n_query_groups=2, intermediate_size=96),
    "neox": dict(bias=True, lm_head_bias=True, parallel_residual=True, norm_class_name="LayerNorm",
                 mlp_class_name="GptNeoxMLP", rotary_percentage=0.25, intermediate_size=128),
}
SPECIALS = {"llama": ["<s>", "</s>"], "neox": ["<|endoftext|>", "<|padding|>"]}


def make_base(root, style: str):
    """A litgpt checkpoint folder: a trained-here BPE (300 ids incl. specials) and a model padded to 320 rows."""
    root.mkdir(parents=True)
    corpus = root.parent / f"{style}-corpus.txt"
    corpus.write_text("\n".join(TEXTS * 4) + open(__file__, encoding="utf-8").read())
    tok_path = train_bpe([corpus], root / "tokenizer.json", vocab_size=300)
    tok = Tokenizer.from_file(str(tok_path))
    tok.add_special_tokens(SPECIALS[style])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[style][-1 if style == "llama" else 0]}
    if style == "llama":  # BOS through the post-processor, as Llama 3's tokenizer.json does
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        cfg |= {"bos_token": "<s>", "add_bos_token": True}
    tok.save(str(tok_path))
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id(cfg["eos_token"])}))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = Config(name=f"tiny-{style}", block_size=256, vocab_size=vocab, padded_vocab_size=320, padding_multiple=64,
                    n_layer=2, n_embd=32, n_head=4, **STYLES[style])
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else 0.1)
    sd = model.state_dict()
    if style == "llama":
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied, as litgpt stores tied models
    torch.save(sd, root / "lit_model.pth")
    save_config(config, root)
    (root / "hyperparameters.yaml").write_text("{}\n")
    return root


@pytest.fixture(scope="module", params=["llama", "neox"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"extend-{request.param}")
    base = make_base(root / "base", request.param)
    out = extend(base, "digits", root / "extended")
    return request.param, base, out


def lit_model(folder):
    model = GPT(Config.from_file(folder / "model_config.yaml"))
    model.load_state_dict(torch.load(folder / "lit_model.pth", weights_only=True))
    return model.eval()


def test_text_logits_are_the_bases_and_image_ids_lie_beyond_its_vocabulary(pair):
    style, base, out = pair
    cfg, layout = Config.from_file(base / "model_config.yaml"), VocabLayout.from_checkpoint(out)
    assert layout.code_offset == layout.text_vocab_size == cfg.padded_vocab_size == 320 > cfg.vocab_size
    assert min(layout.class_offset, layout.null_class, layout.pos_offset, layout.boi, layout.eoi) >= 320
    old, new = lit_model(base), lit_model(out)
    x = LitTokenizer(base).encode(" ".join(TEXTS))[None, :200]
    with torch.inference_mode():
        a, b = old(x), new(x)
    assert torch.equal(a, b[..., :320])  # exactly: every base weight is copied, new rows only add logits
    sb, sn = old.state_dict(), new.state_dict()
    assert all(torch.equal(sb[k], sn[k][: len(sb[k])]) for k in sb)  # padding rows 300..319 untouched too
    tied = torch.equal(sn["transformer.wte.weight"], sn["lm_head.weight"])
    assert tied == (style == "llama")
    # new head rows near the mean: the image ids take little probability mass from text
    mass = b.softmax(-1)[..., 320:].sum(-1).mean()
    uniform_share = (layout.padded_vocab_size - 320) / layout.padded_vocab_size
    assert mass < uniform_share


def test_tokenization_is_the_bases_and_every_id_is_named(pair):
    style, base, out = pair
    old, new = LitTokenizer(base), LitTokenizer(out)
    texts = [*TEXTS, "".join(f"{s} and {s}" for s in SPECIALS[style]), "", " ", "\n\n\t  ", "a" * 300]
    for t in texts:
        assert new.encode(t).tolist() == old.encode(t).tolist(), t
        assert new.processor.encode(t).ids == old.processor.encode(t).ids, t
        assert new.decode(new.encode(t, bos=False)) == old.decode(old.encode(t, bos=False))
    assert (new.bos_id, new.eos_id, new.use_bos) == (old.bos_id, old.eos_id, old.use_bos)
    layout = VocabLayout.from_checkpoint(out)
    proc = new.processor
    n_text = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert [proc.id_to_token(i) for i in range(n_text, layout.padded_vocab_size)] == \
        [layout.token_name(i) for i in range(n_text, layout.padded_vocab_size)]
    assert proc.encode("<class_3><pos_0><img_5><boi>", add_special_tokens=False).ids == \
        [layout.class_token(3), layout.pos_offset, layout.code_offset + 5, layout.boi]
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((base / "generation_config.json").read_text())


def test_finetune_full_runs_and_the_result_generates(pair, tmp_path, digits_dir):
    style, base, out = pair
    if style == "neox":
        pytest.skip("one litgpt run is enough; the NeoX folder's generation is checked below")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXTS * 30))
    args = [str(out), "--out_dir", str(tmp_path / "run"), "--precision", "32-true",
            "--data", "rar_llm.data.MixedData", "--data.layout", str(out), "--data.data_dir", str(digits_dir),
            "--data.text_files", json.dumps([str(text)]), "--data.text_length", "64", "--data.total_samples", "16",
            "--data.caption_template", "a handwritten {}", "--data.num_workers", "0",
            "--train.max_steps", "2", "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
            "--train.save_interval", "2", "--train.epochs", "1", "--train.lr_warmup_steps", "1",
            "--eval.interval", "100", "--eval.initial_validation", "false", "--eval.final_validation", "false",
            "--logger_name", "csv"]
    run = subprocess.run([sys.executable, "-m", "litgpt", "finetune_full", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert VocabLayout.from_checkpoint(final) == VocabLayout.from_checkpoint(out)
    model = load_model(final, device="cpu", dtype=torch.float32)
    import rar_llm

    torch.set_num_threads(1)
    codes = rar_llm.generate_from_prompt(model, "a handwritten seven", num_samples=2, guidance=2.0, seed=0)
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 17
    assert rar_llm.generate(model, [1, 7], seed=0).shape == (2, 8, 8)


def test_refusals_name_the_file_and_the_fix(pair, tmp_path):
    style, base, out = pair
    with pytest.raises(FileExistsError, match="not empty"):
        extend(base, "digits", out)
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "lit_model.pth").write_text("stale")
    extend(base, "digits", tmp_path, overwrite=True)  # replaces only what extend writes
    assert (tmp_path / "mine.txt").read_text() == "keep me" and load_model(tmp_path, dtype=torch.float32) is not None
    with pytest.raises(ValueError, match="already has a text vocabulary"):
        extend(base, "digits_pydoc", tmp_path / "a")
    with pytest.raises(ValueError, match="already carries an image layout"):
        extend(out, "digits", tmp_path / "b")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("lit_model.pth", "model_config.yaml"):
        (bare / name).write_bytes((base / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json nor tokenizer.model"):
        extend(bare, "digits", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_overwrite_replaces_only_what_this_run_writes(pair, tmp_path):
    style, full, _ = pair
    base = tmp_path / "base"  # a base without the optional files
    shutil.copytree(full, base, ignore=shutil.ignore_patterns("tokenizer.model", "generation_config.json",
                                                              "prompt_style.yaml"))
    out = tmp_path / "u2"
    out.mkdir()
    mine = {"tokenizer.model": b"my sp model", "generation_config.json": b"{}", "prompt_style.yaml": b"mine: 1"}
    for name, data in mine.items():  # the user's own files, of names extend writes only when the base has them
        (out / name).write_bytes(data)
    extend(base, "digits", out, overwrite=True)
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert not [p for p in out.iterdir() if p.name.startswith(".rar-llm-")]  # no staging folder left


def test_out_dir_at_the_base_is_refused_without_suggesting_overwrite(pair):
    style, base, _ = pair
    for target in (base, base.parent):
        with pytest.raises(ValueError, match="would contain the input") as err:
            extend(base, "digits", target)
        assert "--overwrite" not in str(err.value)


def test_a_failed_write_leaves_the_old_outputs_and_is_one_line(pair, tmp_path, monkeypatch, capsys):
    from rar_llm.__main__ import main

    style, base, _ = pair
    out = extend(base, "digits", tmp_path / "x")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(out / "lit_model.pth"))

    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(SystemExit) as e:
        main(["extend", "--checkpoint_dir", str(base), "--layout", "digits", "--out_dir", str(out),
              "--overwrite", "true"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("rar-llm extend: error:") and "Read-only" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all or nothing


def test_export_round_trip_or_a_clear_refusal(pair, tmp_path):
    from rar_llm.serve.export import export, import_hf

    style, base, out = pair
    if style == "neox":
        with pytest.raises(ValueError, match="not a plain Llama"):
            export(out, tmp_path / "hf")
        return
    hf = export(out, tmp_path / "hf")
    back = import_hf(hf, tmp_path / "back")
    a, b = torch.load(out / "lit_model.pth"), torch.load(back / "lit_model.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert VocabLayout.from_checkpoint(back) == VocabLayout.from_checkpoint(out)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    x = LitTokenizer(out).encode(TEXTS[0])[None]
    with torch.inference_mode():
        ref = lit_model(out)(x)
        got = model(x).logits
    assert (got - ref).abs().max() < 1e-4


def test_cli_prints_one_line(pair, tmp_path, capsys):
    from rar_llm.__main__ import main

    style, base, out = pair
    if style == "neox":
        return
    with pytest.raises(SystemExit) as e:
        main(["extend", "--checkpoint_dir", str(base), "--layout", "digits", "--out_dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rar-llm extend: error:") and "not empty" in err and "\n" not in err


def test_a_sentencepiece_base(tmp_path):
    """A base with only tokenizer.model (Llama 2, Gemma, Mistral style): litgpt reads the extended folder's
    tokenizer.json and encodes as the base's SentencePiece model; rar_llm reads the copied model."""
    spm = pytest.importorskip("sentencepiece")
    base = tmp_path / "base"
    base.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20) + open(__file__, encoding="utf-8").read())
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(base / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99, minloglevel=2)
    (base / "tokenizer.vocab").unlink()
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    config = Config(name="tiny-sp", block_size=256, vocab_size=400, padding_multiple=64, n_layer=1, n_embd=32,
                    n_head=4, intermediate_size=64, **{k: v for k, v in STYLES["llama"].items() if k != "intermediate_size"})
    torch.save(GPT(config).state_dict(), base / "lit_model.pth")
    save_config(config, base)
    out = extend(base, "digits", tmp_path / "extended")
    layout = VocabLayout.from_checkpoint(out)
    assert layout.text_tokenizer == f"sentencepiece:{(out / 'tokenizer.model').resolve()}"
    assert layout.code_offset == 448 and (out / "tokenizer.json").is_file()
    old, new = LitTokenizer(base), LitTokenizer(out)
    assert (old.backend, new.backend) == ("sentencepiece", "huggingface")
    for t in [*TEXTS, "  x  y ", "é ü 日本 🎉"]:
        assert new.encode(t).tolist() == old.encode(t).tolist(), t
        assert new.decode(new.encode(t)) == old.decode(old.encode(t)), t
