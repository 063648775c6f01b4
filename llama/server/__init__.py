"""An OpenAI-compatible HTTP server for a Llama checkpoint, on one process or under torchrun:
``python -m llama.server`` (see ``__main__``). ``protocol`` reads requests and writes answers,
``scheduler`` hands them to the decoding engine (``llama.engine``), ``http`` carries them, and
``metrics`` counts them."""
