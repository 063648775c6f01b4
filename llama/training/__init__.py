"""Fine-tuning's parts: the loop (``loop``), the examples and batches (``data``), how a model is wrapped
for training (``parallelize``: LoRA, activation checkpointing, compile, FSDP2), the saved state a run
resumes from (``state``) and its metrics log (``log``)."""
