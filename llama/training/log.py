"""What a training run shows and leaves behind: a progress line on rank 0 (loss, learning rate,
tokens/s), ``metrics.jsonl`` (one JSON object per optimizer step, appended, so a resumed run continues
the file), a picture of the loss curve, and the peak memory."""

import json
import logging
import resource
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLog:
    """Each step's record to ``metrics_path`` (None: nowhere) and to the progress line, on rank 0."""

    def __init__(self, metrics_path: Optional[Path], max_steps: int, every: int = 1):
        self.metrics_path = metrics_path
        self.max_steps = max_steps
        self.every = every  # without a terminal: a log line every so many steps
        self.interactive = sys.stderr.isatty()

    def step(self, record: dict) -> None:
        if not is_rank0():
            return
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as file:
                file.write(json.dumps(record) + "\n")
        line = (
            f"step {record['step']}/{self.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:.0f} tokens/s"
            + (f"  reward {record['reward']:.3f}" if "reward" in record else "")
            + (f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else "")
            + (f"  val_reward {record['val_reward']:.3f}" if "val_reward" in record else "")
        )
        if self.interactive:
            filled = round(30 * record["step"] / self.max_steps)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}" + ("\n" if record["step"] == self.max_steps else "")
            )
            sys.stderr.flush()
        elif (
            record["step"] % self.every == 0
            or record["step"] in (1, self.max_steps)
            or "val_loss" in record
            or "val_reward" in record
        ):
            logger.info(line)


def evaluated(record: dict) -> bool:
    return "val_loss" in record or "val_reward" in record


def read_metrics(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_after(path: Path, steps_done: int) -> None:
    """Drop the lines of ``path`` (a JSONL file of records with a "step") after ``steps_done``: a resumed run
    writes them again."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.strip() and json.loads(line)["step"] <= steps_done))


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """The training (and validation) loss by step, as a PNG; said and skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", out_path.name)
        return
    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="training loss")
    evaluated = [r for r in records if "val_loss" in r or "val_reward" in r]
    if evaluated and "val_loss" in evaluated[0]:
        axes.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per learnt token)" if "reward" not in records[0] else "loss")
    axes.legend(loc="upper left")
    if "reward" in records[0]:  # reinforcement learning: the reward beside the loss
        rewards = axes.twinx()
        rewards.plot([r["step"] for r in records], [r["reward"] for r in records], color="tab:green", label="reward")
        if evaluated and "val_reward" in evaluated[0]:
            rewards.plot(
                [r["step"] for r in evaluated],
                [r["val_reward"] for r in evaluated],
                "o-",
                color="tab:olive",
                label="validation reward (greedy)",
            )
        rewards.set_ylabel("mean reward")
        rewards.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def peak_memory(device: torch.device) -> str:
    """The most memory this process held: on a GPU, torch's allocations; else the process's resident peak."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
