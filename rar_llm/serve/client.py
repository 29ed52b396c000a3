"""Class id -> PNG from a vLLM OpenAI-compatible server running the RAR plugin (stdlib + numpy + PIL).

Server (see the README, "Serving with vLLM")::

    vllm serve EXPORT_DIR --logits-processors rar_llm.serve.plugin:RARLogitsProcessor \\
        --scheduler-cls rar_llm.serve.plugin.RARScheduler --max-num-seqs 64

Client::

    python -m rar_llm.serve.client --url http://localhost:8000 --class_id 3 --out three.png --guidance 2
    PYTHONPATH=path/to/rar-llm python -m rar_llm.serve.client ...   # without installing rar_llm or torch

Each image is one ``/v1/completions`` request (two with guidance: the class and ``<class_null>``, sent
together with a shared ``rar_pair`` key); the settings travel in ``vllm_xargs``, written by
``rar_llm.sampling.settings.to_extra_args``, the one conversion the server's plugin reads back. The server's
``RARScheduler`` admits the two requests of a pair together; if they still lose lockstep (a server
without it, or preemption), the plugin ends both with ``<eoi>`` and this client raises: an image is
never returned unguided. Codes are drawn as grey levels (code k of K is k/(K-1)), right for the pixel
codebooks (the digits); a VQ codebook needs its decoder, so ``--codes_out`` saves the codes too.
Needs numpy, PIL and the rar_llm package's files, not torch (``rar_llm.sampling.settings`` and
``rar_llm.serve`` import only the standard library).
"""

from __future__ import annotations

import argparse
import json
import typing
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from rar_llm.sampling.settings import VLLM_FIELDS, SamplingSettings, resolve, to_extra_args
from rar_llm.serve import UnpairedGuidanceError


# ---- the layout, without torch -------------------------------------------------------------------
class Layout:
    """The ids of ``rar_llm.vocab.VocabLayout`` from its JSON.

    Order: ``[text][codes][classes][null class][positions][<boi>, <eoi>]``.
    """

    def __init__(self, d: dict) -> None:
        self.codebook_size = int(d["codebook_size"])
        self.height, self.width = int(d["height"]), int(d["width"])
        self.num_classes = int(d["num_classes"])
        self.code_offset = int(d.get("text_vocab_size", 0))
        self.class_offset = self.code_offset + self.codebook_size
        self.null_class = self.class_offset + self.num_classes
        self.pos_offset = self.null_class + 1
        self.num_positions = self.height * self.width
        self.boi = self.pos_offset + self.num_positions
        self.eoi = self.boi + 1

    @classmethod
    def load(cls, path: str | Path) -> "Layout":
        """From an export / checkpoint folder, its ``tokenizer_config.json`` or a layout JSON file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer_config.json"
        d = json.loads(path.read_text())
        return cls(d.get("rar_layout", d))


# ---- HTTP ----------------------------------------------------------------------------------------
def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from None


def _get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def served_model(url: str, timeout: float = 30) -> dict:
    """The first model the server lists (``id``, ``root``)."""
    return _get(url.rstrip("/") + "/v1/models", timeout)["data"][0]


def check_layout(url: str, model: str, layout: Layout, timeout: float = 30) -> None:
    """Ask the server's tokenizer where a few named ids are, so a wrong layout fails before sampling."""
    names = {"<img_0>": layout.code_offset, "<class_null>": layout.null_class, "<pos_0>": layout.pos_offset,
             "<eoi>": layout.eoi}
    for name, want in names.items():
        got = _post(url.rstrip("/") + "/tokenize", {"model": model, "prompt": name, "add_special_tokens": False},
                    timeout)["tokens"]
        if got != [want]:
            raise ValueError(f"the layout puts {name} at {want} but the server's tokenizer gives {got}: "
                             "pass --layout for the model the server runs")


