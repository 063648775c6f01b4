"""The decoding engine every generation runs on, in rooms (see ``engine.py`` for the whole):

- ``requests.py``: a request and its rows, what they generated, the deltas they publish;
- ``block_manager.py``: the KV cache pool's blocks: allocation, prefix hashing, reference counts, eviction;
- ``scheduler.py``: each step's plan: admissions, cancellations, preemptions, the rows' blocks;
- ``runner.py``: one step on the model: prefill, decode, speculation, over the device's state;
- ``engine.py``: the loop that ties them: ``submit``, ``step``, ``run``, ``follow``.
"""

from llama.engine.engine import ADMISSIONS, Engine, Request, RowDelta  # noqa: F401
