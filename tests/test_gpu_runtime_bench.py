"""``benchmarks/gpu_runtime.py --device cpu --tiny``: the GPU benchmark's code path, eager, on CPU.

Its checks (replay == eager, steering changes the steered rows and leaves the others exactly alone) run
here too; on a GPU the same script captures CUDA graphs (``tests/test_cuda_graph.py`` is the unit check).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_runtime_benchmark_runs_tiny_on_cpu() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_runtime.py"), "--device", "cpu", "--tiny",
                          "--sizes", "1", "16", "--iters", "2", "--context", "8"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("checks: replay == eager") for line in lines), out.stdout
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "16"] and all(len(r) == 6 and float(r[3]) > 0 for r in rows), out.stdout
