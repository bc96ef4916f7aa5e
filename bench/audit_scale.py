"""Concurrent blind runs: aggregate model-call throughput and worker memory.

    .venv/bin/python bench/audit_scale.py            # K = 1, 2, 4 runs of one experiment: shared worker, one per run
    .venv/bin/python bench/audit_scale.py --zoo      # the zoo's nine organisms at once, one run each
    .venv/bin/python bench/audit_scale.py --markdown # the saved results as README's rows

Each run is a Scribe server, started the way `audit` starts it, driven over MCP stdio like an
agent: after its setup cell, all runs at once make the same cell of 3 `generate_text` calls (2
prompts x 20 tokens). "shared": `audit`'s way, one worker per base model (--worker-socket) with
the cores, each run's server binding its organism there, kernels on one thread each. "per
experiment": one worker per experiment file, as `audit` started them before organisms became
adapters on one base (the cores split between them). "per run": one server with its own worker
per run, as separate `agent` launches were. Writes bench/audit_results.json (the zoo:
bench/audit_zoo_results.json). Not a test: nothing here fails on a slow machine.
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
import gpu  # noqa: E402
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


async def one_run(exp: Path, args: list[str], nbdir: Path, ready: asyncio.Barrier, done: asyncio.Barrier,
                  memory: list[float]) -> tuple[float, float]:
    env = {k: v for k, v in audit.server_env().items() if not k.startswith("SCRIBE_") or k == "SCRIBE_CACHE_DIR"}
    async with connect("--experiment", str(exp), *args, "--notebook-dir", str(nbdir), env=env) as s:
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


async def batch(exps: list[Path], mode: str, tmp: Path) -> dict:
    """One run of each of `exps` at once (a path may repeat), their workers as `mode` says."""
    supervisors, workers = [], audit.Workers("local", audit.thread_budget(1)) if mode == "shared" else None
    try:
        if workers:
            args = [workers.server_args(experiment.load(e)) for e in exps]
        elif mode == "per experiment":
            by_file = {}
            for e in dict.fromkeys(exps):
                socket_path = str(tmp / f"worker-{len(by_file)}.sock")
                env = gpu.child_env("local", gpu.WORKER_SECRETS, [], audit.thread_budget(len(set(exps))))
                supervisors.append(gpu.WorkerSupervisor(experiment.model_spec(experiment.load(e)), socket_path, env))
                supervisors[-1].ensure()
                by_file[e] = ["--worker-socket", socket_path, "--threads", "1"]
            for supervisor in supervisors:  # a server refuses a socket nobody serves yet
                gpu.connect_worker(None, supervisor.socket_path, os.getpid()).close()
            args = [by_file[e] for e in exps]
        else:
            args = [[] for _ in exps]
        ready, done, memory = asyncio.Barrier(len(exps)), asyncio.Barrier(len(exps)), []
        spans = await asyncio.gather(*(one_run(e, a, tmp / f"{mode}-{len(exps)}-{i}", ready, done, memory)
                                       for i, (e, a) in enumerate(zip(exps, args))))
    finally:
        if workers:
            workers.stop()
        for supervisor in supervisors:
            supervisor.stop(wait=5)
    wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    return {"k": len(exps), "mode": mode, "experiments": len(set(exps)), "calls_per_s": len(exps) * CALLS / wall,
            "wall_s": wall, "worker_rss_mb": memory[0] if memory else 0.0}


def markdown(rows: list[dict]) -> str:
    """README rows: | measurement | median | p90 | target | (one measurement each: no p90)."""
    if rows and rows[0]["experiments"] > 1:  # the zoo: each way of serving it against one worker per experiment
        before = next(r for r in rows if r["mode"] == "per experiment")
        return "\n".join(
            f"| audit: the {r['experiments']}-organism zoo at once (one run each), {r['mode']} worker(s) — "
            f"{r['calls_per_s'] / before['calls_per_s']:.2f}x one worker per experiment; workers' RSS "
            f"{r['worker_rss_mb']:.0f} MB | {r['calls_per_s']:.2f} calls/s |  | "
            f"{'≥ 3x, RSS ≤ 1.3x one worker' if r['mode'] == 'shared' else ''} |" for r in rows)
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
    parser.add_argument("--zoo", action="store_true", help="the zoo's organisms at once, one run each: one worker "
                        "per base against one per experiment")
    parser.add_argument("--output", default="")
    parser.add_argument("--markdown", action="store_true", help="print the saved results as README rows")
    args = parser.parse_args()
    output = Path(args.output or ROOT / "bench" / ("audit_zoo_results.json" if args.zoo else "audit_results.json"))
    if args.markdown:
        print(markdown(json.loads(output.read_text())["rows"]))
        return
    zoo = sorted((ROOT / "experiments" / "zoo").glob("*.yaml"))
    plan = [(zoo, "per experiment"), (zoo, "shared")] if args.zoo else \
        [([HIDDEN] * k, mode.replace("-", " ")) for mode in args.modes for k in args.k]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scribe-bench-audit-") as tmp:
        for exps, mode in plan:
            row = asyncio.run(batch(exps, mode, Path(tmp)))
            rows.append(row)
            print(f"{row['mode']:>14}  {row['k']} runs of {row['experiments']} experiment(s):  "
                  f"{row['calls_per_s']:.2f} calls/s aggregate  ({row['wall_s']:.1f} s for {row['k'] * CALLS} calls)  "
                  f"workers {row['worker_rss_mb']:.0f} MB", flush=True)
    output.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
