"""Evaluation: distribution metrics (``metrics``: Fréchet distance, precision / recall, copies), the feature
networks (``classifier``: the small CNN and ``rar-llm train-classifier``; ``inception``: ImageNet's
Inception for FID / IS), and ``evaluate`` (samples against held-out data, held-out NLL per order).
Imports the core, ``data``, ``tokenizers`` and ``sampling``; only the CLI and the demo import it.
"""
