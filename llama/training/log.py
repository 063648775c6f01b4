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
            + (f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else "")
        )
        if self.interactive:
            filled = round(30 * record["step"] / self.max_steps)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}" + ("\n" if record["step"] == self.max_steps else "")
            )
            sys.stderr.flush()
        elif record["step"] % self.every == 0 or record["step"] in (1, self.max_steps) or "val_loss" in record:
            logger.info(line)


def read_metrics(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    evaluated = [r for r in records if "val_loss" in r]
    if evaluated:
        axes.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per learnt token)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def peak_memory(device: torch.device) -> str:
    """The most memory this process held: on a GPU, torch's allocations; else the process's resident peak."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
