"""RAR model sizes as litgpt configs, registered with litgpt by name when this module is imported (every
module that builds or loads a model imports it: ``checkpoint``, ``data.rar``).

Official RAR blocks are ViTs with AdaLN-zero conditioning; these are plain Llama blocks (RMSNorm,
SwiGLU, rotary, no bias) so they export to Hugging Face Llama and run on any LLM stack. RAR's depth,
width and heads are kept; the MLP width is chosen so the parameter count is within 1 % of RAR's
(the AdaLN parameters move into the MLPs). The vocabulary defaults to the MaskGIT-VQGAN ImageNet
layout (2283 ids, padded to 2304); ``rar-llm init`` sets it from the layout it is given.
"""

from __future__ import annotations

from litgpt.config import configs, name_to_config

_LLAMA = dict(
    block_size=1024,  # 513 image tokens plus room for a text prefix
    vocab_size=2283,
    padded_vocab_size=2304,
    padding_multiple=64,
    bias=False,
    parallel_residual=False,
    norm_class_name="RMSNorm",
    norm_eps=1e-6,
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    rope_base=10000,
)

# name: (layers, width, heads, MLP width); RAR's parameter counts 261M / 461M / 955M / 1499M
SIZES = {
    "rar-b": (24, 768, 16, 3648),
    "rar-l": (24, 1024, 16, 4800),
    "rar-xl": (32, 1280, 16, 6016),
    "rar-xxl": (40, 1408, 16, 6976),
    "rar-tiny": (4, 128, 4, 512),  # tests and CPU demos
}
RAR_PARAMS = {"rar-b": 261e6, "rar-l": 461e6, "rar-xl": 955e6, "rar-xxl": 1499e6}

rar_configs = [
    dict(name=name, n_layer=L, n_embd=d, n_head=h, n_query_groups=h, intermediate_size=i, **_LLAMA)
    for name, (L, d, h, i) in SIZES.items()
]


def register() -> None:
    """Make ``Config.from_name("rar-b")`` etc. work (idempotent)."""
    for c in rar_configs:
        if c["name"] not in name_to_config:
            configs.append(c)
            name_to_config[c["name"]] = c


register()
