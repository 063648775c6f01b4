"""bench/gpu.py, the one command of a machine lent with a GPU for minutes, runs end to end on the CPU
with tiny shapes (--dry_run), so that it cannot rot between the rare sessions that have a GPU."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_passes_every_check_prints_each_mode_and_skips_nothing():
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=420
    )  # mostly compiling one step; minutes when the machine is loaded
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for mode in ("bf16", "int8", "int4"):
        assert any(line.startswith(f"{mode} ") for line in lines), result.stdout
    assert any(line.startswith("int8 compiled ") for line in lines), result.stdout
    assert "ok: int8: compiled greedy tokens equal the eager ones" in result.stdout
    assert "ok: pytest --device cpu" in result.stdout
    assert "ok: torchrun --nproc_per_node 1 (gloo)" in result.stdout
    assert "ok: speculative decoding (exit 0" in result.stdout and "ok: server, mixed workload (exit 0" in result.stdout
    assert "skipped" not in result.stdout
    assert any(line.startswith("the KV cache pool: bf16, 64 slots") for line in lines), result.stdout
    title = next(i for i, line in enumerate(lines) if line.startswith("the KV cache pool stored in 8 bits: "))
    pools = [line.split()[0] for line in lines[title + 2 : title + 5]]  # a bfloat16 model's is float32 on a CPU
    assert pools == ["float32", "int8", "float8_e4m3fn"], result.stdout
    assert "FAILED" not in result.stdout