# ---- generation ----------------------------------------------------------------------------------
def _orders(order, batch: int, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    n = layout.num_positions
    if isinstance(order, str):
        if order == "raster":
            return np.tile(np.arange(n), (batch, 1))
        if order == "random":
            return np.stack([rng.permutation(n) for _ in range(batch)])
        raise ValueError(f"order {order!r}: the client knows raster and random; pass a permutation for others")
    perm = np.asarray(order, dtype=np.int64)
    if perm.shape not in ((n,), (batch, n)) or not (np.sort(perm.reshape(-1, n), 1) == np.arange(n)).all():
        raise ValueError(f"order must be a permutation of the {n} cells, shape ({n},) or ({batch}, {n})")
    return np.broadcast_to(perm, (batch, n)).copy()


def generate(
    url: str, class_ids: list[int], layout: Layout, model: str, *, settings: SamplingSettings | None = None,
    seed: int | None = None, timeout: float = 600, workers: int = 64, **fields,
) -> np.ndarray:
    """``(B, H, W)`` codes for ``class_ids`` from the server; raises ``UnpairedGuidanceError`` if a pair split.

    ``settings`` and ``fields`` as in ``rar_llm.generate`` (``SamplingSettings``, its fields as keywords
    overriding it), checked here and again by the server's processor (HTTP 400). The client draws the
    ``raster`` and ``random`` orders; other scans are passed as a permutation. ``steps`` is refused:
    vLLM decodes one cell per step.
    """
    settings = resolve(settings, fields, "generate")
    for c in class_ids:
        if not 0 <= c < layout.num_classes:
            raise ValueError(f"class id {c} is outside 0..{layout.num_classes - 1}")
    rng = np.random.default_rng(seed)
    perm = _orders(settings.order, len(class_ids), layout, rng)
    seeds = rng.integers(0, 2**62, len(class_ids))
    call = uuid.uuid4().hex[:12]
    n = layout.num_positions
    jobs = []
    for b, c in enumerate(class_ids):
        pair = f"{call}-{b}" if settings.guided else None
        xargs = to_extra_args(replace(settings, order=perm[b].tolist()), int(seeds[b]), pair)
        heads = [layout.class_offset + c] + ([layout.null_class] if settings.guided else [])
        for head in heads:
            jobs.append((b, {
                "model": model, "prompt": [head, layout.pos_offset + int(perm[b, 0])], "max_tokens": 2 * n - 1,
                "temperature": 0.0, "stop_token_ids": [layout.eoi], "return_token_ids": True, "vllm_xargs": xargs,
            }))
    endpoint = url.rstrip("/") + "/v1/completions"
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        results = list(pool.map(lambda job: _post(endpoint, job[1], timeout)["choices"][0], jobs))
    tokens: dict[int, list[list[int]]] = {}
    for (b, _), choice in zip(jobs, results):
        tokens.setdefault(b, []).append(list(choice.get("token_ids") or []))
    codes = np.zeros((len(class_ids), n), dtype=np.int64)
    failed = []
    for b, toks in tokens.items():
        if any(len(t) != 2 * n - 1 for t in toks) or any(t != toks[0] for t in toks):
            failed.append(b)
            continue
        codes[b, perm[b]] = np.asarray(toks[0][0::2]) - layout.code_offset
    if failed:
        raise UnpairedGuidanceError(
            f"{len(failed)} of {len(class_ids)} images came back short: their conditional and <class_null> "
            "requests did not run in lockstep on the server, so guidance could not be applied. Run the server "
            "with --scheduler-cls rar_llm.serve.plugin.RARScheduler and enough KV cache, or use --guidance 1"
        )
    if (codes < 0).any() or (codes >= layout.codebook_size).any():
        raise RuntimeError("the server returned non-code tokens: is it running rar_llm.serve.plugin:RARLogitsProcessor?")
    return codes.reshape(-1, layout.height, layout.width)


def to_png(codes: np.ndarray, layout: Layout, path: str | Path, rows: int = 1, scale: int = 8) -> None:
    """A grid of the code grids as grey levels (code k -> k / (K - 1))."""
    B, H, W = codes.shape
    cols = -(-B // rows)
    grey = (codes.astype(np.float64) / max(layout.codebook_size - 1, 1) * 255).round().astype(np.uint8)
    canvas = np.zeros((rows * (H + 1) + 1, cols * (W + 1) + 1), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        canvas[1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = grey[i]
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def add_sampling_arguments(ap: argparse.ArgumentParser) -> None:
    """``--guidance``, ``--schedule``, ...: one flag per ``SamplingSettings`` field a vLLM request carries."""
    hints, defaults = typing.get_type_hints(SamplingSettings), SamplingSettings()
    for name in VLLM_FIELDS:
        if name == "order":  # a name or a JSON list: parsed in main
            ap.add_argument("--order", default="raster", help="raster, random or a JSON list (a permutation of the cells)")
            continue
        hint = hints[name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = str if choices else next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))
        ap.add_argument(f"--{name}", type=kind, choices=choices, default=getattr(defaults, name))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--class_id", default="0", help="one id or a comma-separated list")
    ap.add_argument("--num_per_class", type=int, default=1)
    ap.add_argument("--out", default="rar.png")
    ap.add_argument("--codes_out", default=None, help="also save the codes as .npy")
    ap.add_argument("--layout", default=None, help="export folder or layout JSON (default: the served model's folder)")
    ap.add_argument("--model", default=None, help="served model name (default: the first the server lists)")
    add_sampling_arguments(ap)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    order = json.loads(args.order) if args.order.strip().startswith("[") else args.order
    try:
        settings = SamplingSettings(**{k: getattr(args, k) for k in VLLM_FIELDS if k != "order"}, order=order)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    info = served_model(args.url)
    model = args.model or info["id"]
    layout_src = args.layout or info.get("root") or info["id"]
    if not Path(layout_src).exists():
        raise SystemExit(f"the server runs {layout_src!r}, which is not a folder here: pass --layout")
    layout = Layout.load(layout_src)
    check_layout(args.url, model, layout)
    classes = [int(c) for c in str(args.class_id).split(",") for _ in range(args.num_per_class)]
    try:
        codes = generate(args.url, classes, layout, model, settings=settings, seed=args.seed, timeout=args.timeout)
    except (UnpairedGuidanceError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    rows = len(set(classes)) if args.num_per_class > 1 else 1
    to_png(codes, layout, args.out, rows=rows)
    if args.codes_out:
        np.save(args.codes_out, codes)
    print(f"wrote {len(classes)} image(s) of classes {sorted(set(classes))} to {args.out}")


if __name__ == "__main__":
    main()
