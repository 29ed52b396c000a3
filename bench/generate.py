"""Images/s of ``rar_llm.generate`` for RAR-B on the CPU (random weights, guidance on, batch 4).

Compares, in one process and on the same model:
  cached         rar_llm.generate as shipped: litgpt's KV cache, two tokens per step, batch 4 (+4 null),
                 weights and cache in ``--dtype`` (bfloat16: the CPU's avx512_bf16 matmuls), linear
                 weights prepacked for oneDNN (``rar_llm.sampling.prepack.prepacked``)
  unpacked       cached without prepacking (ATen's default matmul)
  plain float32  the plain two-tokens-per-step litgpt loop: float32, no prepacking (the reference's loop)
  float32        cached with float32 weights (prepacked)
  one-by-one     cached, one image at a time
  full           cached's model without the KV cache (the whole sequence every step; takes long at 256)

    python bench/generate.py                        # 256-code images, all variants (full: ~15 min)
    python bench/generate.py --skip '[full]' --repeats 3
    python bench/generate.py --steps 64             # 64 codes per image (a 16x4 grid), all variants

Reference on this machine kind: RAR's own PyTorch sampler makes 4 RAR-B images with guidance in 29.1 s
(0.137 img/s); a plain float32 two-tokens-per-step loop took 35 s. The target is 1.5x RAR's sampler.
RAR's sampler is not run here, so it is compared twice: against the 29.1 s as given, and scaled by
this run's plain float32 loop (29.1 / 35 of it), which corrects for a slower or busier machine.
The load average is printed before and after; ratios within one run are more telling than times.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

RAR_SECONDS, PLAIN_LOOP_SECONDS = 29.1, 35.0  # 4 RAR-B images with guidance, this machine kind


def bench(
    steps: int = 256,
    batch: int = 4,
    threads: int = 2,
    dtype: str = "auto",
    model: str = "rar-b",
    repeats: int = 1,
    skip: list[str] | None = None,
) -> dict[str, float]:
    """Time each variant (after a warm-up) and print images/s and ratios.

    Args:
        steps: codes per image, one per step (a multiple of 16: the grid is 16 x steps/16; 256 is RAR's).
        batch: images per call (guidance doubles the rows).
        threads: torch and OpenMP threads.
        dtype: weights and KV-cache dtype of the cached, unpacked, one-by-one and full variants
            (``auto``: the package's default, ``rar_llm.checkpoint.default_dtype``).
        model: a registered config (rar-b, rar-l, ...); its RAR guidance preset is used.
        repeats: runs of the cached variant; its median is the figure the others are compared with.
        skip: variants to leave out: unpacked, plain, float32, one-by-one, full.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts its thread pool
    import torch
    from litgpt.model import GPT

    from rar_llm.checkpoint import default_dtype
    from rar_llm.sampling.settings import RAR_PRESETS
    from rar_llm.checkpoint import init_weights, model_config
    from rar_llm.sampling.loop import generate
    from rar_llm.vocab import VocabLayout

    torch.set_num_threads(threads)
    if dtype == "auto":
        dtype = str(default_dtype("cpu")).removeprefix("torch.")
    if steps % 16 or steps < 16:
        raise ValueError(f"--steps {steps} must be a positive multiple of 16 (the grid is 16 x steps/16)")
    skip = set(skip or [])
    layout = VocabLayout(codebook_size=1024, height=16, width=steps // 16, num_classes=1000)  # MaskGIT-VQGAN
    torch.manual_seed(0)
    with torch.device("meta"):
        gpt32 = GPT(model_config(model, layout))
    gpt32.to_empty(device="cpu")
    init_weights(gpt32)
    gpt32.max_seq_length = layout.seq_len
    gpt32.cos, gpt32.sin = gpt32.rope_cache()
    gpt = copy.deepcopy(gpt32).to(getattr(torch, dtype)).eval()
    preset = RAR_PRESETS.get(model, RAR_PRESETS["rar-b"])
    classes = list(range(batch))
    print(f"{model}, {threads} threads, batch {batch}, {steps} codes/image, {preset}")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    def run(net: GPT, one_by_one: bool = False, **kwargs) -> float:
        generate(net, [0], layout=layout, steps=1, seed=0, settings=preset, **kwargs)  # warm-up: threads, kernels
        start = time.perf_counter()
        for chunk in [[c] for c in classes] if one_by_one else [classes]:
            generate(net, chunk, layout=layout, seed=0, settings=preset, **kwargs)
        return time.perf_counter() - start

    seconds: dict[str, float] = {}
    main = f"cached {dtype}"

    def report(name: str, s: float) -> None:
        seconds[name] = s
        print(f"{name:>20}: {s:8.1f} s for {batch} images = {batch / s:.3f} img/s; "
              f"{main} is {s / seconds[main]:.2f}x faster", flush=True)

    runs = [run(gpt) for _ in range(repeats)]  # the short runs first, so they see the same machine load
    if repeats > 1:
        print(f"{main} runs: {', '.join(f'{s:.1f}' for s in runs)} s; median:")
    report(main, statistics.median(runs))
    if "unpacked" not in skip:
        report(f"unpacked {dtype}", run(gpt, prepack=False))
    if "plain" not in skip:
        report("plain float32", run(gpt32, prepack=False))
    if "float32" not in skip and dtype != "float32":
        report("cached float32", run(gpt32))
    if "one-by-one" not in skip:
        report(f"one-by-one {dtype}", run(gpt, one_by_one=True))
    if "full" not in skip:
        report(f"full {dtype}", run(gpt, kv_cache=False))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if steps == 256 and batch == 4:
        print(f"{'RAR sampler':>20}: {RAR_SECONDS:8.1f} s (reference) = {batch / RAR_SECONDS:.3f} img/s; "
              f"{main} is {RAR_SECONDS / seconds[main]:.2f}x faster (target 1.5x)")
        if "plain float32" in seconds:
            rar_here = seconds["plain float32"] * RAR_SECONDS / PLAIN_LOOP_SECONDS
            print(f"{'RAR sampler, scaled':>20}: {rar_here:8.1f} s (plain float32 x {RAR_SECONDS}/"
                  f"{PLAIN_LOOP_SECONDS}: this machine now); {main} is {rar_here / seconds[main]:.2f}x faster")
    return {name: batch / s for name, s in seconds.items()}


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(bench, as_positional=False)
