"""Checkpoints on disk: reading Meta's and Hugging Face's folders into a model, each rank its slice
(``loader``, ``hf``, ``placement``, ``files``, ``mapped_pages``), peft's adapter files (``peft``), and
writing checkpoints and tokenizer files (``writers``, ``hf_tokenizer_files``, ``bpe_files``)."""
