"""Scribe's MCP server: notebook tools for an AI agent doing interpretability research.

    python scribe_mcp.py                       # stdio, embedded model, notebooks in ./notebooks
    python scribe_mcp.py --transport http      # streamable HTTP on 127.0.0.1:8765/mcp, bearer token
    python scribe_mcp.py --print-config claude # how to register this checkout with Claude Code

The tools translate MCP calls into `kernel.SessionManager` calls. One model worker (gpu.py)
per server is shared by every session's kernel; kernels find it through environment
variables, so the setup code `init_session` hands out never changes between runs.

This process never imports torch: start-up is `import mcp` plus a little.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent

import gpu
import kernel

HERE = Path(__file__).resolve().parent
# Progress notifications keep MCP clients from timing out on long cells.
PROGRESS_EVERY = 3.0

SETUP_CODE = """\
from gpu import InterpClient

client = InterpClient()  # the server's shared model worker; the model is already loading
print(client)
"""

INSTRUCTIONS = """\
`client.run(fn, **kwargs)` calls `fn(model, tokenizer, **kwargs)` in the model worker, where the \
model is loaded once and stays warm. Define `fn` in a notebook cell; import torch and other \
heavy libraries INSIDE the function (the notebook kernel stays light). `model` is the Hugging \
Face model wrapped in nnsight: plain calls (`model(**inputs)`, `model.generate(...)`, \
`model.lm_head`) work, and so do nnsight traces (`with model.trace(text): h = \
model.model.layers[5].output.save()`; inside a trace build lists with a for loop, since names \
assigned by a list comprehension in the block are lost). Return plain values (str, numbers, lists, dicts); tensors \
come back as numpy arrays. What `fn` prints shows in the cell; its exceptions are raised in the \
cell with the worker's traceback; `client.run(fn, timeout=60, ...)` bounds a call. Ready-made \
techniques: `from techniques import logit_lens` then `client.run(logit_lens, text=...)`.\
"""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SCRIBE_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scribe_mcp.py",
        description="Scribe: an MCP server for interpretability research in Jupyter notebooks. "
                    "Every flag also reads an environment variable (shown in brackets).",
    )
    p.add_argument("--model", default=_env("MODEL", ""),
                   help="Hugging Face id, local model folder or .gguf file; empty = the embedded "
                        "SmolLM2-135M-Instruct [SCRIBE_MODEL]")
    p.add_argument("--mode", choices=("local", "modal", "ndif"), default=_env("MODE", "local"),
                   help="where client.run executes: local (a worker process on this machine), modal "
                        "(Modal GPUs; configure with SCRIBE_MODAL_GPU etc., see README) or ndif (NDIF's "
                        "cluster, nnsight traces only; needs NDIF_API_KEY) [SCRIBE_MODE]")
    p.add_argument("--attn-implementation", default=_env("ATTN_IMPLEMENTATION", "eager"),
                   help="eager (default: output_attentions=True works) or sdpa (faster on long prompts, "
                        "but returns no attention weights) [SCRIBE_ATTN_IMPLEMENTATION]")
    p.add_argument("--adapter", default=_env("ADAPTER", ""),
                   help="a PEFT adapter (hub id or folder) applied on top of the model [SCRIBE_ADAPTER]")
    p.add_argument("--notebook-dir", default=_env("NOTEBOOK_DIR", "notebooks"),
                   help="where notebooks are created; resume/continue only open notebooks inside it "
                        "[SCRIBE_NOTEBOOK_DIR, default ./notebooks]")
    p.add_argument("--device", default=_env("DEVICE", "auto"),
                   help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N [SCRIBE_DEVICE]")
    p.add_argument("--dtype", default=_env("DTYPE", "auto"),
                   help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16 [SCRIBE_DTYPE]")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction,
                   default=_env("PRELOAD", "1") not in ("0", "false", "no"),
                   help="load the model in the background at start-up so the first client.run "
                        "does not wait [SCRIBE_PRELOAD, default on]")
    p.add_argument("--cell-timeout", type=float, default=float(_env("CELL_TIMEOUT", str(kernel.DEFAULT_CELL_TIMEOUT))),
                   help="seconds before a running cell is interrupted [SCRIBE_CELL_TIMEOUT, default 600]")
    p.add_argument("--output-limit", type=int, default=int(_env("OUTPUT_LIMIT", str(kernel.DEFAULT_OUTPUT_LIMIT))),
                   help="characters of cell output returned to the agent; the rest is cut from the "
                        "middle (the notebook keeps all) [SCRIBE_OUTPUT_LIMIT, default 8000]")
    p.add_argument("--image-max", type=int, default=int(_env("IMAGE_MAX", str(kernel.DEFAULT_IMAGE_MAX))),
                   help="longest side in pixels of images returned to the agent [SCRIBE_IMAGE_MAX]")
    p.add_argument("--idle-timeout", type=float, default=float(_env("IDLE_TIMEOUT", str(kernel.DEFAULT_IDLE_TIMEOUT))),
                   help="seconds after which an unused session shuts down; 0 = never [SCRIBE_IDLE_TIMEOUT]")
    p.add_argument("--transport", choices=("stdio", "http"), default=_env("TRANSPORT", "stdio"),
                   help="stdio (default) or streamable HTTP [SCRIBE_TRANSPORT]")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="HTTP bind address [SCRIBE_HOST]")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8765")), help="HTTP port [SCRIBE_PORT]")
    p.add_argument("--print-config", choices=("claude",), metavar="claude",
                   help="print the `claude mcp add` command and the mcpServers JSON for this checkout, then exit")
    return p.parse_args(argv)


