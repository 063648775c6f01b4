"""Where this process runs: its device, and the torch.distributed group it joins under torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT). Without them this is a single
process with world size 1: no process group is created and none is needed.
"""

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKEND_ENV = "LLAMA_DIST_BACKEND"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This rank's GPU if there is one (cuda:LOCAL_RANK), else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device: torch.device, backend: Optional[str] = None) -> None:
    """Join torchrun's process group if this is a multi-process job and no group exists yet.

    The backend is ``backend``, else $LLAMA_DIST_BACKEND, else NCCL for CUDA and gloo otherwise
    (NCCL exists only for CUDA; gloo runs everywhere). A group the application already created is
    used as it is.
    """
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    logger.info("rank %d of %d joined the %s process group", dist.get_rank(), world_size, backend)


def is_main_process() -> bool:
    """Rank 0 of the job (or the only process): the one that prints."""
    return not dist.is_initialized() or dist.get_rank() == 0
