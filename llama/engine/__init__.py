"""The decoding engine every generation and every scoring runs on, in rooms:

- ``requests.py``: a request and its rows, what they generated, the deltas they publish;
- ``scheduler.py``: the slots and the queues; each step's plan (the rows that end, preemptions,
  admissions, the rows' blocks), the rows moved as it says, and the tokens they record;
- ``block_manager.py``: the KV cache pool's blocks: allocation, prefix keys, reference counts, eviction;
- ``runner.py``: one step on the model (prefill, decode) over the device's state; ``speculative.py``:
  speculative decoding's steps beside it;
- ``adapters.py``: the LoRA adapters served per request, and those of them on the device;
- ``engine.py``: the loop that ties them: ``submit``, ``score``, ``step``, ``run``, ``follow``.
"""

from llama.engine.engine import Engine, engine_options_for  # noqa: F401
from llama.engine.requests import Request, RowDelta  # noqa: F401
from llama.engine.scheduler import ADMISSIONS  # noqa: F401
