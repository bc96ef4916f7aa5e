"""The MCP server end to end, spawned over stdio (and HTTP) and driven by the official MCP client."""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest
import nbformat
from conftest import ROOT
from mcp import ClientSession

from scribe_mcp import connect

import techniques

SERVER = str(ROOT / "scribe_mcp.py")
FRANCE_TECHNIQUE = '''
def top_token(model, tokenizer, text):
    import torch
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return tokenizer.decode(logits.argmax())

client.run(top_token, text="The capital of France is")
'''


def server_env() -> dict:
    # The server under test starts its own worker; the test run's shared one must not leak in.
    # The cache stays: it is where this run's model, SAE and organisms are (.ci/run uses a fresh one).
    return {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_") or k == "SCRIBE_CACHE_DIR"}


def scribe(nbdir: Path, *args: str):
    return connect("--notebook-dir", str(nbdir), *args, env=server_env())


async def call(session: ClientSession, tool: str, **arguments):
    result = await session.call_tool(tool, arguments, read_timeout_seconds=900)  # past the cell timeout: a busy machine is slow, not broken
    assert not result.is_error, result.content[0].text
    return result


def text(result) -> str:
    return result.content[0].text


def as_claude_sees(result) -> str:
    """What a client that prefers structured content (Claude Code) passes to the model."""
    if result.structured_content is not None:
        return json.dumps(result.structured_content)
    return "\n".join(c.text for c in result.content if c.type == "text")


def test_reference_workflow_end_to_end(tmp_path):
    nbdir = tmp_path / "notebooks"

    async def scenario():
        async with scribe(nbdir) as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert {"start_new_session", "start_session_resume_notebook", "start_session_continue_notebook",
                    "execute_code", "edit_cell", "add_markdown", "init_session", "shutdown_session",
                    "restart_session", "list_sessions", "notebook_outline", "read_cell", "insert_cell",
                    "edit_markdown", "delete_cell", "move_cell"} == set(tools)
            assert "-1, the default, is the last code cell" in json.dumps(tools["edit_cell"].input_schema)
            for tool in tools.values():  # every input documented, descriptions without docstring indentation
                assert "\n    " not in tool.description
                assert all(p.get("description") for p in tool.input_schema["properties"].values()), tool.name
            assert tools["notebook_outline"].annotations.read_only_hint
            assert tools["delete_cell"].annotations.destructive_hint
            assert tools["list_sessions"].output_schema and not tools["execute_code"].output_schema

            started = (await call(s, "start_new_session", experiment_name="france")).structured_content
            sid, path = started["session_id"], Path(started["notebook_path"])
            assert path.parent == nbdir.resolve() and path.name.endswith("_france.ipynb")

            init = await call(s, "init_session")
            seen = as_claude_sees(init)
            assert init.structured_content is None and seen.startswith("Setup code (run it once with execute_code):")
            setup_code = seen.split("```python\n")[1].split("```")[0]
            assert setup_code.startswith("from gpu import InterpClient") and "client = InterpClient()" in setup_code
            assert "Model: SmolLM2-135M-Instruct" in seen and "client.run" in seen
            # The speed line never makes init_session wait: measured, or where to read it once it is.
            assert "Speed (measured at load, cpu, float32, " in seen or "`print(client.speed)` in a cell" in seen, seen
            assert "- logit_lens(text" in seen and "- activation_patching(" in seen
            # Each technique's summary is its docstring's first sentence, however it is wrapped.
            for entry in techniques.catalog():
                assert f"- {entry['signature']}: {entry['summary']}" in seen, entry["name"]
                assert entry["summary"].endswith(".") and " Returns " not in entry["summary"], entry["summary"]

            setup = await call(s, "execute_code", session_id=sid, code=setup_code)
            assert as_claude_sees(setup).startswith("[cell 0 · In [1] · ok]\n<InterpClient")
            answer = await call(s, "execute_code", session_id=sid, code=FRANCE_TECHNIQUE)
            assert as_claude_sees(answer) == "[cell 1 · In [2] · ok]\nOut[2]: ' Paris'\n"

            md = await call(s, "add_markdown", session_id=sid, content="## Finding\nParis.")
            assert md.structured_content["cell_index"] == 2

            edited = await call(s, "edit_cell", session_id=sid, cell_index=-1,
                                code=FRANCE_TECHNIQUE.replace("France", "Italy"))
            assert as_claude_sees(edited).startswith("[cell 1 · In [3] · ok]") and "' Rome'" in text(edited)

            failed = await call(s, "execute_code", session_id=sid, code="client.run(lambda m, t: {}['missing'])")
            seen = as_claude_sees(failed)
            assert seen.startswith("error: KeyError: 'missing'  [cell 3 · In [4]]"), seen
            assert seen.count("Traceback in the model worker") == 1

            plot = await call(s, "execute_code", session_id=sid,
                              code="import matplotlib.pyplot as plt\nplt.plot([1, 2, 4])\nplt.show()")
            images = [c for c in plot.content if c.type == "image"]
            assert len(images) == 1 and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data)[:4] == b"\x89PNG"

            # Reading and reshaping the notebook through tools, with one numbering.
            top = await call(s, "insert_cell", session_id=sid, cell_index=0, content="# Capitals", cell_type="markdown")
            assert text(top) == "[cell 0 · markdown inserted]"
            outline = (await call(s, "notebook_outline", session_id=sid)).structured_content["cells"]
            assert [(c["index"], c["type"], c["status"]) for c in outline] == [
                (0, "markdown", "markdown"), (1, "code", "ok"), (2, "code", "ok"), (3, "markdown", "markdown"),
                (4, "code", "error"), (5, "code", "ok")]
            long = await call(s, "execute_code", session_id=sid, code="print('A' * 9000 + 'END')")
            assert "read_cell shows all of it" in text(long)
            part = (await call(s, "read_cell", session_id=sid, cell_index=6, offset=8900, limit=200)).structured_content
            assert part["output"] == "A" * 100 + "END\n" and part["more"] is False and part["output_chars"] == 9004
            assert (await call(s, "move_cell", session_id=sid, cell_index=3, to_index=1)).structured_content["cell_index"] == 1
            await call(s, "edit_markdown", session_id=sid, cell_index=1, content="## Finding\nParis and Rome.")
            await call(s, "delete_cell", session_id=sid, cell_index=-1)
            await call(s, "delete_cell", session_id=sid, cell_index=4)  # the failed cell

            listed = (await call(s, "list_sessions")).structured_content["sessions"]
            assert [x["session_id"] for x in listed] == [sid]
            await call(s, "shutdown_session", session_id=sid)

            nb = nbformat.read(path, as_version=4)
            nbformat.validate(nb)
            assert [c.cell_type for c in nb.cells] == ["markdown", "markdown", "code", "code", "code"]
            assert "Rome" in nb.cells[3].outputs[0]["data"]["text/plain"]
            from_disk = (await call(s, "notebook_outline", notebook_path=path.name)).structured_content
            assert len(from_disk["cells"]) == 5

            resumed = await call(s, "start_session_resume_notebook", notebook_path=path.name)
            seen = as_claude_sees(resumed)
            assert f"notebook_path: {path}" in seen and "re-ran 3 code cells: 3 ok, 0 failed" in seen
            assert "  0 markdown: # Capitals" in seen and "  3 code ok" in seen
            new_sid = seen.split("\n")[0].split(": ")[1]
            again = await call(s, "execute_code", session_id=new_sid,
                               code="client.run(top_token, text='The capital of France is')")
            assert "' Paris'" in text(again)
            clash = await s.call_tool("start_session_resume_notebook", {"notebook_path": path.name})
            assert clash.is_error and f"open in live session {new_sid}" in text(clash)

            forked = as_claude_sees(await call(s, "start_session_continue_notebook", notebook_path=str(path),
                                               experiment_name="fork"))
            assert "_fork_continued.ipynb" in forked and "re-ran 4 code cells" in forked
            assert len(nbformat.read(path, as_version=4).cells) == 6  # original: only the resumed session's cell

    anyio.run(scenario)


