"""A fine-tuning run's state in ``OUT/state``, to resume it exactly: the trainable parameters (the
adapters, or the whole model), AdamW's moments and step counts, the steps done (which fix the learning
rate and the data's position) and each rank's random generator, with ``run.json``, the settings the
run must be resumed with.

The tensors go through ``torch.distributed.checkpoint`` under the parameters' own names: under
torchrun each rank writes and reads its own shards of the FSDP-sharded tensors, on one process plain
tensors. A new state is written beside the old one and renamed over it, so an interrupted save leaves
the previous state whole.
"""

import json
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

STATE_DIR, SETTINGS_FILE = "state", "run.json"
UNRECORDED = {"tensor_parallel": 1, "objective": "sft"}  # a setting a saved run may lack, and its value there


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def optimizer_tensors(parameters: Dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Each trainable parameter and its optimizer state, by name: what is saved and loaded in place."""
    state = {}
    for name, parameter in parameters.items():
        moments = optimizer.state[parameter]
        if not moments:  # before the first step: AdamW's state as it creates it, to load into
            moments.update(
                step=torch.tensor(0.0), exp_avg=torch.zeros_like(parameter), exp_avg_sq=torch.zeros_like(parameter)
            )
        state[name] = {"parameter": parameter, **moments}
    return state


def save_state(
    out_dir: Path,
    parameters: Dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    steps_done: int,
    settings: dict,
    objective_state: Optional[dict] = None,
) -> None:
    """Write the run's state after ``steps_done`` steps (every rank calls it), with this rank's
    ``objective_state`` where the objective keeps one (GRPO's rollout in progress)."""
    final, partial = out_dir / STATE_DIR, out_dir / (STATE_DIR + ".partial")
    if rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    barrier()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.save(optimizer_tensors(parameters, optimizer), checkpoint_id=str(partial / "tensors"))
    generators = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        generators["cuda"] = torch.cuda.get_rng_state()
    partial.mkdir(parents=True, exist_ok=True)
    torch.save(generators, partial / f"generators.{rank()}.pt")
    if objective_state is not None:
        torch.save(objective_state, partial / f"objective.{rank()}.pt")
    barrier()
    if rank() == 0:
        (partial / SETTINGS_FILE).write_text(json.dumps({**settings, "steps_done": steps_done}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    barrier()


def read_settings(out_dir: Path) -> dict:
    path = out_dir / STATE_DIR / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: {path} not found; {out_dir} holds no saved training state (save it with --save_every)"
        )
    return json.loads(path.read_text())


def check_resumable(saved: dict, settings: dict, out_dir: Path) -> None:
    """The run in ``out_dir`` must be resumed with the settings it was started with."""
    was = {key: saved.get(key, UNRECORDED.get(key)) for key in settings}
    differences = [f"{key} was {was[key]!r}, now {value!r}" for key, value in settings.items() if was[key] != value]
    if differences:
        raise ValueError(f"--resume: {out_dir} was written by another run: {'; '.join(differences)}")


def load_state(out_dir: Path, parameters: Dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Load the saved parameters, optimizer state and generators in place; the steps done."""
    folder = out_dir / STATE_DIR
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(optimizer_tensors(parameters, optimizer), checkpoint_id=str(folder / "tensors"))
    generators = torch.load(folder / f"generators.{rank()}.pt", weights_only=True)
    torch.random.set_rng_state(generators["cpu"])
    if "cuda" in generators:
        torch.cuda.set_rng_state(generators["cuda"])
    return read_settings(out_dir)["steps_done"]


def load_objective_state(out_dir: Path) -> dict:
    """This rank's objective state, saved by ``save_state``."""
    return torch.load(out_dir / STATE_DIR / f"objective.{rank()}.pt", weights_only=True)
