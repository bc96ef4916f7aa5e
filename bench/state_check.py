"""What the worker's after-call checks cost (#35): put back what a call rebound in torch, the
techniques and sys.modules, and a fresh RNG state, against a warm client.run round trip.

    .venv/bin/python bench/state_check.py     # ~30 s; writes bench/state_check.json

The round trip is a trivial fn through a real worker over its socket (its checks included); the
check alone is timed in this process on the same model. Not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu  # noqa: E402


def trivial(model, tokenizer):
    return 1


def main() -> None:
    spec = gpu.ModelSpec()
    socket_path = os.path.join(tempfile.mkdtemp(prefix="scribe-bench-"), "worker.sock")
    backend = gpu.LocalBackend(spec, socket_path, os.getpid())
    payload = gpu.dumps_call(trivial, (), {})
    for _ in range(20):
        backend.call(payload, 60, lambda *_: None)
    trips = []
    for _ in range(300):
        start = time.perf_counter()
        backend.call(payload, 60, lambda *_: None)
        trips.append((time.perf_counter() - start) * 1000)
    gpu.stop_worker(socket_path)
    executor = gpu.load_executor(spec)
    executor.execute(payload, lambda *_: None)
    checks = []
    for _ in range(300):
        start = time.perf_counter()
        executor._check_state()
        checks.append((time.perf_counter() - start) * 1000)
    row = {"round_trip_ms": statistics.median(trips), "check_ms": statistics.median(checks)}
    row["share"] = row["check_ms"] / row["round_trip_ms"]
    (ROOT / "bench" / "state_check.json").write_text(json.dumps(row, indent=1))
    print(f"warm client.run round trip {row['round_trip_ms']:.3f} ms (checks included); the after-call checks "
          f"{row['check_ms']:.3f} ms: {row['share']:.0%} of it (target <= 5%)")


if __name__ == "__main__":
    main()