def test_errors_are_clear_tool_errors(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "broken.ipynb").write_text("{oops")
    (tmp_path / "outside.ipynb").write_text("{}")

    async def scenario():
        async with scribe(nbdir, "--no-preload") as s:
            async def error(tool, **arguments):
                result = await s.call_tool(tool, arguments)
                assert result.is_error
                return text(result)

            assert "unknown session_id 'nope'" in await error("execute_code", session_id="nope", code="1")
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            assert "has no code cells yet" in await error("edit_cell", session_id=sid, code="1")
            await call(s, "execute_code", session_id=sid, code="x = 1")
            assert "valid indices are 0..0" in await error("edit_cell", session_id=sid, code="1", cell_index=3)
            assert "code is empty" in await error("execute_code", session_id=sid, code="   ")
            assert "code is empty" in await error("edit_cell", session_id=sid, code="")
            assert "outside the notebook directory" in await error(
                "start_session_resume_notebook", notebook_path=str(tmp_path / "outside.ipynb"))
            assert "not a valid Jupyter notebook" in await error(
                "start_session_continue_notebook", notebook_path="broken.ipynb")
            assert "no notebook at" in await error("start_session_resume_notebook", notebook_path="nope.ipynb")
            assert "either session_id" in await error("notebook_outline")
            assert "cell_type must be" in await error("insert_cell", session_id=sid, cell_index=0, content="x",
                                                      cell_type="raw")

            died = await call(s, "execute_code", session_id=sid, code="import os; os._exit(1)")
            assert text(died).startswith("error: KernelDied: the kernel died") and "fresh kernel" in text(died)
            assert "NameError" in text(await call(s, "execute_code", session_id=sid, code="x"))
            restarted = await call(s, "restart_session", session_id=sid)
            assert restarted.structured_content["status"] == "restarted"
            assert "2" in text(await call(s, "execute_code", session_id=sid, code="1 + 1"))

    anyio.run(scenario)


