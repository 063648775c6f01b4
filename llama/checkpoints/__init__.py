"""Checkpoints on disk: reading Meta's and Hugging Face's folders into a model, each rank its slice
(``loader``, which chooses the layout once, ``hf``, ``placement``, ``files``, ``mapped_pages``), peft's
adapter files (``peft``), and writing checkpoints and their tokenizer files (``writers``, with the
formats ``hf_tokenizer_files`` and ``bpe_files``)."""
