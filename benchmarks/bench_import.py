"""Import cost of rllm_core over a bare interpreter, and which heavy modules it pulls in.

Run: python benchmarks/bench_import.py [runs]
Target (DESIGN.md section 10): ``import rllm_core`` < 150 ms over a bare interpreter, and none of
torch, transformers, ray, tinker, verl, wandb, mlflow loaded (numpy only inside functions).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

HEAVY = ["torch", "transformers", "ray", "tinker", "verl", "wandb", "mlflow", "numpy"]
MODULES = ["rllm_core", "rllm_core.config", "rllm_core.types"]
TARGET_MS = 150.0


def wall_ms(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return (time.perf_counter() - start) * 1e3


def median_wall_ms(code: str, runs: int) -> float:
    wall_ms(code)  # warm the OS file cache and __pycache__
    return statistics.median(wall_ms(code) for _ in range(runs))


def in_process(module: str) -> dict:
    code = (
        "import sys, time, json; t = time.perf_counter(); import " + module + "; "
        "ms = (time.perf_counter() - t) * 1e3; "
        f"print(json.dumps({{'ms': ms, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    bare = median_wall_ms("pass", runs)
    print(f"bare interpreter: {bare:.1f} ms (median of {runs})")
    for module in MODULES:
        total = median_wall_ms(f"import {module}", runs)
        inner = statistics.median(in_process(module)["ms"] for _ in range(runs))
        heavy = in_process(module)["heavy"]
        over = total - bare
        print(
            f"import {module:<18} {over:6.1f} ms over bare (in-process {inner:5.1f} ms); "
            f"target < {TARGET_MS:.0f} ms: {'ok' if over < TARGET_MS else 'MISSED'} ({over / TARGET_MS:.2f}x target); "
            f"heavy modules loaded: {', '.join(heavy) or 'none'}"
        )
    peers = {"numpy": "import numpy", "pydantic+pluggy+omegaconf": "import pydantic, pluggy, omegaconf"}
    for name, code in peers.items():
        print(f"peer: {name:<26} {median_wall_ms(code, runs) - bare:6.1f} ms over bare")


if __name__ == "__main__":
    main()
