"""Where this process runs: its device and dtype, the torch.distributed group it joins under torchrun, and how
the ranks of that group fail together.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT). Without them this is a single
process with world size 1: no process group is created and none is needed.

Failure: model-parallel ranks meet in a collective at every layer, so a rank that raises while the
others carry on leaves them waiting for it. Two things stop that:

- torchrun (and ``torch.multiprocessing.spawn``) end every rank of a job as soon as one exits with an
  error, and report that rank's error. This covers any failure, anywhere.
- ``fail_together`` covers the places where ranks can legitimately diverge without a launcher's help:
  loading (each rank reads different shard files) and ``generate``'s arguments (each rank's caller
  passes its own). Every rank runs the block, then all exchange their outcome in one collective; if
  one failed, every rank raises, naming the failed rank and its error.
"""

import atexit
import contextlib
import gc
import hashlib
import logging
import os
import pickle
import sys
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from llama.layers.quantize import Quantization, check_activation_dtype, quantized_cpu_dtype

logger = logging.getLogger(__name__)

BACKEND_ENV = "LLAMA_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


class RankFailedError(RuntimeError):
    """Raised on every rank of a job when another rank failed inside ``fail_together``."""


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_as_rank0() -> bool:
    """Rank 0 of the job as torchrun launched it (or the only process), known before any process group
    exists: for what a command says or opens before it loads a model."""
    return int(os.environ.get("RANK", "0")) == 0


def default_device() -> torch.device:
    """This rank's GPU if there is one (cuda:LOCAL_RANK), else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(threads: Optional[int]) -> int:
    """The number of CPU threads torch computes with in this process (``--threads``).

    Args:
        threads: a positive count; None keeps torch's: ``OMP_NUM_THREADS`` if set (torchrun sets it to 1
            for each process), else one per core, until an inference command has the model it loads
            choose the count it decodes fastest with (``Llama.build(time_threads=True)``,
            ``llama.layers.cpu_threads.choose_threads``).

    Returns:
        the number of threads torch now uses.
    """
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None: this rank's GPU, else MPS, else CPU. A bare "cuda" means this rank's GPU."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be e.g. 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available on this machine")
    return device


def resolve_dtype(
    dtype: Union[str, torch.dtype, None], device: torch.device, quantization: Optional[Quantization] = None
) -> torch.dtype:
    """None picks per device: bf16 on CUDA where supported (else fp16), fp16 on MPS, and fp32 on CPU,
    where single-token (decode) matmuls measure no faster in bf16 and fp32 is exact; with quantized
    weights, the CPU's default is ``quantized_cpu_dtype()`` (``llama.layers.quantize``)."""
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            dtype = torch.float16
        else:
            dtype = quantized_cpu_dtype() if quantization else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or the torch.dtype), got {dtype!r}")
    if quantization:
        check_activation_dtype(quantization, device, dtype)
    return dtype


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """``backend``, else $LLAMA_DIST_BACKEND, else NCCL for CUDA and gloo otherwise (NCCL exists only
    for CUDA; gloo runs everywhere)."""
    source = "backend" if backend is not None else f"${BACKEND_ENV}"
    backend = backend if backend is not None else os.environ.get(BACKEND_ENV)
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise ValueError(
            f"{source}='nccl' needs a CUDA device and a PyTorch built with NCCL, but the device is {device} "
            f"and NCCL is {'' if dist.is_nccl_available() else 'not '}available; use 'gloo'"
        )
    return backend


def init_distributed(device: torch.device, backend: Optional[str] = None) -> None:
    """Join torchrun's process group if this is a multi-process job and no group exists yet, and leave
    it when the process exits.

    The backend is chosen by ``resolve_backend``. A group the application already created is used as
    it is, and left to the application to destroy.
    """
    backend = resolve_backend(device, backend)
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    atexit.register(leave_process_group)
    logger.info("rank %d of %d joined the %s process group", dist.get_rank(), world_size, backend)


def job_group() -> Optional[dist.ProcessGroup]:
    """The processes inference splits each layer of the model over: every process of the job (the
    default process group, under torchrun), or None for a single process."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def leave_process_group() -> None:
    """Destroy the groups while the interpreter is still whole, and drop the references that objects
    (the model's layers, the engine) keep to them, so that they are torn down now: a gloo group left to
    be torn down with the interpreter sometimes aborts the process ("terminate called without an active
    exception"), failing a job that succeeded."""
    if not dist.is_initialized():
        return
    groups = [dist.group.WORLD, *getattr(dist.distributed_c10d._world, "pg_map", {})]
    dist.destroy_process_group()
    for group in groups:
        for holder in gc.get_referrers(group):
            if isinstance(holder, dict) and "__builtins__" not in holder:  # an object's attributes, not a module's
                for key in [key for key, value in holder.items() if value is group]:
                    holder[key] = None


def quiet_local_ranks() -> None:
    """Send this process's stdout to /dev/null if its local rank is above 0, as Meta's ``Llama.build``
    does: a script that prints its results on every rank prints them once per machine, not once per
    process. stderr, where errors and logging go, is left alone."""
    if local_rank() > 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")


def is_main_process() -> bool:
    """Rank 0 of the job (or the only process): the one that prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def fail_together(same_on_every_rank: object = None) -> Iterator[None]:
    """Run the block on every rank; if it raises on any rank, it raises on every rank.

    The rank that failed raises its own error; the others raise ``RankFailedError`` naming it. With
    ``same_on_every_rank`` (e.g. the arguments of a call whose collectives must match), a block that
    succeeded everywhere still raises ``ValueError`` on every rank if that value differs between ranks.
    Must be entered by every rank of the group; costs one small all-gather, nothing at world size 1.
    """
    try:
        yield
    except Exception as error:
        exchange_outcome(f"{type(error).__name__}: {error}", None)
        raise
    exchange_outcome(None, same_on_every_rank)


def exchange_outcome(error: Optional[str], value: object) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (error, digest))
    failed = [f"rank {rank} failed with {e}" for rank, (e, _) in enumerate(outcomes) if e is not None]
    if error is not None:
        return  # this rank re-raises its own error
    if failed:
        raise RankFailedError("; ".join(failed))
    differ = [rank for rank, (_, d) in enumerate(outcomes) if d != outcomes[0][1]]
    if differ:
        raise ValueError(
            f"rank(s) {differ} were given different arguments from rank 0; every rank must make the same call"
        )
