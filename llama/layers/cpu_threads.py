"""How many threads a CPU decodes with when the command is not told: measured at load, not assumed.

torch computes with one thread per core. For a small model that costs more than it shares: each
operation of a decode step is a few microseconds of work, after which the threads wait for each
other (and, waiting passively, must be woken for the next one): the bundled model decodes faster on
one thread than on two (docs/performance.md). A large model's products are long, and limited by the
memory bandwidth that each core adds to.

So an inference command given no ``--threads``, in an environment that sets no ``OMP_NUM_THREADS``
(torchrun sets 1 for each process), has the model it loads choose (``choose_threads``, which
``Llama.build(time_threads=True)`` calls after loading the model, before the float32 kernels are chosen
for that count): a full batch's decode step of that model, timed at torch's thread count and at
each half of it down to 1, alternating, decides; torch's count stays unless another is more than 10%
faster. The step writes position 0 of each cache row, which a prompt's prefill overwrites before
anything reads it. The choice is remembered for the machine and the model's shapes
(``llama.layers.timed_choices``): a later run reads it rather than timing again, so that it decodes, and
compiles, as the first did. A model of more than ``MEASURED_BYTES`` keeps torch's count unmeasured: its step
takes long to time, and its products are the long ones. The choice is made for the model a command
loads (a draft loaded after it decodes with the same threads); training never makes it. Thread counts
change only the split of the work, not the results (greedy tokens and sampled text are the same at 1
and 2 threads).
"""

import hashlib
import logging
import os
import statistics
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from llama.layers.kv_cache import SCRATCH_BLOCK, BlockTables, cache_dtype
from llama.layers.parallel import group_size
from llama.layers.timed_choices import cache_file, recall, remember

logger = logging.getLogger(__name__)

ROUNDS = 5  # alternating timings of each thread count; the median decides
MARGIN = 0.9  # another count must take under 90% of torch's count's time
TIMING_SECONDS = 0.005  # a timing repeats the step to last at least this long
MEASURED_BYTES = 1 << 30  # the largest model (weights of this process) whose step is timed


def thread_counts(threads: int) -> List[int]:
    """``threads``, then each half of it down to 1: 8 -> [8, 4, 2, 1]."""
    counts = [threads]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


def step_seconds(model: nn.Module, repeats: int) -> float:
    """Seconds of one decode step of a full batch at position 0, over ``repeats`` steps."""
    tokens = torch.zeros((model.params.max_batch_size, 1), dtype=torch.long)  # (max_batch_size, 1)
    cache = BlockTables(torch.full_like(tokens, SCRATCH_BLOCK))  # every row in the scratch block
    weight = model.tok_embeddings.weight
    model.setup_cache(1, 1, cache_dtype(weight.dtype, weight.device))  # the scratch block alone, for the timing
    start = time.perf_counter()
    for _ in range(repeats):
        model(tokens, positions=tokens, cache=cache)
    seconds = (time.perf_counter() - start) / repeats
    model.drop_cache()
    return seconds


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed_model(model: nn.Module, threads: int) -> str:
    """What a thread choice was timed on: the model's tensors (their shapes and dtypes, the KV cache's
    aside), its batch, and the thread count it started from."""
    tensors = [
        (name, tuple(t.shape), str(t.dtype))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if not name.endswith(("cache_k", "cache_v"))
    ]
    digest = hashlib.sha256(repr(tensors).encode()).hexdigest()[:16]
    batch = getattr(getattr(model, "params", None), "max_batch_size", None)
    return (
        f"threads for the decode step of model {digest} ({weight_bytes(model)} bytes), batch {batch}, "
        f"from {threads} threads"
    )


def time_threads(model: nn.Module, counts: List[int]) -> Dict[int, float]:
    """The median seconds of ``model``'s decode step at each of ``counts`` threads, alternating."""
    repeats = {}
    for threads in counts:  # the first step at a count starts its threads: a warm-up, and a length
        torch.set_num_threads(threads)
        repeats[threads] = max(1, round(TIMING_SECONDS / max(step_seconds(model, 1), 1e-6)))
    timings = {threads: [] for threads in counts}
    for _ in range(ROUNDS):
        for threads in counts:
            torch.set_num_threads(threads)
            timings[threads].append(step_seconds(model, repeats[threads]))
    return {threads: statistics.median(seconds) for threads, seconds in timings.items()}


@torch.inference_mode()
def choose_threads(model: nn.Module) -> Optional[Dict[int, float]]:
    """Set torch's thread count to the fastest for ``model``'s decode step, where the model is on the
    CPU of a single process and ``OMP_NUM_THREADS`` does not say how many.

    Returns:
        the median seconds of a step at each thread count timed (in this run, or in the run that
        timed this model on this machine first), or None when nothing was timed.
    """
    if "OMP_NUM_THREADS" in os.environ or model.output.weight.device.type != "cpu" or group_size(model.group) > 1:
        return None
    counts = thread_counts(torch.get_num_threads())
    if len(counts) == 1 or weight_bytes(model) > MEASURED_BYTES:
        return None
    what = timed_model(model, counts[0])
    remembered = recall(what)
    if isinstance(remembered, dict) and remembered.get("threads") in counts:
        chosen, medians = remembered["threads"], {int(t): s for t, s in remembered["seconds"].items()}
        how = f"as timed before on this machine (delete {cache_file()} to time again)"
    else:
        medians = time_threads(model, counts)
        fastest = min(counts, key=medians.get)
        chosen = fastest if medians[fastest] < MARGIN * medians[counts[0]] else counts[0]
        remember(what, {"threads": chosen, "seconds": medians})
        how = "timed"
    torch.set_num_threads(chosen)
    logger.info(
        "CPU threads: %d, %s (ms per decode step: %s)", chosen, how, {t: round(s * 1e3, 3) for t, s in medians.items()}
    )
    return medians
