"""Scribe benchmarks: what an agent feels, measured on this machine.

    .venv/bin/python bench/run.py            # full run (~3-4 minutes on 2 CPU cores)
    .venv/bin/python bench/run.py --quick    # fewer repetitions
    .venv/bin/python bench/run.py --markdown # the saved results as README's table

Prints one table and writes bench/results.json. Latencies are medians (p90 in brackets) of
real calls through the official MCP client over stdio, into real kernels and the real worker.
Not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcp import ClientSession  # noqa: E402

import kernel  # noqa: E402
from scribe_mcp import connect  # noqa: E402

RESULTS: list[dict] = []


def record(name: str, values, unit: str = "ms", target: str = "", note: str = "") -> None:
    values = values if isinstance(values, list) else [values]
    ordered = sorted(values)
    row = {"name": name, "median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
           "n": len(values), "unit": unit, "target": target, "note": note}
    RESULTS.append(row)
    spread = f" (p90 {row['p90']:.1f})" if len(values) > 1 else ""
    print(f"{name:<58} {row['median']:>9.2f} {unit}{spread}  {target}  {note}", flush=True)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_")}


def server(nbdir: Path, *args: str):
    return connect("--notebook-dir", str(nbdir), *args, env=clean_env())


async def call(s: ClientSession, tool: str, **arguments):
    result = await s.call_tool(tool, arguments, read_timeout_seconds=600)
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    return result


async def timed(s, tool, **arguments) -> tuple[float, object]:
    start = time.perf_counter()
    result = await call(s, tool, **arguments)
    return (time.perf_counter() - start) * 1000, result


def out(result) -> str:
    """A cell's output without the header line."""
    return result.content[0].text.split("\n", 1)[1]


def setup_code(init) -> str:
    """The setup code from init_session's text, as an agent copies it."""
    return init.content[0].text.split("```python\n")[1].split("```")[0]


FLOOD = "import sys\nfor i in range(4000):\n    sys.stdout.write('y' * 1023 + '\\n'); sys.stdout.flush()\nprint('DONE')"


def plain_kernel(transport: str, tmp: Path, arguments: list[str] = ()):
    """A bare jupyter_client kernel, the baseline for Scribe's cell latency and flood throughput."""
    from jupyter_client import KernelManager

    km = KernelManager(transport=transport)
    if transport == "ipc":
        km.ip = str(tmp / f"plain-{time.monotonic_ns()}")
    km.start_kernel(extra_arguments=list(arguments))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def plain_execute(kc, code: str) -> int:
    """Run code until idle the way a plain client does; returns the lines of output received."""
    msg_id, lines = kc.execute(code), 0
    while True:
        msg = kc.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            lines += msg["content"]["text"].count("\n")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            kc.get_shell_msg(timeout=10)
            return lines


def bench_plain_kernels(reps: int, tmp: Path) -> dict:
    """Plain jupyter_client over TCP and over IPC (what Scribe uses): the '1+1' round trip."""
    found = {}
    for transport in ("tcp", "ipc"):
        km, kc = plain_kernel(transport, tmp)
        try:
            plain_execute(kc, "1+1")
            times = []
            for _ in range(reps * 5):
                start = time.perf_counter()
                plain_execute(kc, "1+1")
                times.append((time.perf_counter() - start) * 1000)
            found[transport] = times
            record(f"plain jupyter_client '1+1' round trip over {transport.upper()}", times)
            if transport == "ipc":
                found["kernel"], km = (km, kc), None  # kept for the interleaved comparisons
        finally:
            if km is not None:
                kc.stop_channels()
                km.shutdown_kernel(now=True)
    return found


# ---------------------------------------------------------------------------


