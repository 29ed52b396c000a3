"""Serving: export to Hugging Face / GGUF folders and back (``export``), the vLLM plugin (``plugin``: the
RAR logits processor and the guidance-pair scheduler), offline batch generation on vLLM (``batch``), and a
standard-library client for a running vLLM server (``client``). Imports the core and ``sampling``; vLLM
itself only inside ``plugin`` and ``batch``.
"""
