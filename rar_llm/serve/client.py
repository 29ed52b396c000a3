"""Class id -> PNG from a vLLM OpenAI-compatible server running the RAR plugin (numpy + PIL, no torch).

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
import http.client
import math
import os
import sys
import json
import typing
import urllib.error
import urllib.parse
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
        for key in ("codebook_size", "height", "width", "num_classes"):
            if type(d.get(key)) is not int or d[key] < 1:
                raise ValueError(f"layout {key} {d.get(key)!r}: expected a positive integer")
        self.codebook_size = d["codebook_size"]
        self.height, self.width = d["height"], d["width"]
        self.num_classes = d["num_classes"]
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
        try:
            d = json.loads(path.read_text())
            return cls(d.get("rar_layout", d))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise ValueError(f"--layout {path}: not a RAR layout ({err}); give the exported model's folder") from None


# ---- HTTP ----------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The server could not be reached, answered an error, or answered something that is not vLLM's API."""


def _request(req: urllib.request.Request | str, timeout: float) -> dict:
    url = req.full_url if isinstance(req, urllib.request.Request) else req
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        raise ServerError(f"{url}: the server answered HTTP {err.code}: {_error_text(err.read())}") from None
    except urllib.error.URLError as err:
        raise ServerError(f"{url}: cannot reach the server ({err.reason}); is `vllm serve` running there?") from None
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, not HTTP
        raise ServerError(f"{url}: the connection failed ({type(err).__name__}: {err})") from None
    except ValueError as err:  # json
        raise ServerError(f"{url}: the answer is not JSON ({err}); is it a vLLM server?") from None


def _error_text(body: bytes) -> str:
    """An error answer's message on one line: vLLM's ``error.message`` (or ``detail``), else the raw body."""
    text = body.decode(errors="replace")
    try:
        answer = json.loads(text)
        error = answer.get("error", answer)
        text = str(error.get("message", error.get("detail", text)) if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300]


def _post(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode()
    return _request(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}), timeout)


def _field(answer: dict, url: str, *keys):
    """``answer[k0][k1]...``; a missing field is a ServerError (the server is not vLLM's API)."""
    try:
        for key in keys:
            answer = answer[key]
        return answer
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{url}: the answer has no {'/'.join(map(str, keys))}; is it a vLLM server?") from None


def served_model(url: str, timeout: float = 30) -> dict:
    """The first model the server lists (``id``, ``root``)."""
    url = url.rstrip("/") + "/v1/models"
    return _field(_request(url, timeout), url, "data", 0)


def check_layout(url: str, model: str, layout: Layout, timeout: float = 30) -> None:
    """Ask the server's tokenizer where a few named ids are, so a wrong layout fails before sampling."""
    names = {"<img_0>": layout.code_offset, "<class_null>": layout.null_class, "<pos_0>": layout.pos_offset,
             "<eoi>": layout.eoi}
    for name, want in names.items():
        endpoint = url.rstrip("/") + "/tokenize"
        got = _field(_post(endpoint, {"model": model, "prompt": name, "add_special_tokens": False}, timeout),
                     endpoint, "tokens")
        if got != [want]:
            raise ValueError(f"the layout puts {name} at {want} but the server's tokenizer gives {got}: "
                             "pass --layout for the model the server runs")


# ---- generation ----------------------------------------------------------------------------------
CLIENT_ORDERS = ("raster", "random")  # the orders the client draws itself; others travel as a permutation


def check_order(order, n: int | None = None) -> None:
    """A name the client draws, or a permutation of the cells (of ``n`` cells where the layout is known)."""
    if isinstance(order, str):
        if order not in CLIENT_ORDERS:
            raise ValueError(f"order {order!r}: the client draws {' and '.join(CLIENT_ORDERS)}; pass a permutation "
                             "(a JSON list of the cells) for others")
        return
    rows = order if isinstance(order, list) and order and all(isinstance(r, list) for r in order) else [order]
    for row in rows:
        if (not isinstance(row, list) or not row or any(type(c) is not int or c < 0 for c in row)
                or len(set(row)) != len(row) or (n is not None and sorted(row) != list(range(n)))):
            cells = f"0..{n - 1}" if n is not None else "r*W+c"
            raise ValueError(f"order {str(order)[:60]}: expected a permutation of the cells ({cells}), each once")


def _orders(order, batch: int, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    n = layout.num_positions
    if isinstance(order, str):
        check_order(order)
        if order == "raster":
            return np.tile(np.arange(n), (batch, 1))
        if order == "random":
            return np.stack([rng.permutation(n) for _ in range(batch)])
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
        results = list(pool.map(lambda job: _field(_post(endpoint, job[1], timeout), endpoint, "choices", 0), jobs))
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
        raise ServerError("the server returned non-code tokens: is it running rar_llm.serve.plugin:RARLogitsProcessor?")
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``client: error: ...``, exit 2), as the rar-llm CLI's."""

    def error(self, message: str) -> typing.NoReturn:
        fail(message, 2)