def test_long_cells_send_progress_and_cancel_interrupts(tmp_path):
    async def scenario():
        async with scribe(tmp_path / "nb", "--no-preload") as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            updates = []

            async def on_progress(progress, total, message):
                updates.append(message)

            code = "import time\nfor i in range(8):\n    print('step', i, flush=True)\n    time.sleep(1)"
            result = await s.call_tool("execute_code", {"session_id": sid, "code": code},
                                       progress_callback=on_progress)
            assert "step 7" in text(result)
            assert len(updates) >= 2 and any("step" in m for m in updates)
            updates.clear()  # output once, then silence: told once, then only short heartbeats
            await s.call_tool("execute_code", {"session_id": sid, "code": "import time\nprint('only line', flush=True)\n"
                                               "time.sleep(20)"}, progress_callback=on_progress)
            assert sum("only line" in m for m in updates) == 1, updates
            assert 1 <= len(updates) <= 4 and all(len(m) < 200 for m in updates), updates

            with anyio.move_on_after(2):
                await s.call_tool("execute_code", {"session_id": sid, "code": "import time\nwhile True: time.sleep(0.1)"})
            after = await call(s, "execute_code", session_id=sid, code="'free again'")
            assert "free again" in text(after)
            nb = nbformat.read(next((tmp_path / "nb").glob("*.ipynb")), as_version=4)
            assert nb.cells[2].outputs[-1]["ename"] == "KeyboardInterrupt"

    anyio.run(scenario)


def pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


