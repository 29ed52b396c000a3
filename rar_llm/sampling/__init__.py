"""Sampling code grids from a RAR model, on every engine with the same settings.

``settings`` (one dataclass of sampling settings and RAR's presets), ``decoding`` (what every engine
shares: scan orders, known cells, guidance and parallel schedules, one sampling step; torch only),
``speculative`` (the state and acceptance rule of lossless speculative decoding; torch only),
``loop`` (``generate``: the litgpt decoding loop on its KV cache), ``prepack`` (CPU weight prepacking),
``hf`` (the same through transformers' ``generate``). ``settings`` needs only the standard library and
``decoding`` only torch; the loops import the core, ``text`` and ``tokenizers``; ``serve`` and ``eval``
build on them. ``cli`` (``rar-llm sample``) is a command, on top: it also imports ``serve`` for
``--engine vllm``.
"""
