"""Text tokenizers for models that read text: the base LLM's tokenizer (tiktoken, SentencePiece or a
Hugging Face ``tokenizer.json``), its merge with the image vocabulary, prompt encoding, and the tokenizer
files a checkpoint carries. Imports only ``rar_llm.vocab``; no litgpt.
"""