def bench_startup(reps: int) -> None:
    """Spawn -> `initialize` and `tools/list` answered: what decides whether an agent CLI that does
    not wait has Scribe's tools on its first turn. Quiet, and with a CPU hog on every core."""
    imports = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mcp"], check=True, env=clean_env())
        imports.append((time.perf_counter() - start) * 1000)

    async def spawn_once(env: dict) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            async with connect("--notebook-dir", tmp, "--no-preload", env=env) as s:
                await s.list_tools()
                return (time.perf_counter() - start) * 1000

    def spawns(env: dict, n: int) -> list[float]:
        return [asyncio.run(spawn_once(env)) for _ in range(n)]

    early, sdk = clean_env(), {**clean_env(), "SCRIBE_EARLY_HANDSHAKE": "0"}
    spawns(early, 1)  # the first start after an edit writes the listing
    record("python -c 'import mcp' (the floor)", imports)
    record("server spawn -> initialize + tools/list answered", spawns(early, max(reps, 10)), target="<= 500")
    record("  same, answered by the SDK (SCRIBE_EARLY_HANDSHAKE=0)", spawns(sdk, max(reps, 10)))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        record("  same as the first, with a CPU hog on every core", spawns(early, max(reps, 10)), target="<= 1000")
        record("  same as the SDK row, with a CPU hog on every core", spawns(sdk, max(reps, 10)))
    finally:
        for hog in hogs:
            hog.kill()


