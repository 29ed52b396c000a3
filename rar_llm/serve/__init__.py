"""Serving: export to Hugging Face / GGUF folders and back (``export``), the vLLM plugin (``plugin``: the
RAR logits processor and the guidance-pair scheduler), offline batch generation on vLLM (``batch``), and a
standard-library client for a running vLLM server (``client``). Imports the core and ``sampling``; vLLM
itself only inside ``plugin`` and ``batch``. This file imports nothing, so the client runs without torch.
"""


class UnpairedGuidanceError(RuntimeError):
    """The two branches (requests) of a guided image did not run in lockstep; the image was not produced.

    Raised by ``rar_llm.serve.batch.vllm_generate`` and ``rar_llm.serve.client.generate``: an image is
    never returned unguided.
    """