def test_closing_stdin_stops_kernels_and_worker(tmp_path):
    nbdir = tmp_path / "nb"

    async def scenario():
        async with scribe(nbdir) as s:
            pids = []
            for _ in range(2):
                sid = (await call(s, "start_new_session")).structured_content["session_id"]
                await call(s, "execute_code", session_id=sid, code="import os\nfrom gpu import InterpClient\nclient = InterpClient()")
                pids.append(int(text(await call(s, "execute_code", session_id=sid, code="print(os.getpid())")).split()[-1]))
            worker = text(await call(s, "execute_code", session_id=sid,
                                     code="print(client.run(lambda model, tokenizer: __import__('os').getpid()))"))
            pids.append(int(worker.split()[-1]))
            await call(s, "execute_code", session_id=sid, code="'last cell'")
            return pids

    pids = anyio.run(scenario)
    deadline = time.monotonic() + 10
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_alive(pids) == []
    saved = [nbformat.read(p, as_version=4) for p in nbdir.glob("*.ipynb")]
    assert any(c.source == "'last cell'" for nb in saved for c in nb.cells)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_transport_requires_the_bearer_token(tmp_path):
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    port, token = free_port(), "test-token-123"
    env = {**server_env(), "SCRIBE_TOKEN": token}
    proc = subprocess.Popen([sys.executable, SERVER, "--transport", "http", "--port", str(port), "--no-preload",
                             "--notebook-dir", str(tmp_path / "nb")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except OSError:
                assert time.monotonic() < deadline, "HTTP server did not come up"
                time.sleep(0.1)

        async def scenario():
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    sid = (await call(s, "start_new_session")).structured_content["session_id"]
                    assert "Out[1]: 4" in text(await call(s, "execute_code", session_id=sid, code="2 + 2"))

            wrong = create_mcp_http_client(headers={"Authorization": "Bearer wrong"})
            async with wrong:
                response = await wrong.post(url, json={})
                assert response.status_code == 401

        anyio.run(scenario)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_server_process_stays_light_and_prints_config():
    code = ("import sys; sys.argv = ['x']; import scribe_mcp; scribe_mcp._technique_catalog(); "
            "print('torch' in sys.modules, 'nnsight' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=server_env())
    assert out.stdout.split() == ["False", "False"], out.stderr
    config = subprocess.run([sys.executable, SERVER, "--print-config"], capture_output=True, text=True)
    assert "claude mcp add-json scribe '" in config.stdout and "required = true" in config.stdout
    snippet = json.loads(config.stdout[config.stdout.index("# Any MCP client"):].split("\n", 1)[1])
    assert snippet["mcpServers"]["scribe"] == {"command": sys.executable, "args": [SERVER], "alwaysLoad": True}
    helptext = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True).stdout
    for flag in ("--model", "--notebook-dir", "--device", "--dtype", "--preload", "--cell-timeout",
                 "--output-limit", "--transport", "--host", "--port"):
        assert flag in helptext


def test_sigterm_saves_notebooks_and_stops_everything(tmp_path):
    nbdir = tmp_path / "nb-sigterm"
    proc = subprocess.Popen([sys.executable, SERVER, "--notebook-dir", str(nbdir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=server_env())

    def rpc(message: dict) -> dict | None:
        proc.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
        proc.stdin.flush()
        if "id" not in message:
            return None
        while True:
            reply = json.loads(proc.stdout.readline())
            if reply.get("id") == message["id"]:
                return reply

    rpc({"id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                     "clientInfo": {"name": "raw", "version": "0"}}})
    rpc({"method": "notifications/initialized"})

    def tool(i, name, **arguments):
        return rpc({"id": i, "method": "tools/call", "params": {"name": name, "arguments": arguments}})["result"]

    sid = tool(2, "start_new_session")["structuredContent"]["session_id"]
    tool(3, "execute_code", session_id=sid, code="from gpu import InterpClient\nclient = InterpClient()")
    pids = tool(4, "execute_code", session_id=sid,
                code="import os\nprint(os.getpid(), client.run(lambda model, tokenizer: __import__('os').getpid()))")
    kernel_pid, worker_pid = map(int, pids["content"][0]["text"].splitlines()[1].split())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) is not None
    deadline = time.monotonic() + 10
    while pids_alive([kernel_pid, worker_pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_alive([kernel_pid, worker_pid]) == []
    nb = nbformat.read(next(nbdir.glob("*.ipynb")), as_version=4)
    assert len(nb.cells) == 2 and nb.cells[1].outputs


def test_cancels_through_mcp_are_precise_and_resume_reports_each_cell(tmp_path):
    async def scenario():
        async with scribe(tmp_path / "nb", "--no-preload") as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            results = {}

            async def long_cell():
                results["long"] = await call(s, "execute_code", session_id=sid,
                                             code="import time\ntime.sleep(2)\n'long done'")

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_cell)
                await anyio.sleep(0.5)
                # reading the notebook does not wait for the running cell
                assert (await call(s, "read_cell", session_id=sid, cell_index=0)).structured_content["source"]
                assert len((await call(s, "notebook_outline", session_id=sid)).structured_content["cells"]) == 1
                assert "long" not in results  # answered while the cell still ran
                with anyio.move_on_after(0.5):  # queued behind the running cell, then cancelled
                    await s.call_tool("execute_code", {"session_id": sid, "code": "queued_ran = True"})
            assert "'long done'" in text(results["long"])  # not interrupted
            assert "NameError" in text(await call(s, "execute_code", session_id=sid, code="queued_ran"))
            outline = (await call(s, "notebook_outline", session_id=sid)).structured_content["cells"]
            assert [c["first_line"] for c in outline] == ["import time", "queued_ran"]

            for i in range(3):
                await call(s, "execute_code", session_id=sid, code=f"import time\ntime.sleep(0.6)\nv{i} = {i}")
            path = (await call(s, "shutdown_session", session_id=sid)).structured_content["notebook_path"]
            updates = []

            async def on_progress(progress, total, message):
                updates.append(message)

            result = await s.call_tool("start_session_resume_notebook", {"notebook_path": path},
                                       progress_callback=on_progress, read_timeout_seconds=120)
            assert not result.is_error
            running = [m for m in updates if "running cell" in m]
            assert any("(3/5)" in m for m in running) and any("(5/5)" in m for m in running), updates
            resumed = text(result).split("\n")[0].split(": ")[1]
            await call(s, "shutdown_session", session_id=resumed)

            with anyio.move_on_after(1.5):  # cancel mid-way: the session stays open with what ran
                await s.call_tool("start_session_resume_notebook", {"notebook_path": path},
                                  progress_callback=on_progress)
            await anyio.sleep(1.0)
            live = (await call(s, "list_sessions")).structured_content["sessions"]
            assert [x["notebook_path"] for x in live] == [path]
            later = await call(s, "execute_code", session_id=live[0]["session_id"], code="'v2' in dir()")
            assert "Out[" in text(later) and "False" in text(later)  # the cells after the cancel never ran

    anyio.run(scenario)


def open_fds(pid) -> dict:
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return found


PIPES = f"""import contextlib, json, os
{inspect.getsource(open_fds)}
print(json.dumps(open_fds(os.getpid())))
print(json.dumps(open_fds(os.getppid())))
"""


def test_the_stdio_wire_takes_a_3_mb_cell_and_answers_in_order(tmp_path):
    """stdio is read on the event loop: a request line far beyond asyncio's 64 KiB default
    arrives whole, answers to calls sent together all come back, and the wire is the server's alone."""
    big = "blob = '" + "x" * 3_000_000 + "'\nprint(len(blob))"

    async def scenario():
        async with scribe(tmp_path / "nb") as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            assert text(await call(s, "execute_code", session_id=sid, code=big)).split()[-1] == "3000000"
            # The wire is the server's alone: its fds 0 and 1 are /dev/null and stderr, and the
            # kernel (the spare started with the server) holds neither end of it.
            found = text(await call(s, "execute_code", session_id=sid, code=PIPES))
            kernel_fds, server_fds = (json.loads(line) for line in found.splitlines()[-2:])
            assert server_fds["0"] == "/dev/null" and server_fds["1"] == server_fds["2"], server_fds
            wire = {fd for fd in server_fds.values() if fd.startswith("pipe:")} & set(
                open_fds(os.getpid()).values()) - {server_fds["2"]}
            assert wire and not wire & set(kernel_fds.values()), (wire, kernel_fds)
            results = {}

            async def one(i):
                results[i] = text(await call(s, "execute_code", session_id=sid, code=f"print({i} * 2)"))

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
            assert all(results[i].split()[-1] == str(i * 2) for i in range(20)), results

    anyio.run(scenario)


def test_a_server_started_in_a_terminal_still_speaks_mcp(tmp_path):
    """stdin a terminal (not a pipe): the SDK's own stdio transport serves it."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, SERVER, "--notebook-dir", str(tmp_path / "nb")], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env())
    os.close(slave)
    try:
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
        os.write(master, (json.dumps(hello) + "\n").encode())
        assert select.select([proc.stdout], [], [], 60)[0], "no answer within 60 s"
        answer = json.loads(proc.stdout.readline())
        assert answer["id"] == 1 and answer["result"]["serverInfo"]["name"] == "scribe", answer
        assert b"waiting for an MCP client" in proc.stderr.read1(4096)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.close(master)


def test_a_hundred_calls_queued_on_one_session_never_block_another(tmp_path):
    """Each call waiting for its busy session holds a server thread; another session still answers."""
    gate = tmp_path / "go"
    hold = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)"

    async def scenario():
        async with scribe(tmp_path / "nb") as s:
            busy = (await call(s, "start_new_session")).structured_content["session_id"]
            free = (await call(s, "start_new_session")).structured_content["session_id"]
            done = []

            async def queued(i, code=None):
                await call(s, "execute_code", session_id=busy, code=code or str(i))
                done.append(i)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(queued, -1, hold)
                    await anyio.sleep(0.5)
                    for i in range(100):
                        tg.start_soon(queued, i)
                    await anyio.sleep(1)
                    with anyio.fail_after(30):
                        answer = text(await call(s, "execute_code", session_id=free, code="'free answers'"))
                    assert "'free answers'" in answer and done == [], (answer, done)
                    gate.touch()
            finally:
                gate.touch()
            assert sorted(done) == list(range(-1, 100))

    anyio.run(scenario)


def test_a_cell_with_twelve_plots_returns_eight_and_read_cell_shows_the_rest(tmp_path):
    """Claude Code counts ~1,600 tokens an image against its 25k limit: a result carries at most
    eight; the others are numbered in the text and one read_cell away."""
    plots = ("import matplotlib.pyplot as plt\nfor i in range(12):\n"
             "    plt.figure(figsize=(2, 2)); plt.title(f'plot {i + 1}'); plt.plot([0, i]); plt.show()")

    async def scenario():
        async with scribe(tmp_path / "nb") as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            result = await call(s, "execute_code", session_id=sid, code=plots)
            shown = text(result)
            assert [c.type for c in result.content] == ["text"] + ["image"] * 8
            assert "[image 8]" in shown and "[image 9: not shown, read_cell(image=9) shows it]" in shown
            assert shown.splitlines()[1].startswith("warning: 12 images: the first 8 are shown")
            one = await call(s, "read_cell", session_id=sid, cell_index=-1, image=12)
            assert [c.type for c in one.content] == ["text", "image"] and one.content[1].mime_type == "image/png"
            assert one.structured_content["output"].count("[image") == 12
            assert base64.b64decode(one.content[1].data).startswith(b"\x89PNG")
            wrong = await s.call_tool("read_cell", {"session_id": sid, "cell_index": -1, "image": 13})
            assert wrong.is_error and "this cell has 12 image(s); choose 1 to 12" in text(wrong)

    anyio.run(scenario)


def test_long_notebooks_and_long_sources_come_in_pages_and_booleans_are_not_indices(tmp_path):
    """A 2,000-cell notebook's outline and a 300 KB cell source stay under the output limit, with the
    way on; True is not cell 1 for any integer parameter."""
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"value_{i} = {i}  # " + "comment " * 20) for i in range(2000)]
    nb.cells[5].source = "x = 1\n" * 50_000
    nbformat.write(nb, nbdir / "long.ipynb")

    async def scenario():
        async with scribe(nbdir, "--no-preload") as s:
            seen, offset, sizes = [], 0, []
            while offset is not None:
                page = await call(s, "notebook_outline", notebook_path="long.ipynb", offset=offset)
                sizes.append(len(as_claude_sees(page)))
                seen += [row["index"] for row in page.structured_content["cells"]]
                assert page.structured_content["total_cells"] == 2000
                offset = page.structured_content["next_offset"]
            small = (await call(s, "notebook_outline", notebook_path="long.ipynb", offset=10, limit=3)).structured_content
            cell = (await call(s, "read_cell", notebook_path="long.ipynb", cell_index=5, limit=100)).structured_content
            rest = (await call(s, "read_cell", notebook_path="long.ipynb", cell_index=5, limit=100,
                               source_offset=299_950)).structured_content
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            await call(s, "add_markdown", session_id=sid, content="a")
            await call(s, "add_markdown", session_id=sid, content="b")
            refused = {}
            for tool, args in (("delete_cell", {"cell_index": True}), ("move_cell", {"cell_index": 0, "to_index": True}),
                               ("read_cell", {"cell_index": False}), ("edit_markdown", {"cell_index": True, "content": "c"}),
                               ("insert_cell", {"cell_index": True, "content": "d", "cell_type": "markdown"}),
                               ("notebook_outline", {"offset": True})):
                result = await s.call_tool(tool, {"session_id": sid, **args})
                refused[tool] = (result.is_error, result.content[0].text)
            cells = (await call(s, "notebook_outline", session_id=sid)).structured_content["cells"]
            return seen, sizes, small, cell, rest, refused, cells

    seen, sizes, small, cell, rest, refused, cells = anyio.run(scenario)
    assert seen == list(range(2000)) and max(sizes) <= 2 * 8000, max(sizes)
    assert [r["index"] for r in small["cells"]] == [10, 11, 12] and small["next_offset"] == 13
    assert len(cell["source"]) == 100 and cell["source_chars"] == 300_000 and cell["source_more"]
    assert rest["source"] == "1\n" + "x = 1\n" * 8 and not rest["source_more"]
    for tool, (is_error, message) in refused.items():
        assert is_error and "valid integer" in message, (tool, message)
    assert [c["first_line"] for c in cells] == ["a", "b"]  # nothing was deleted, moved or edited


def test_a_request_with_a_lone_surrogate_gets_an_error_answer(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "scribe_mcp.py"), "--no-preload", "--notebook-dir",
                             str(tmp_path / "nb")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server_env())

    def exchange(line: str) -> dict:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no answer"
        return json.loads(proc.stdout.readline())

    try:
        exchange(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        bad = exchange('{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"start_new_session",'
                       '"arguments":{"experiment_name":"a\\ud800b"}}}')
        paired = exchange('{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"start_new_session",'
                          '"arguments":{"experiment_name":"smile \\ud83d\\ude00"}}}')
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert bad["id"] == 2 and bad["error"]["code"] == -32602 and "lone UTF-16 surrogate" in bad["error"]["message"]
    assert paired["id"] == 3 and not paired["result"]["isError"]  # a proper pair is an ordinary character
    assert "refused a request" in proc.stderr.read().decode()


def test_messages_say_what_happened_full_disk_restart_cancel_and_the_model_name(tmp_path):
    """Edits on a full disk are done (with a warning), not errors an agent would repeat; a restart under
    a running cell is named as such; cancelled queued calls log nothing; repr(client) names the model."""
    nbdir = tmp_path / "nb"
    log = tmp_path / "server.log"

    async def scenario():
        with open(log, "w") as errlog:
            async with connect("--notebook-dir", str(nbdir), "--no-preload", env=server_env(), errlog=errlog) as s:
                sid = (await call(s, "start_new_session")).structured_content["session_id"]
                setup = text(await call(s, "execute_code", session_id=sid,
                                        code="from gpu import InterpClient\nclient = InterpClient(preload=False)\n"
                                             "print(client)"))
                shutil_ = __import__("shutil")
                shutil_.rmtree(nbdir)
                nbdir.write_text("a file where the folder was")  # every save fails, like a full disk
                added = await call(s, "add_markdown", session_id=sid, content="## finding")
                inserted = await call(s, "insert_cell", session_id=sid, cell_index=0, content="# title",
                                      cell_type="markdown")
                deleted = await call(s, "delete_cell", session_id=sid, cell_index=0)
                nbdir.unlink()
                await call(s, "execute_code", session_id=sid, code="saved_again = 1")
                async with anyio.create_task_group() as tg:
                    results = {}

                    async def running():
                        results["cell"] = text(await call(s, "execute_code", session_id=sid,
                                                          code="import time\ntime.sleep(30)"))

                    tg.start_soon(running)
                    await anyio.sleep(1.0)
                    for _ in range(3):  # queued behind the running cell, then cancelled
                        with anyio.move_on_after(0.3):
                            await s.call_tool("execute_code", {"session_id": sid, "code": "never = 1"})
                    await call(s, "restart_session", session_id=sid)
                path = (await call(s, "list_sessions")).structured_content["sessions"][0]["notebook_path"]
        return setup, added, inserted, deleted, results["cell"], Path(path)

    setup, added, inserted, deleted, cell, path = anyio.run(scenario)
    assert "SmolLM2-135M-Instruct (embedded)" in setup, setup
    for result in (added, deleted):
        assert not result.is_error and "do not repeat it" in result.structured_content["warning"]
    assert not inserted.is_error and "[cell 0 · markdown inserted]" in text(inserted) and "do not repeat it" in text(inserted)
    assert [c.source for c in nbformat.read(path, as_version=4).cells][:3] == [
        "from gpu import InterpClient\nclient = InterpClient(preload=False)\nprint(client)", "## finding",
        "saved_again = 1"]
    assert "restart_session gave this session a fresh kernel" in cell and "KernelDied" not in cell, cell
    assert "never retrieved" not in log.read_text()


def test_the_servers_death_takes_every_kernel_and_its_children_and_early_close_leaves_nothing(tmp_path):
    """kill -9 of the server: a process a cell started dies too. stdin closed while the spare kernel
    starts: no kernel over TCP, no runtime folder left behind."""
    env = {**server_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scribe_mcp.py"), "--no-preload", "--notebook-dir",
                             str(tmp_path / "nb")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)

    def exchange(message: dict) -> dict:
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready
        return json.loads(proc.stdout.readline())

    exchange({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    sid = exchange({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "start_new_session", "arguments": {}}})["result"]["structuredContent"]["session_id"]
    out = exchange({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "execute_code", "arguments": {
        "session_id": sid, "code": "import subprocess\nprint(subprocess.Popen(['sleep', '600']).pid)"}}})
    child = int(out["result"]["content"][0]["text"].split()[-1])
    assert gpu_pid_alive(child)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60  # a bound on the wait, not a timing claim
    while gpu_pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = gpu_pid_alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the cell's child outlived the server"

    early_close_leaves_nothing(tmp_path)


def early_close_leaves_nothing(tmp_path):
    for delay in (0.3, 0.6, 1.0, 1.5, 2.0):  # around when the spare kernel is being started
        quiet = tmp_path / f"early-{delay}"
        quiet.mkdir()
        run = subprocess.Popen([sys.executable, str(ROOT / "scribe_mcp.py"), "--no-preload", "--notebook-dir",
                                str(quiet / "nb")], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**server_env(), "TMPDIR": str(quiet)})
        time.sleep(delay)
        run.stdin.close()
        run.wait(60)
        stderr = run.stderr.read().decode()  # to its end: a kernel left behind would hold it open
        time.sleep(1.5)  # an orphaned kernel would recreate its folder within its first second
        assert "without encryption" not in stderr, stderr
        assert not list(quiet.glob("scribe-*")), list(quiet.iterdir())


def gpu_pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(1200)
def test_the_handshake_is_answered_early_with_exactly_the_sdks_answers(tmp_path):
    """initialize and tools/list come from a listing the SDK itself produced, so agent CLIs that do not
    wait see the tools on their first turn; a request sent at once still reaches the SDK once it has loaded."""
    import scribe_mcp

    scribe_mcp.refresh_listing()
    made = scribe_mcp.make_listing()
    assert json.loads(scribe_mcp.LISTING.read_text()) == made
    digest = scribe_mcp.listing_digest(made)
    assert digest == scribe_mcp.LISTING_DIGEST, f"a tool or the instructions changed: set LISTING_DIGEST = {digest!r}"

    def session(early: bool) -> list[dict]:
        env = {**server_env(), "SCRIBE_EARLY_HANDSHAKE": "1" if early else "0"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "scribe_mcp.py"), "--no-preload", "--notebook-dir",
                                 str(tmp_path / f"nb-{early}")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, bufsize=0)  # unbuffered: select sees every answer
        # (a buffered readline reads ahead: an answer it took with the one before never shows to select)
        lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                     "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
                 {"jsonrpc": "2.0", "method": "notifications/initialized"},
                 {"jsonrpc": "2.0", "id": "list", "method": "tools/list", "params": {}},
                 {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_sessions", "arguments": {}}}]
        proc.stdin.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        proc.stdin.flush()
        answers = []
        while len(answers) < 3:  # the last waits for the SDK and the sessions: slow on a busy machine
            ready, _, _ = select.select([proc.stdout], [], [], 400)
            assert ready, answers
            raw = proc.stdout.readline()
            # Who answered shows in the bytes: the SDK writes compact JSON, the early path json.dumps'.
            assert raw.startswith(b'{"jsonrpc": "2.0"' if early and len(answers) < 2 else b'{"jsonrpc":"2.0"'), raw[:40]
            answers.append(json.loads(raw))
        proc.stdin.close()
        assert proc.wait(30) == 0
        extra = proc.stdout.read()
        assert not extra, extra  # the SDK's second answer to initialize was dropped
        return answers

    early, sdk = session(True), session(False)
    assert [a["id"] for a in early] == [1, "list", 3] and [a["id"] for a in sdk] == [1, "list", 3]
    assert early[0]["result"] == sdk[0]["result"] and early[1]["result"] == sdk[1]["result"]
    assert len(early[1]["result"]["tools"]) == 16 and early[2]["result"]["structuredContent"] == {"sessions": []}