async def bench_sessions(reps: int, tmp: Path, plain: dict) -> None:
    async with server(tmp / "nb") as s:
        starts = []
        for _ in range(3):
            await asyncio.sleep(1.5)  # an agent's think time: the spare kernel is ready again
            ms, started = await timed(s, "start_new_session")
            starts.append(ms)
        record("start_new_session (spare kernel + notebook file)", starts, target="<= 150")
        sid = started.structured_content["session_id"]
        # Timed once the model worker is up: the first cell starts it, and loading the model
        # takes the CPU for seconds.
        await call(s, "execute_code", session_id=sid,
                   code="from gpu import InterpClient\nInterpClient().run(lambda model, tokenizer: 1)")
        # Interleaved with the plain client on its own kernel, so both see the same machine load;
        # a third kernel with Scribe's settings separates the server's overhead from the kernel's.
        km, kc = plain["kernel"]
        tuned = plain_kernel("ipc", tmp, kernel.KERNEL_ARGS)
        beside, alone, one = times = [], [], []
        for i in range(reps * 10):
            for row in (i % 3, (i + 1) % 3, (i + 2) % 3):  # rotated: no row always runs right after another
                start = time.perf_counter()
                if row == 2:
                    await call(s, "execute_code", session_id=sid, code="1+1")
                else:
                    plain_execute((kc, tuned[1])[row], "1+1")
                times[row].append((time.perf_counter() - start) * 1000)
        tuned[1].stop_channels()
        tuned[0].shutdown_kernel(now=True)
        plain_ms = statistics.median(beside)
        record("plain jupyter_client '1+1', interleaved with the next rows", beside)
        record("  same client, kernel with Scribe's settings (kernel.KERNEL_ARGS)", alone)
        record("execute_code '1+1' (MCP end to end)", one, target=f"<= 1.3x plain ({1.3 * plain_ms:.1f})",
               note=f"{statistics.median(one) / plain_ms:.2f}x plain; "
                    f"+{statistics.median(one) - statistics.median(alone):.1f} ms over Scribe's kernel alone")
        import nbformat
        plain_rate, rates = [], []
        for _ in range(3):  # interleaved too: a flood's time swings with the machine's load
            start = time.perf_counter()
            received = plain_execute(kc, FLOOD)
            plain_rate.append(received / (time.perf_counter() - start))
            start = time.perf_counter()
            flood = await call(s, "execute_code", session_id=sid, code=FLOOD)
            seconds = time.perf_counter() - start
            cell = nbformat.read(started.structured_content["notebook_path"], as_version=4).cells[-1]
            lines = sum(o.get("text", "").count("\n") for o in cell.outputs)
            rates.append(lines / seconds)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        record("plain jupyter_client flood (4000 x 1 KB lines)", plain_rate, unit="lines/s",
               note=f"{received} of 4001 lines received")
        base = statistics.median(plain_rate)
        record("execute_code flood (4000 x 1 KB lines) into the notebook", rates, unit="lines/s",
               target=f">= 0.8x plain ({0.8 * base:.0f})",
               note=f"{statistics.median(rates) / base:.2f}x plain; {lines} of 4001 lines saved, "
                    f"{out(flood).count(chr(10))} shown to the agent")
        record("execute_code with 100 KB of output", [(await timed(
            s, "execute_code", session_id=sid, code="print('x' * 100_000)"))[0] for _ in range(reps)])
        await call(s, "execute_code", session_id=sid, code="import matplotlib.pyplot as plt")
        plot = "plt.figure(figsize=(4, 3)); plt.plot(range(10)); plt.show()"
        record("execute_code with a matplotlib plot", [(await timed(
            s, "execute_code", session_id=sid, code=plot))[0] for _ in range(reps)])

        # A fresh notebook: '1+1' at cells 1-20, then again once it holds ~500 cells and 50 plots.
        fresh = (await call(s, "start_new_session")).structured_content
        await call(s, "execute_code", session_id=fresh["session_id"], code="import matplotlib.pyplot as plt")
        cell1 = [(await timed(s, "execute_code", session_id=fresh["session_id"], code="1+1"))[0] for _ in range(20)]
        for i in range(480):  # one in ten a plot
            await call(s, "execute_code", session_id=fresh["session_id"], code=plot if i % 10 == 0 else f"x = {i}")
        cell500 = [(await timed(s, "execute_code", session_id=fresh["session_id"], code="1+1"))[0]
                   for _ in range(20)]
        size = os.path.getsize(fresh["notebook_path"]) / 1e6
        record("execute_code '1+1' at cells 1-20 of a fresh notebook", cell1)
        record("execute_code '1+1' at cell ~500 (50 plots in the notebook)", cell500,
               target=f"<= 2x cells 1-20 ({2 * statistics.median(cell1):.1f})", note=f"file {size:.1f} MB")

        # Worker: preloaded by the server, so the first client.run should not wait for it.
        ms, init = await timed(s, "init_session")
        sid2 = (await call(s, "start_new_session")).structured_content["session_id"]
        setup_ms, _ = await timed(s, "execute_code", session_id=sid2, code=setup_code(init))
        record("init_session + execute setup_code", ms + setup_ms)
        first_ms, _ = await timed(s, "execute_code", session_id=sid2,
                                  code="def trivial(model, tokenizer):\n    return 1\nclient.run(trivial)")
        record("first client.run after setup (preloaded worker)", first_ms, target="<= 1000")
        text = out(await call(s, "execute_code", session_id=sid2, code=WARM_LOOP))
        warm, local = json.loads(text.strip().splitlines()[-1])
        record("warm client.run of a trivial fn (in the kernel)", warm, target="<= 2")
        record("round-trip overhead (warm client.run - same fn in-process)",
               statistics.median(warm) - statistics.median(local))
        await bench_techniques(s, sid2, reps)
        await bench_throughput(s, setup_code(init))
        await bench_memory(s, setup_code(init))


# Timing inside the kernel (what a notebook user sees), printed back as one JSON line.
KERNEL_CLOCK = """
import json, time
def clock(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(round((time.perf_counter() - t) * 1000, 3))
    return out
"""

WARM_LOOP = KERNEL_CLOCK + """
def trivial(model, tokenizer):
    return 1
print(json.dumps([clock(lambda: client.run(trivial), 100), clock(lambda: trivial(None, None), 100)]))
"""

TECHNIQUE_LOOP = KERNEL_CLOCK + """
from techniques import logit_lens, activation_patching
lens = clock(lambda: client.run(logit_lens, text="The capital of France is"), {reps})
grid = clock(lambda: client.run(activation_patching, clean="The Eiffel Tower is located in the city of",
             corrupted="The Colosseum is located in the city of", answer=" Paris", wrong_answer=" Rome"), {grid_reps})
print(json.dumps([lens, grid]))
"""