class Scribe:
    """The server's state: the sessions and the shared model worker."""

    def __init__(self, args: argparse.Namespace):
        self.spec = gpu.ModelSpec(model=args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                                  attn_implementation=args.attn_implementation,
                                  remote="ndif" if args.mode == "ndif" else "")
        self.mode = args.mode
        self.socket_path = os.path.join(tempfile.mkdtemp(prefix="scribe-"), "worker.sock")
        self.sessions = kernel.SessionManager(
            args.notebook_dir, cell_timeout=args.cell_timeout, output_limit=args.output_limit,
            image_max=args.image_max, idle_timeout=args.idle_timeout,
            kernel_env={gpu.ENV_SOCKET: self.socket_path, gpu.ENV_SPEC: self.spec.to_json(),
                        gpu.ENV_OWNER: str(os.getpid()), "SCRIBE_MODE": args.mode},
        )
        if args.preload and args.mode != "modal":  # on Modal the container loads the model
            threading.Thread(target=self._preload, daemon=True).start()

    def _preload(self) -> None:
        try:
            gpu.connect_worker(self.spec, self.socket_path, os.getpid()).close()
        except Exception as exc:  # the first client.run reports it to the agent again
            print(f"[scribe] model worker failed to start: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Save every notebook, stop every kernel and the worker (safe to call twice)."""
        self.sessions.shutdown_all()
        gpu.stop_worker(self.socket_path)


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------


def _cell_result(session_id: str, result: kernel.CellResult) -> CallToolResult:
    header = f"[cell {result.cell_index} · In [{result.execution_count}] · {result.status}]\n"
    content = [TextContent(text=header + (result.text or "(no output)"))]
    content += [ImageContent(data=base64.b64encode(data).decode(), mime_type=f"image/{fmt}")
                for fmt, data in result.images]
    return CallToolResult(content=content, structured_content={
        "session_id": session_id, "cell_index": result.cell_index, "execution_count": result.execution_count,
        "status": result.status, "output": result.text, "images": len(result.images),
    })


def _tool_error(exc: Exception) -> ToolError:
    """A failure as the sentence the agent reads (a SessionError already is one)."""
    if isinstance(exc, ToolError):
        return exc
    return ToolError(str(exc) if isinstance(exc, kernel.SessionError) else f"{type(exc).__name__}: {exc}")


async def _blocking(fn, *args):
    """Run blocking session work in a thread; every failure becomes a readable tool error."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except Exception as exc:
        raise _tool_error(exc) from None


async def _run_cell(ctx: Context, session: kernel.Session, run) -> kernel.CellResult:
    """Run a cell in a thread, sending progress while it runs; cancelling interrupts the kernel."""
    recent: deque[str] = deque(maxlen=20)
    started = time.monotonic()

    async def progress() -> None:
        ticks = 0
        while True:
            await anyio.sleep(PROGRESS_EVERY)
            ticks += 1
            tail = "".join(recent)[-300:].strip()
            message = f"running for {time.monotonic() - started:.0f}s" + (f"; recent output: {tail}" if tail else "")
            await ctx.report_progress(ticks, None, message)

    outcome: list = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            try:
                outcome.append(await anyio.to_thread.run_sync(lambda: run(recent.append), abandon_on_cancel=True))
            except Exception as exc:  # kept out of the task group, which would wrap it in a group
                outcome.append(exc)
            finally:
                tg.cancel_scope.cancel()
    except anyio.get_cancelled_exc_class():
        session.interrupt()
        raise
    if isinstance(outcome[0], Exception):
        raise _tool_error(outcome[0])
    return outcome[0]


def _session_info(session: kernel.Session, **extra) -> dict:
    return {"session_id": session.id, "notebook_path": str(session.path), **extra}


def _reply(data: dict) -> CallToolResult:
    """The same data as readable JSON text and as structured content."""
    return CallToolResult(content=[TextContent(text=json.dumps(data, indent=2))], structured_content=data)


def build_server(scribe: Scribe) -> MCPServer:
    mcp = MCPServer(
        "scribe",
        instructions="Interpretability research in Jupyter notebooks: start a session, call init_session, "
                     "execute its setup code, then run functions on the model with client.run(fn, ...).",
    )
    sessions = scribe.sessions

    @mcp.tool()
    async def start_new_session(experiment_name: str | None = None) -> CallToolResult:
        """Create a new notebook with a fresh Python kernel.

        Returns session_id (pass it to the other tools) and notebook_path. experiment_name
        (optional) becomes part of the file name. Next: call init_session and execute its setup_code.
        """
        session = await _blocking(sessions.start_new, experiment_name)
        return _reply(_session_info(session))

    @mcp.tool()
    async def start_session_resume_notebook(notebook_path: str) -> CallToolResult:
        """Reopen an existing notebook in place with a fresh kernel and re-run all its code cells.

        notebook_path is relative to the notebook directory (or absolute inside it). Returns
        session_id, notebook_path and a restoration summary: cells run and, for each failing
        cell, its index, exception name and message.
        """
        session, summary = await _blocking(sessions.resume, notebook_path)
        return _reply(_session_info(session, **summary))

    @mcp.tool()
    async def start_session_continue_notebook(notebook_path: str, experiment_name: str | None = None) -> CallToolResult:
        """Fork a notebook: copy it to a new file, start a kernel and re-run all code cells of the copy.

        The original file is not modified. Returns the same as start_session_resume_notebook,
        for the copy.
        """
        session, summary = await _blocking(sessions.continue_, notebook_path, experiment_name)
        return _reply(_session_info(session, **summary))

    @mcp.tool()
    async def execute_code(session_id: str, code: str, ctx: Context) -> CallToolResult:
        """Append a code cell to the session's notebook, run it, and return its outputs.

        Returns stdout/stderr, the cell's value (Out[n]), errors as `Name: message` plus the
        traceback, and images (e.g. matplotlib plots) as image content. Long output is cut in
        the middle; the notebook keeps all of it. A cell running longer than the server's cell
        timeout is interrupted; cancelling the request interrupts it too.
        """
        session = await _blocking(sessions.get, session_id)
        result = await _run_cell(ctx, session, lambda cb: session.execute(code, on_output=cb))
        return _cell_result(session_id, result)

    @mcp.tool()
    async def edit_cell(session_id: str, code: str, ctx: Context, cell_index: int = -1) -> CallToolResult:
        """Replace the source of an existing code cell and re-run it (only that cell) in the current kernel.

        cell_index counts code cells only, from 0; negative values count from the end
        (-1 = the last code cell, the default). Returns the cell's new outputs.
        """
        session = await _blocking(sessions.get, session_id)
        result = await _run_cell(ctx, session, lambda cb: session.edit_cell(code, cell_index, on_output=cb))
        return _cell_result(session_id, result)

    @mcp.tool()
    async def add_markdown(session_id: str, content: str) -> CallToolResult:
        """Append a markdown cell (notes, findings, conclusions) to the notebook. Returns its cell index."""
        session = await _blocking(sessions.get, session_id)
        index = await _blocking(session.add_markdown, content)
        return _reply({"session_id": session_id, "cell_index": index})

    @mcp.tool()
    async def init_session(session_id: str | None = None) -> CallToolResult:
        """Get the setup code that creates `client`, how to use it, the model's name and the techniques.

        Execute setup_code with execute_code once per session. Then define functions
        fn(model, tokenizer, ...) in cells and run them with client.run(fn, ...).
        """
        if session_id is not None:
            await _blocking(sessions.get, session_id)
        return _reply({
            "setup_code": SETUP_CODE,
            "instructions": INSTRUCTIONS,
            "model": scribe.spec.display_name,
            "mode": scribe.mode,
            "techniques": await _blocking(_technique_catalog),
        })

    @mcp.tool()
    async def shutdown_session(session_id: str) -> CallToolResult:
        """Save the notebook and stop the session's kernel. The notebook stays on disk."""
        path = await _blocking(sessions.shutdown, session_id)
        return _reply({"session_id": session_id, "notebook_path": str(path), "status": "shut down"})

    @mcp.tool()
    async def restart_session(session_id: str) -> CallToolResult:
        """Give the session a fresh kernel on the same notebook (all variables are lost; cells stay).

        Use when the kernel is wedged. Re-run the setup code afterwards.
        """
        session = await _blocking(sessions.get, session_id)
        await _blocking(session.restart)
        return _reply(_session_info(session, status="restarted"))

    @mcp.tool()
    async def list_sessions() -> CallToolResult:
        """List the live sessions with their notebook paths."""
        return _reply({"sessions": [_session_info(s) for s in sessions.sessions.values()]})

    return mcp


def _technique_catalog() -> list[dict]:
    import techniques  # light: every technique imports torch inside its own body

    return techniques.catalog()


# ---------------------------------------------------------------------------
# Transports and entry point
# ---------------------------------------------------------------------------


def serve_http(mcp: MCPServer, host: str, port: int) -> None:
    """Streamable HTTP at /mcp behind a bearer token (SCRIBE_TOKEN, or one generated now)."""
    import uvicorn

    token = os.environ.get("SCRIBE_TOKEN") or secrets.token_urlsafe(24)
    if not os.environ.get("SCRIBE_TOKEN"):
        print(f"[scribe] bearer token: {token}", file=sys.stderr, flush=True)
    app = mcp.streamable_http_app(host=host)
    expected = f"Bearer {token}".encode()

    async def with_token(scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
            return
        await app(scope, receive, send)

    print(f"[scribe] serving MCP on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.run(with_token, host=host, port=port, log_level="warning")


@contextlib.asynccontextmanager
async def connect(*args: str, env: dict | None = None):
    """Spawn `python scribe_mcp.py *args` over stdio; yield an initialized MCP ClientSession.

    For scripts driving Scribe the way an agent does (the tests and bench/ use it).
    """
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(HERE / "scribe_mcp.py"), *args], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def print_config() -> None:
    command = [sys.executable, str(HERE / "scribe_mcp.py")]
    print("# Claude Code:")
    print("claude mcp add scribe -- " + " ".join(shlex.quote(c) for c in command))
    print("\n# Any MCP client (mcpServers JSON):")
    print(json.dumps({"mcpServers": {"scribe": {"command": command[0], "args": command[1:]}}}, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.print_config:
        print_config()
        return
    scribe = Scribe(args)

    def terminate(*_) -> None:
        # The MCP SDK's event loop does not unwind on a signal: clean up from a thread, then leave.
        def close_and_exit() -> None:
            scribe.close()
            os._exit(0)

        threading.Thread(target=close_and_exit, daemon=True).start()

    signal.signal(signal.SIGTERM, terminate)
    try:
        mcp = build_server(scribe)
        if args.transport == "http":
            serve_http(mcp, args.host, args.port)
        else:
            if sys.stdin.isatty():  # a person started it by hand: say what it is waiting for
                print(f"[scribe] MCP server on stdio with {scribe.spec.display_name}, waiting for an MCP "
                      "client; connect an agent with `python scribe_mcp.py --print-config claude`. "
                      "Ctrl-C stops it.", file=sys.stderr, flush=True)
            mcp.run()
    except KeyboardInterrupt:
        pass
    finally:
        scribe.close()


if __name__ == "__main__":
    main()
