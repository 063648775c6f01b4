"""An OpenAI-compatible HTTP server for a Llama checkpoint, on one process or under torchrun:
``python -m llama.server`` (see ``__main__``). ``schemas`` declares the request bodies, ``protocol``
maps them to the engine's options and writes the answers, ``scheduler`` hands them to the decoding
engine (``llama.engine``), ``app`` (FastAPI, on uvicorn) carries them, and ``metrics`` counts them."""