def fail(message: str, code: int) -> typing.NoReturn:
    sys.stderr.write(f"rar_llm.serve.client: error: {message}\n")
    raise SystemExit(code)


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m rar_llm.serve.client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://localhost:8000", help="the vLLM server (http:// or https://)")
    ap.add_argument("--class_id", default="0", help="one id or a comma-separated list")
    ap.add_argument("--num_per_class", type=int, default=1)
    ap.add_argument("--out", default="rar.png", help="the PNG grid to write")
    ap.add_argument("--codes_out", default=None, help="also save the codes (a .npy file)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out / --codes_out if they exist")
    ap.add_argument("--layout", default=None, help="export folder or layout JSON (default: the served model's folder)")
    ap.add_argument("--model", default=None, help="served model name (default: the first the server lists)")
    add_sampling_arguments(ap)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    return ap


def check_args(args: argparse.Namespace) -> tuple[SamplingSettings, list[int], Layout | None]:
    """Every value, before connecting: ``(settings, class ids, layout or None)``; a ValueError names the flag."""
    check_url(args.url)
    if args.num_per_class < 1:
        raise ValueError(f"--num_per_class {args.num_per_class}: expected 1 or more")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: expected a number of seconds > 0")
    try:
        ids = [int(c) for c in str(args.class_id).split(",")]
    except ValueError:
        raise ValueError(f"--class_id {args.class_id!r}: expected an id or comma-separated ids, e.g. 0,1,2") from None
    if any(c < 0 for c in ids):
        raise ValueError(f"--class_id {args.class_id!r}: class ids are >= 0")
    order = args.order
    if order.strip().startswith("["):
        try:
            order = json.loads(order)
        except ValueError:
            raise ValueError(f"--order {args.order!r}: not a JSON list of cells") from None
    layout = Layout.load(args.layout) if args.layout else None
    check_order(order, layout.num_positions if layout else None)
    settings = SamplingSettings(**{k: getattr(args, k) for k in VLLM_FIELDS if k != "order"}, order=order)
    check_output("--out", args.out, ".png", args.overwrite)
    if args.codes_out is not None:
        check_output("--codes_out", args.codes_out, ".npy", args.overwrite)
    if layout is not None:
        check_classes(ids, layout)
    return settings, [c for c in ids for _ in range(args.num_per_class)], layout


def check_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number in 0..65535)
    except ValueError as err:
        raise ValueError(f"--url {url!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT (the vLLM server)")


def check_output(flag: str, path: str, suffix: str, overwrite: bool) -> None:
    """A file the client will write: the right kind, a folder that exists, and no file replaced unasked."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: name a {suffix} file")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; name a {suffix} file")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it, or another name")


def check_classes(class_ids: list[int], layout: Layout) -> None:
    bad = [c for c in class_ids if not 0 <= c < layout.num_classes]
    if bad:
        raise ValueError(f"class id {bad[0]} is outside 0..{layout.num_classes - 1}")


def save_atomic(path: str, write) -> None:
    """``write(tmp)`` then move the file into place, so a failed write leaves no half file under ``path``."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{Path(path).suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """The client's CLI: values checked first (exit 2), then the server (exit 1 if it fails), each one line."""
    args = parser().parse_args(argv)
    try:
        settings, classes, layout = check_args(args)
    except ValueError as err:
        fail(str(err), 2)
    try:
        info = served_model(args.url, args.timeout)
        model = args.model or _field(info, args.url, "id")
        if layout is None:
            source = info.get("root") or model
            if not Path(str(source)).exists():
                fail(f"the server runs {source!r}, which is not a folder here: pass --layout", 2)
            layout = Layout.load(source)
            check_classes(classes, layout)
        check_layout(args.url, model, layout, args.timeout)
        codes = generate(args.url, classes, layout, model, settings=settings, seed=args.seed, timeout=args.timeout)
    except ValueError as err:
        fail(str(err), 2)
    except (ServerError, UnpairedGuidanceError) as err:
        fail(str(err), 1)
    rows = len(set(classes)) if args.num_per_class > 1 else 1
    save_atomic(args.out, lambda tmp: to_png(codes, layout, tmp, rows=rows))
    if args.codes_out:
        save_atomic(args.codes_out, lambda tmp: np.save(tmp, codes))
    print(f"wrote {len(classes)} image(s) of classes {sorted(set(classes))} to {args.out}")


if __name__ == "__main__":
    main()