def plain_baselines(reps: int, grid_reps: int) -> tuple[list, list]:
    """The same work in this process with plain transformers: no nnsight, no worker, no kernel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gpu

    path = gpu.resolve_model_path(gpu.ModelSpec())
    tok = AutoTokenizer.from_pretrained(path)
    # The worker's attention implementation, so both sides do the same arithmetic.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    france = tok("The capital of France is", return_tensors="pt")
    clean = tok("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    corrupted = tok("The Colosseum is located in the city of", return_tensors="pt")["input_ids"]
    paris, rome = 7042, 7268
    layers = model.model.layers

    def lens():
        with torch.no_grad():
            hidden = model(**france, output_hidden_states=True).hidden_states[1:]
            stacked = torch.stack([h[0, -1] for h in hidden])
            probs = model.lm_head(model.model.norm(stacked)).softmax(-1)
            _, ids = probs.topk(5)
            tok.batch_decode([[i] for i in ids.reshape(-1).tolist()])  # the same output: readable tokens

    def grid():
        with torch.no_grad():
            acts = {}
            hooks = [layer.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o)) for k, layer in enumerate(layers)]
            model(clean)
            for h in hooks:
                h.remove()
            cells = [(layer, pos) for layer in range(30) for pos in range(clean.shape[1])]
            for start in range(0, len(cells), 32):
                chunk = cells[start:start + 32]

                def patch(m, i, o, k):
                    for row, (layer, pos) in enumerate(chunk, start=1):
                        if layer == k:
                            o[row, pos] = acts[k][0, pos]
                    return o
                hooks = [layer.register_forward_hook(lambda m, i, o, k=k: patch(m, i, o, k)) for k, layer in enumerate(layers)]
                logits = model(corrupted.repeat(len(chunk) + 1, 1)).logits
                (logits[:, -1, paris] - logits[:, -1, rome]).tolist()
                for h in hooks:
                    h.remove()

    def clock(fn, n):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return times

    return clock(lens, reps), clock(grid, grid_reps)


async def bench_techniques(s, sid: str, reps: int) -> None:
    lens_reps, grid_reps = reps * 4, max(3, reps // 2)
    await call(s, "execute_code", session_id=sid, code=TECHNIQUE_LOOP.format(reps=1, grid_reps=1))  # warm-up
    text = out(await call(s, "execute_code", session_id=sid,
                          code=TECHNIQUE_LOOP.format(reps=lens_reps, grid_reps=grid_reps)))
    lens, grid = json.loads(text.strip().splitlines()[-1])
    plain_lens, plain_grid = plain_baselines(lens_reps, grid_reps)
    record("logit lens, all 30 layers, via client.run", lens)
    record("  same with plain transformers in-process", plain_lens)
    record("  ratio", statistics.median(lens) / statistics.median(plain_lens), unit="x", target="<= 1.1")
    record("activation patching 30x10 grid, via client.run", grid)
    record("  same with plain transformers + hooks in-process", plain_grid)
    record("  ratio", statistics.median(grid) / statistics.median(plain_grid), unit="x", target="<= 1.1")


THROUGHPUT = """
import time
def square(model, tokenizer, k):
    return k * k
