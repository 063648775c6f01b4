"""An OpenAI-compatible HTTP server for a Llama checkpoint, on one process or under torchrun:
``python -m llama.server`` (see ``__main__``). ``protocol`` reads requests and writes answers,
``batching`` decodes them, ``http`` carries them."""
