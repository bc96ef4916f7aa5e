"""K concurrent blind runs of one experiment: aggregate model-call throughput and worker memory.

    .venv/bin/python bench/audit_scale.py            # K = 1, 2, 4, shared worker and one worker per run
    .venv/bin/python bench/audit_scale.py --markdown # the saved results as README's rows

Each run is a Scribe server on the hidden-system-prompt demo, started the way `audit` starts it,
driven over MCP stdio like an agent: after its setup cell, all K runs at once make the same cell
of 3 `generate_text` calls (2 prompts x 20 tokens). "shared": `audit`'s way, one worker for the
experiment (--worker-socket) with the cores, kernels on one thread each. "per run": one server
with its own worker per run, as separate `agent` launches were. Writes bench/audit_results.json.
Not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import audit  # noqa: E402
import experiment  # noqa: E402
from scribe_mcp import connect  # noqa: E402

HIDDEN = ROOT / "experiments" / "hidden_system_prompt.yaml"
SETUP = ("from gpu import InterpClient\nfrom techniques import generate_text\nimport time\nclient = InterpClient()\n"
         "client.run(lambda model, tokenizer: 1)\n")
CALLS = 3
WORK = ("for _ in range(%d):\n    client.run(generate_text, prompt=['Tell me a story.', 'What is 2+2?'], "
        "max_new_tokens=20)\nprint('done')\n" % CALLS)


def worker_rss_mb() -> float:
    """Resident memory of every Scribe model worker on the machine (gpu.py --socket ...)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(part.endswith(b"gpu.py") for part in cmd) and b"--socket" in cmd:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        except (OSError, AttributeError):
            continue
    return total


async def one_run(args: list[str], nbdir: Path, ready: asyncio.Barrier, done: asyncio.Barrier,
                  memory: list[float]) -> tuple[float, float]:
    env = {k: v for k, v in audit.server_env().items() if not k.startswith("SCRIBE_")}
    async with connect("--experiment", str(HIDDEN), *args, "--notebook-dir", str(nbdir), env=env) as s:
        started = await s.call_tool("start_new_session", {}, read_timeout_seconds=900)
        sid = json.loads(started.content[0].text)["session_id"]
        await s.call_tool("execute_code", {"session_id": sid, "code": SETUP}, read_timeout_seconds=900)
        await ready.wait()
        t0 = time.monotonic()
        result = await s.call_tool("execute_code", {"session_id": sid, "code": WORK}, read_timeout_seconds=1800)
        t1 = time.monotonic()
        assert "done" in result.content[0].text, result.content[0].text
        if await done.wait() == 0:  # every worker still runs: measure them once
            memory.append(worker_rss_mb())
        return t0, t1


async def batch(k: int, shared: bool, tmp: Path) -> dict:
    workers = audit.Workers("local", audit.thread_budget(1)) if shared else None
    try:
        args = workers.server_args(experiment.load(HIDDEN)) if shared else []
        ready, done, memory = asyncio.Barrier(k), asyncio.Barrier(k), []
        spans = await asyncio.gather(*(one_run(args, tmp / f"{shared}-{k}-{i}", ready, done, memory)
                                       for i in range(k)))
    finally:
        if workers:
            workers.stop()
    wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    return {"k": k, "mode": "shared" if shared else "per run", "calls_per_s": k * CALLS / wall, "wall_s": wall,
            "worker_rss_mb": memory[0] if memory else 0.0}


def markdown(rows: list[dict]) -> str:
    """README rows: | measurement | median | p90 | target | (one measurement each: no p90)."""
    base = {r["mode"]: r["calls_per_s"] for r in rows if r["k"] == 1}
    lines = []
    for r in rows:
        ratio = r["calls_per_s"] / base[r["mode"]]
        target = "≥ 0.8x one run" if r["mode"] == "shared" and r["k"] > 1 else ""
        lines.append(f"| audit: {r['k']} concurrent run(s) of one experiment, {r['mode']} worker — {ratio:.2f}x one "
                     f"run; workers' RSS {r['worker_rss_mb']:.0f} MB | {r['calls_per_s']:.2f} calls/s |  | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=("shared", "per-run"), default=["shared", "per-run"])
    parser.add_argument("--output", default=str(ROOT / "bench" / "audit_results.json"))
    parser.add_argument("--markdown", action="store_true", help="print the saved results as README rows")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())["rows"]))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="scribe-bench-audit-") as tmp:
        for shared in [mode == "shared" for mode in args.modes]:
            for k in args.k:
                row = asyncio.run(batch(k, shared, Path(tmp)))
                rows.append(row)
                print(f"{row['mode']:>8}  K={k}:  {row['calls_per_s']:.2f} calls/s aggregate  "
                      f"({row['wall_s']:.1f} s for {k * CALLS} calls)  workers {row['worker_rss_mb']:.0f} MB",
                      flush=True)
    Path(args.output).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