start = time.perf_counter()
ok = all(client.run(square, k=i) == i * i for i in range(25))
print(ok, (time.perf_counter() - start) * 1000)
"""


async def bench_throughput(s, setup: str) -> None:
    sids = [(await call(s, "start_new_session")).structured_content["session_id"] for _ in range(4)]
    for sid in sids:
        await call(s, "execute_code", session_id=sid, code=setup)
    start = time.perf_counter()
    results = await asyncio.gather(*(call(s, "execute_code", session_id=sid, code=THROUGHPUT) for sid in sids))
    total = (time.perf_counter() - start) * 1000
    lines = [out(r).split() for r in results]
    record("4 sessions x 25 client.run at once: total", total,
           note=f"all correct: {all(line[0] == 'True' for line in lines)}")
    for sid in sids:
        await call(s, "shutdown_session", session_id=sid)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def process_tree() -> dict[int, tuple[int, str]]:
    tree = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                tree[int(entry)] = (ppid, cmd)
            except OSError:
                pass
    return tree


def memory_by_role() -> dict[str, float]:
    tree = process_tree()
    server = next(pid for pid, (_, cmd) in tree.items() if "scribe_mcp.py" in cmd and pid != os.getpid())
    roles = {"server": rss_mb(server), "worker": 0.0, "kernels": 0.0, "n_kernels": 0}
    for pid, (_, cmd) in tree.items():
        if "gpu.py --socket" in cmd and "--owner " + str(server) in cmd:
            roles["worker"] += rss_mb(pid)
        elif "ipykernel_launcher" in cmd and _descends(pid, server, tree):
            roles["kernels"] += rss_mb(pid)
            roles["n_kernels"] += 1
    return roles


def _descends(pid: int, ancestor: int, tree) -> bool:
    while pid in tree and pid > 1:
        pid = tree[pid][0]
        if pid == ancestor:
            return True
    return False


async def bench_memory(s, setup: str) -> None:
    listed = (await call(s, "list_sessions")).structured_content["sessions"]
    for session in listed:
        await call(s, "shutdown_session", session_id=session["session_id"])
    sids = []
    for n in (1, 4, 8):
        while len(sids) < n:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            await call(s, "execute_code", session_id=sid, code=setup + "\nclient.run(lambda model, tokenizer: 1)")
            sids.append(sid)
        roles = memory_by_role()
        record(f"worker memory (RSS) with {n} open session(s)", roles["worker"], unit="MB",
               note=f"server {roles['server']:.0f} MB, kernels {roles['kernels']:.0f} MB "
                    f"({roles['n_kernels']} x {roles['kernels'] / max(1, roles['n_kernels']):.0f} MB)")


async def bench_first_call_cold(tmp: Path) -> None:
    """A server without preload: the first client.run starts the worker and loads the model."""
    async with server(tmp / "cold", "--no-preload") as s:
        sid = (await call(s, "start_new_session")).structured_content["session_id"]
        await call(s, "execute_code", session_id=sid, code="from gpu import InterpClient\nclient = InterpClient(preload=False)")
        ms, _ = await timed(s, "execute_code", session_id=sid, code="client.run(lambda model, tokenizer: 1)")
        record("first client.run, cold (worker start + model load from cache)", ms, target="<= 5000")


def markdown(results: list[dict]) -> str:
    """The results as the table in README.md's Performance section."""
    def fmt(value: float, unit: str) -> str:
        if unit == "x":
            return f"{value:.2f}×"
        return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"

    rows = ["| measurement | median | p90 | target |", "| --- | --- | --- | --- |"]
    for r in results:
        name = r["name"].replace("->", "→")
        name = "&nbsp;&nbsp;" + name.strip() if name.startswith("  ") else name
        note = f" — {r['note']}" if r["note"] else ""
        p90 = fmt(r["p90"], r["unit"]) if r["n"] > 1 else ""
        rows.append(f"| {name}{note} | {fmt(r['median'], r['unit'])} | {p90} | {r['target'].replace('<=', '≤')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--markdown", action="store_true", help="print the saved results as a markdown table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())["results"]))
        return
    reps = 5 if args.quick else 10
    print(f"Scribe bench on {platform.node()} ({os.cpu_count()} CPUs), {date.today()}\n")
    bench_startup(reps)
    with tempfile.TemporaryDirectory() as tmp:
        plain = bench_plain_kernels(reps, Path(tmp))
        asyncio.run(bench_first_call_cold(Path(tmp)))
        asyncio.run(bench_sessions(reps, Path(tmp), plain))
    Path(args.output).write_text(json.dumps({"date": str(date.today()), "machine": platform.node(),
                                             "cpus": os.cpu_count(), "results": RESULTS}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
