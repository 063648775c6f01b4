"""The layers the model is built from, beside its math: the linear and embedding layers split over
tensor-parallel ranks (``parallel``), their int8/int4 weights (``quantize``) and the CPU's float32 kernel
choice (``cpu_kernels``), LoRA adapters beside a linear (``lora``) and many of them served per row of a batch
(``multi_lora``), the chunked cross-entropy of the output
layer (``loss``), the KV cache pool with its update and its reads (``kv_cache``), and the CPU thread count
chosen for a decode step (``cpu_threads``, remembered by ``timed_choices``)."""
