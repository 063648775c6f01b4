"""Choices timed on this machine (the CPU thread count, the float32 kernel per weight shape),
remembered across runs in the user's cache folder.

A timing is noisy: on a machine shared with other work, two runs can time the same model and choose
differently. A compiled decode step is compiled for what was chosen (the thread count, which kernel
each layer calls), so a choice that flips from run to run also misses the compiler's cache, and every
run compiles again. The first run on a machine times and writes its choice here; later runs read it.

The file is ``$LLAMA_CACHE_DIR/timed_choices.json`` (default: ``$XDG_CACHE_HOME/llama``, else
``~/.cache/llama``), one JSON object whose keys say the machine (CPU, cores, torch's version and
vector instructions) and what was timed. Delete it to time again, e.g. after changing what else runs
on the machine. A file that cannot be read is timed over; one that cannot be written is said once and
the run goes on with its own timing.
"""

import json
import logging
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

FILE_NAME = "timed_choices.json"


def cache_file() -> Path:
    folder = (
        os.environ.get("LLAMA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama"
    )
    return Path(folder) / FILE_NAME


@lru_cache(maxsize=None)
def machine() -> str:
    """The CPU's model name, its cores, torch's version and the vector instructions its kernels use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def _read(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("%s cannot be read (%s): timing again", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def recall(what: str) -> Optional[Any]:
    """The value remembered for ``what`` (a description of what was timed) on this machine, or None."""
    return _read(cache_file()).get(f"{machine()}: {what}")


def remember(what: str, value: Any) -> None:
    """Write ``value`` for ``what`` on this machine, replacing the file whole (a reader never sees half)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[f"{machine()}: {what}"] = value
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{FILE_NAME}.", delete=False) as tmp:
            try:
                json.dump(data, tmp, indent=1, sort_keys=True)
                tmp.close()
                os.replace(tmp.name, path)
            except BaseException:
                os.unlink(tmp.name)
                raise
    except OSError as error:
        logger.warning("the timed choice could not be remembered in %s (%s): the next run times again", path, error)
