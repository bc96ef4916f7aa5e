"""Scribe's MCP server: notebook tools for an AI agent doing interpretability research.

    python scribe_mcp.py                       # stdio, embedded model, notebooks in ./notebooks
    python scribe_mcp.py --transport http      # streamable HTTP on 127.0.0.1:8765/mcp, bearer token
    python scribe_mcp.py --print-config claude # how to register this checkout with Claude Code

The tools translate MCP calls into `kernel.SessionManager` calls. One model worker (gpu.py)
per server is shared by every session's kernel; the server starts it, restarts it when it
dies, and tells kernels where it listens, so the setup code `init_session` hands out never
changes between runs. (`audit` runs several servers on one worker: --worker-socket.)

What an agent reads: tools that run cells answer in plain text plus images (a client that
shows only structured content, like Claude Code, would otherwise show JSON full of escapes);
tools whose product is data (sessions, outlines) answer with structured content.

This process never imports torch: start-up is `import mcp` plus a little.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import stat
import sys
import threading
from pathlib import Path

# ---------------------------------------------------------------------------
# The handshake, answered before the SDK has loaded
# ---------------------------------------------------------------------------
# Agent CLIs send their first model request about a second after starting their MCP servers
# and do not wait for them: a server that has not listed its tools by then is missing from the
# agent's first turn. Importing the MCP SDK alone takes ~0.8 s here, so `initialize` and
# `tools/list` are answered from LISTING -- what this server's SDK answered them with, saved
# once per version of this file and of the SDK -- while the SDK and the sessions load. Every
# other request waits for the SDK; `initialize` is replayed to it (its second answer is dropped).

LISTING = Path(__file__).resolve().parent / ".scribe-cache" / "mcp-listing.json"
# The answers this code gives, hashed: agents' cells run as the same user and could rewrite LISTING
# (e.g. a tool description), so a listing is served only if it hashes to this. A change to any
# tool or the instructions changes it: tests/test_mcp.py says the new value.
LISTING_DIGEST = "bc691370986ce60e9771c92ba470a7c92383709f457825eb5fed37184d85b91d"


def listing_key() -> str:
    """Changes whenever the answers could: this file, the SDK installed, the Python running it."""
    import importlib.util

    found = importlib.util.find_spec("mcp")
    sdk = os.stat(found.origin).st_mtime_ns if found and found.origin else 0
    return hashlib.sha256(Path(__file__).read_bytes() + f"{sdk}{sys.version}".encode()).hexdigest()[:16]


def listing_digest(listing: dict) -> str:
    return hashlib.sha256(json.dumps([listing.get("latest"), listing.get("versions")], sort_keys=True).encode()).hexdigest()


def listing_usable(listing: dict) -> bool:
    """Made for this code, complete, and exactly what this code answers: only then is it served."""
    return listing.get("key") == listing_key() and listing_complete(listing) and listing_digest(listing) == LISTING_DIGEST


def listing_complete(listing: dict) -> bool:
    """Whether a saved listing has both answers for every protocol version it names (a truncated or
    hand-edited file is ignored, and rewritten at start)."""
    versions = listing.get("versions")
    return (isinstance(versions, dict) and listing.get("latest") in versions
            and all(isinstance(v, dict) and {"initialize", "tools/list"} <= set(v) for v in versions.values()))


def claim_stdio() -> tuple[int, int] | None:
    """Take the MCP wire (fds 0 and 1) for the server alone: it is served from private
    duplicates while fd 0 reads /dev/null and fd 1 writes to stderr, so a stray print of the
    server, a library or a child process cannot corrupt it. None when the wire is not two pipes
    or sockets (a terminal, a file): the SDK's own transport serves those."""
    if not all(stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) for mode in (os.fstat(0).st_mode, os.fstat(1).st_mode)):
        return None
    wire = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return wire



class EarlyWire:
    """Reads the wire until the SDK takes over, answering the handshake from the listing."""

    def __init__(self, wire: tuple[int, int], listing: dict):
        self.wire, self.listing = wire, listing
        self.forward: list[bytes] = []  # lines for the SDK, in order
        self.answered: set = set()  # ids answered here AND forwarded (initialize): the SDK's answer is dropped
        self.version: str | None = None
        self.buffer, self.eof, self._stop = b"", False, threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True, name="scribe-early-wire")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.wire[0]], [], [], 0.02)[0]:
                continue
            chunk = os.read(self.wire[0], 1 << 16)
            if not chunk:
                self.eof = True
                return
            self.buffer += chunk
            while b"\n" in self.buffer and not self._stop.is_set():
                line, self.buffer = self.buffer.split(b"\n", 1)
                self._handle(line + b"\n")

    def _handle(self, line: bytes) -> None:
        """Answer `line` from the listing if it is the handshake in its plain form; anything else
        (and anything odd about it) goes to the SDK, which answers as it always does."""
        try:
            request = json.loads(line)
            method, request_id, params = request.get("method"), request.get("id"), request.get("params") or {}
            if method == "initialize" and request_id is not None and self.version is None:
                asked = params.get("protocolVersion")
                if isinstance(asked, str):  # one it does not know: the latest, as the SDK negotiates
                    self.version = asked if asked in self.listing["versions"] else self.listing["latest"]
                    self._answer(request_id, self.listing["versions"][self.version]["initialize"])
                    self.answered.add(json.dumps(request_id))  # replayed to the SDK, which answers it again
            elif method == "tools/list" and request_id is not None and self.version is not None \
                    and not params.get("cursor"):
                self._answer(request_id, self.listing["versions"][self.version]["tools/list"])
                return
        except Exception:  # noqa: BLE001 - not the plain handshake: the SDK's to answer
            pass
        self.forward.append(line)

    def _answer(self, request_id, result: dict) -> None:
        data = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode() + b"\n"
        while data:
            data = data[os.write(self.wire[1], data):]

    def handoff(self) -> tuple[bytes, set, bool]:
        """Stop reading; what the SDK must read first, the ids answered here, and whether the wire ended."""
        self._stop.set()
        self._thread.join()
        return b"".join(self.forward) + self.buffer, self.answered, self.eof


def early_wire(argv: list[str]) -> EarlyWire | None:
    """Start answering the handshake now if this process is about to serve MCP on stdio pipes
    and a listing made for this very code is at hand (else the SDK answers, a second later)."""
    if argv[:1] and argv[0] in ("prompt", "agent", "grade") or {"-h", "--help", "--print-config"} & set(argv):
        return None
    transport = os.environ.get("SCRIBE_TRANSPORT", "stdio")
    for i, arg in enumerate(argv):
        if arg == "--transport" and i + 1 < len(argv):
            transport = argv[i + 1]
        elif arg.startswith("--transport="):
            transport = arg.split("=", 1)[1]
    if transport != "stdio" or os.environ.get("SCRIBE_EARLY_HANDSHAKE", "1") == "0":
        return None
    try:
        listing = json.loads(LISTING.read_text())
        if not listing_usable(listing):
            return None  # made for other code, incomplete, or not what this code answers: the SDK answers
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    wire = claim_stdio()
    return EarlyWire(wire, listing) if wire else None


EARLY = early_wire(sys.argv[1:]) if __name__ == "__main__" else None

import argparse  # noqa: E402 - the handshake above is answered before these load
import asyncio  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import hmac  # noqa: E402
import importlib.metadata  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Annotated  # noqa: E402

from typing_extensions import Required, TypedDict  # noqa: E402 - pydantic needs this one on Python < 3.12

import anyio  # noqa: E402
from mcp.server.mcpserver import Context, MCPServer  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402
from mcp.server.stdio import stdio_server  # noqa: E402
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations  # noqa: E402
from pydantic import Field  # noqa: E402

import gpu  # noqa: E402
import kernel  # noqa: E402

HERE = Path(__file__).resolve().parent
# Progress notifications keep MCP clients from timing out on long cells: one when the cell's
# status or output changed (at most every PROGRESS_EVERY s), else a short heartbeat.
PROGRESS_EVERY = 3.0
HEARTBEAT_EVERY = 15.0
# Claude Code replaces results over ~25k tokens with a file pointer; stay far below.
RESULT_CHARS_MAX = 40_000

SETUP_CODE = """\
from gpu import InterpClient

client = InterpClient()  # the server's shared model worker; the model is already loading
print(client)
"""

def _instructions() -> str:
    return """\
`client.run(fn, **kwargs)` calls `fn(model, tokenizer, **kwargs)` in the model worker, where the \
model is loaded once and stays warm. Define `fn` in a notebook cell; import torch and other \
heavy libraries INSIDE the function (the notebook kernel stays light). `model` is the Hugging \
Face model wrapped in nnsight: plain calls (`model(**inputs)`, `model.generate(...)`, \
`model.lm_head`) work, and so do nnsight traces: `with model.trace(text): h = \
model.model.layers[5].output.save()` (a layer's output is a tensor [batch, pos, d_model]). \
Inside a trace: read modules in the order they run; only `.save()`d values survive the block; \
a list you fill in the block must be created BEFORE the `with` line (`hs = []` then \
`hs.append(layer.output.save())` inside), since names first assigned in the block other than \
`x = ....save()` are lost, and so are list comprehensions. Layers are numbered 0..n-1 \
everywhere (techniques too); `output_hidden_states=True` gives n+1 states, `hidden_states[0]` \
being the embeddings, so layer i's output is `hidden_states[i + 1]`. In transformers 5 \
`tokenizer.apply_chat_template(messages, tokenize=True)` returns a dict (a BatchEncoding): take \
`["input_ids"]`, or pass `return_dict=False` for the list of ids. Return plain values (str, numbers, \
lists, dicts); tensors come back as numpy arrays. What `fn` prints shows in the cell; its \
exceptions are raised in the cell with the worker's traceback; `client.run(fn, timeout=60, \
...)` bounds a call; a technique stopped by a timeout returns what it finished, marked partial, \
and when the cell itself is interrupted that result is kept in `client.partial`. A long call can run in the background: `job = client.submit(fn, ...)` \
returns at once and the notebook stays free; then `job.progress` (elapsed time, last line \
printed), `job.done()`, `job.result(timeout=...)`, `job.cancel()`. The model still runs one call \
at a time, so a client.run made meanwhile waits for the job's call. Ready-made techniques: `from techniques import logit_lens` then \
`client.run(logit_lens, text=...)`.\
"""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SCRIBE_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scribe_mcp.py",
        description="Scribe: an MCP server for interpretability research in Jupyter notebooks. "
                    "Every flag also reads an environment variable (shown in brackets).",
        epilog="Blind experiments (README): `prompt FILE`, `agent claude|codex|gemini FILE`, `grade FILE "
               "NOTEBOOK`, and `audit EXP.yaml ... --runs N --model ...` for batches of runs on Inspect; "
               "each takes --help.",
    )
    p.add_argument("--experiment", default=_env("EXPERIMENT", ""), metavar="FILE",
                   help="serve a blind experiment (YAML, see README): its model, adapter, hidden system "
                        "prompt, alias and techniques replace the flags [SCRIBE_EXPERIMENT]")
    p.add_argument("--model", default=_env("MODEL", ""),
                   help="Hugging Face id, local model folder or .gguf file; empty = the embedded "
                        "SmolLM2-135M-Instruct [SCRIBE_MODEL]")
    p.add_argument("--mode", choices=("local", "modal", "ndif"), default=_env("MODE", "local"),
                   help="where client.run executes: local (a worker process on this machine), modal "
                        "(Modal GPUs; configure with SCRIBE_MODAL_GPU etc., see README) or ndif (NDIF's "
                        "cluster, nnsight traces only; needs NDIF_API_KEY) [SCRIBE_MODE, default %(default)s]")
    p.add_argument("--attn-implementation", default=_env("ATTN_IMPLEMENTATION", "eager"),
                   help="eager (output_attentions=True works) or sdpa (faster on long prompts, "
                        "but returns no attention weights) [SCRIBE_ATTN_IMPLEMENTATION, default %(default)s]")
    p.add_argument("--adapter", default=_env("ADAPTER", ""),
                   help="a PEFT adapter (hub id or folder) applied on top of the model [SCRIBE_ADAPTER]")
    p.add_argument("--sae", default=_env("SAE", ""),
                   help="a sparse autoencoder for the SAE techniques (sae_features, ...): embedded (the embedded "
                        "model's, built by `saes.py build`; its default once built), a SAELens folder, "
                        "RELEASE:SAE_ID of sae-lens's registry from the local Hugging Face cache, or none [SCRIBE_SAE]")
    p.add_argument("--notebook-dir", default=_env("NOTEBOOK_DIR", "notebooks"),
                   help="where notebooks are created; resume/continue only open notebooks inside it "
                        "[SCRIBE_NOTEBOOK_DIR, default %(default)s]")
    p.add_argument("--device", default=_env("DEVICE", "auto"),
                   help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N [SCRIBE_DEVICE, default %(default)s]")
    p.add_argument("--dtype", default=_env("DTYPE", "auto"),
                   help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16 "
                        "[SCRIBE_DTYPE, default %(default)s]")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", "0")),
                   help="CPU threads for the model worker's torch and the kernels' numerical libraries; 0 = "
                        "their defaults (all cores). Several servers on one machine: split the cores "
                        "[SCRIBE_THREADS, default %(default)s]")
    p.add_argument("--worker-socket", default=_env("SHARED_WORKER", ""), metavar="PATH",
                   help="use the model worker already serving at PATH (started by `audit` for the runs of one "
                        "experiment) instead of starting one; it must serve this server's model or experiment "
                        "[SCRIBE_SHARED_WORKER]")
    p.add_argument("--max-call", type=float, default=float(_env("MAX_CALL", "0")), metavar="SECONDS",
                   help="the longest any one client.run or job may run on the model, whatever timeout it asks for; "
                        "0 = no bound beyond the client's own [SCRIBE_MAX_CALL, default %(default)s]")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction,
                   default=_env("PRELOAD", "1") not in ("0", "false", "no"),
                   help="load the model in the background at start-up so the first client.run "
                        "does not wait [SCRIBE_PRELOAD, default %(default)s]")
    p.add_argument("--cell-timeout", type=float, default=float(_env("CELL_TIMEOUT", str(kernel.DEFAULT_CELL_TIMEOUT))),
                   help="seconds before a running cell is interrupted [SCRIBE_CELL_TIMEOUT, default %(default)s]")
    p.add_argument("--output-limit", type=int, default=int(_env("OUTPUT_LIMIT", str(kernel.DEFAULT_OUTPUT_LIMIT))),
                   help="characters of cell output returned to the agent; the rest is cut from the "
                        "middle (the notebook keeps all) [SCRIBE_OUTPUT_LIMIT, default %(default)s]")
    p.add_argument("--image-max", type=int, default=int(_env("IMAGE_MAX", str(kernel.DEFAULT_IMAGE_MAX))),
                   help="longest side in pixels of images returned to the agent [SCRIBE_IMAGE_MAX, default %(default)s]")
    p.add_argument("--idle-timeout", type=float, default=float(_env("IDLE_TIMEOUT", str(kernel.DEFAULT_IDLE_TIMEOUT))),
                   help="seconds after which an unused session shuts down; 0 = never "
                        "[SCRIBE_IDLE_TIMEOUT, default %(default)s]")
    p.add_argument("--pass-env", action="append", default=[n for n in _env("PASS_ENV", "").split(",") if n],
                   metavar="NAME", help="also pass this environment variable to kernels and the worker "
                                        "(repeatable) [SCRIBE_PASS_ENV, comma-separated]")
    p.add_argument("--transport", choices=("stdio", "http"), default=_env("TRANSPORT", "stdio"),
                   help="stdio or streamable HTTP [SCRIBE_TRANSPORT, default %(default)s]")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="HTTP bind address [SCRIBE_HOST, default %(default)s]")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8765")), help="HTTP port [SCRIBE_PORT, default %(default)s]")
    p.add_argument("--allowed-host", action="append", default=[n for n in _env("ALLOWED_HOSTS", "").split(",") if n],
                   metavar="HOST[:PORT]", help="a Host header HTTP clients may send besides loopback names, e.g. "
                                               "my-box:8765 or my-box:* (repeatable) [SCRIBE_ALLOWED_HOSTS]")
    p.add_argument("--view", action="store_true", default=_env("VIEW", "0") not in ("0", "false", "no"),
                   help="also serve a live, read-only web view of the notebooks (URL with its token on stderr) "
                        "[SCRIBE_VIEW, default %(default)s]")
    p.add_argument("--view-host", default=_env("VIEW_HOST", "127.0.0.1"),
                   help="the view's bind address [SCRIBE_VIEW_HOST, default %(default)s]")
    p.add_argument("--view-port", type=int, default=int(_env("VIEW_PORT", "8766")),
                   help="the view's port [SCRIBE_VIEW_PORT, default %(default)s]; its token: SCRIBE_VIEW_TOKEN or generated")
    p.add_argument("--print-config", nargs="?", const="all", choices=("all", "claude", "codex", "gemini"),
                   help="print how to register this checkout with Claude Code, Codex, Gemini CLI (default: all, "
                        "plus the mcpServers JSON any MCP client reads), then exit")
    return p


# ---------------------------------------------------------------------------
# Runtime files: one private folder per server, removed at exit
# ---------------------------------------------------------------------------


def make_runtime_dir() -> Path:
    """A 0700 folder `scribe-<pid>-XXXX` for sockets, logs and kernel files; stale ones of dead
    servers (kill -9) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob("scribe-*-*"):
        match = re.fullmatch(r"scribe-(\d+)-\w+", old.name)
        if match and old.is_dir() and not gpu.pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"scribe-{os.getpid()}-"))


def server_sae(args: argparse.Namespace) -> str:
    """The SAE that --sae names, checked; by default the embedded model's, once built (an
    experiment names its own)."""
    import experiment
    import saes

    sae = "" if args.sae == "none" else args.sae
    if not args.sae and not args.model and not args.experiment and args.mode == "local" and saes.built():
        sae = "embedded"
    if sae and args.mode != "local":
        raise ValueError(f"--sae: SAEs are served by the local worker, not in --mode {args.mode}")
    problem = experiment.sae_problem(sae)
    if problem:
        raise ValueError(f"--sae: {problem}")
    return sae


class Scribe:
    """The server's state: the sessions and the shared model worker."""

    def __init__(self, args: argparse.Namespace):
        import experiment

        sae = server_sae(args)
        self.spec = gpu.ModelSpec(model=args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                                  attn_implementation=args.attn_implementation,
                                  remote="ndif" if args.mode == "ndif" else "", sae=experiment.sae_source(sae))
        self.offered: tuple[str, ...] = ()  # techniques an experiment offers (empty: all)
        if args.experiment:
            exp = experiment.load(args.experiment)
            experiment.check_inputs(exp)
            self.spec = experiment.model_spec(exp, self.spec)
            # what init_session's base-model example uses is offered with the rest: its signature is listed
            self.offered = experiment.with_taught(
                exp.techniques, BASE_MODEL_NOTE if self.spec.adapter or self.spec.base_model else "")
        self.mode = args.mode
        if args.worker_socket and not gpu.worker_serves(args.worker_socket):
            raise ValueError(f"--worker-socket {args.worker_socket}: no model worker answers there (start it first; "
                             "`audit` starts one per base model)")
        self.runtime = make_runtime_dir()
        self.socket_path = socket_path = args.worker_socket or str(self.runtime / "worker.sock")
        kernel_env = gpu.child_env(args.mode, gpu.KERNEL_SECRETS, args.pass_env, args.threads)
        kernel_env.update({gpu.ENV_SOCKET: socket_path, gpu.ENV_OWNER: str(os.getpid()), "SCRIBE_MODE": args.mode,
                           gpu.ENV_NAME: self.spec.display_name})
        if args.mode == "modal":  # the Modal client runs in the kernel and must know what to load
            kernel_env[gpu.ENV_SPEC] = self.spec.to_json()
        self.bound = ""  # this server's binding on a worker shared with other organisms of the base
        if args.worker_socket and args.experiment:
            self.bound = kernel_env[gpu.ENV_ORGANISM] = gpu.bind_organism(args.worker_socket, self.spec.adapter,
                                                                          self.spec.alias)
        self.worker = None
        if args.mode != "modal" and not args.worker_socket:  # on Modal the container loads the model
            self.worker = gpu.WorkerSupervisor(self.spec, socket_path, gpu.child_env(args.mode, gpu.WORKER_SECRETS,
                                                                                 args.pass_env, args.threads),
                                               max_call=args.max_call)
            if args.preload:
                self.worker.ensure()
        self.sessions = kernel.SessionManager(
            args.notebook_dir, cell_timeout=args.cell_timeout, output_limit=args.output_limit,
            image_max=args.image_max, idle_timeout=args.idle_timeout, kernel_env=kernel_env,
            runtime=self.runtime, spare_kernel=True)
        self._closed = threading.Lock()
        self.closed = False

    def ensure_worker(self) -> None:
        """Before anything that may call client.run: the worker runs (started lazily without --preload)."""
        if self.worker is not None:
            self.worker.ensure()

    def speed(self) -> str:
        """What the worker measured once it had loaded the model; never waits for it (an agent's
        first call must not wait for the model to load)."""
        if self.mode == "modal":
            return "Speed: measured in the Modal container, not here: time a call with client.run to size yours."
        return gpu.speed_line(self.socket_path) or (
            "Speed: being measured while the model loads; `print(client.speed)` in a cell shows it once it is "
            "(a forward pass and batched generation, for sizing your calls).")

    def close(self) -> None:
        """Save every notebook, stop every kernel and the worker, remove runtime files (once)."""
        with self._closed:  # a second caller (SIGTERM after SIGINT) waits for the first to finish
            if self.closed:
                return
            self.closed = True
            self._close()

    def _close(self) -> None:
        threads = [threading.Thread(target=self.sessions.shutdown_all, daemon=True)]
        if self.worker is not None:
            threads.append(threading.Thread(target=self.worker.stop, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        if self.bound:  # the shared worker may evict this organism now that no session of ours uses it
            with contextlib.suppress(Exception):
                gpu.bind_organism(self.socket_path, unbind=self.bound, timeout=5)
        shutil.rmtree(self.runtime, ignore_errors=True)


# ---------------------------------------------------------------------------
# What the agent reads
# ---------------------------------------------------------------------------


def cell_text(result: kernel.CellResult) -> str:
    """A cell's result as the agent reads it: the verdict first, then the output."""
    count = " " if result.execution_count is None else result.execution_count
    where = f"cell {result.cell_index} · In [{count}]"
    if result.status in ("error", "died"):
        err = next(o for o in result.outputs if o.get("output_type") == "error")
        evalue = (err["evalue"].strip().splitlines() or [""])[0]
        head = f"error: {err['ename']}: {evalue}  [{where}]"
    else:
        head = f"[{where} · {result.status}]"
    notes = "".join(f"warning: {note}\n" for note in result.notes)
    return f"{head}\n{notes}{result.text or '(no output)'}"


def _cell_result(result: kernel.CellResult) -> CallToolResult:
    """Text and images only: see the module docstring."""
    content = [TextContent(text=cell_text(result))]
    content += [_image(fmt, data) for fmt, data in result.images]
    return CallToolResult(content=content, is_error=False)


def _image(fmt: str, data: bytes) -> ImageContent:
    return ImageContent(data=base64.b64encode(data).decode(), mime_type=f"image/{fmt}")


def _text_result(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=kernel.truncate(text, RESULT_CHARS_MAX, "the notebook keeps it"))])


def restore_text(session: kernel.Session, summary: dict, limit: int) -> str:
    errors = summary["errors"]
    lines = [f"session_id: {session.id}", f"notebook_path: {session.path}",
             f"re-ran {summary['cells_run']} code cells: {summary['cells_run'] - len(errors)} ok, {len(errors)} failed"]
    lines += [f"  cell {e['cell_index']}: {e['ename']}: {(e['evalue'].splitlines() or [''])[0][:200]}" for e in errors]
    if "stopped" in summary:
        lines.append(f"stopped: {summary['stopped']}")
    lines += ["", "outline (cell index, type, status, first line):",
              kernel.truncate(summary["outline"], limit, "notebook_outline lists every cell")]
    return "\n".join(lines)


def _tool_error(exc: Exception) -> ToolError:
    """A failure as the sentence the agent reads (a SessionError already is one)."""
    if isinstance(exc, ToolError):
        return exc
    return ToolError(str(exc) if isinstance(exc, kernel.SessionError) else f"{type(exc).__name__}: {exc}")


def _session(sessions: kernel.SessionManager, session_id: str) -> kernel.Session:
    """A dictionary lookup: no thread hop (it is on every cell's path)."""
    try:
        return sessions.get(session_id)
    except kernel.SessionError as exc:
        raise _tool_error(exc) from None


# Blocking session work runs in this pool: an executor future costs a quick cell about half a
# millisecond less than anyio's thread hop plus a task group for progress. A call waiting for
# its session's lock holds a thread, so the bound is far above what agents queue (anyio's 40
# let 40 calls queued on one session stall every other session); threads start only when needed.
_THREADS = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="scribe-call")


async def _blocking(fn, *args):
    """Run blocking session work in a thread; every failure becomes a readable tool error."""
    try:
        return await asyncio.get_running_loop().run_in_executor(_THREADS, fn, *args)
    except Exception as exc:
        raise _tool_error(exc) from None


class _Activity:
    """What a running tool call reports in its progress notifications."""

    def __init__(self):
        self.started = time.monotonic()
        self.recent: deque[str] = deque(maxlen=20)
        self.status = ""
        self.new_output = False  # output since the last notification

    def output(self, text: str) -> None:
        self.recent.append(text)
        self.new_output = True

    def progress(self, message: str) -> None:
        self.status = message

    def message(self) -> str:
        """Short: the status, or the output's last line when there is new output (stale output
        is not repeated)."""
        elapsed = f"{time.monotonic() - self.started:.0f}s"
        if self.status:
            return f"{self.status} ({elapsed})"
        tail = kernel.collapse_cr("".join(self.recent)).strip().splitlines()[-1:] if self.new_output else []
        self.new_output = False
        return f"running for {elapsed}" + (f"; output: {tail[0][-160:]}" if tail else "")


async def _run_blocking(ctx: Context, work, on_cancel) -> object:
    """Run `work(activity)` in a thread, sending progress while it runs; cancelling calls on_cancel
    (the thread is left to finish on its own)."""
    activity = _Activity()
    future = asyncio.get_running_loop().run_in_executor(_THREADS, work, activity)
    ticks, sent, last = 0, None, time.monotonic()
    try:
        while not (await asyncio.wait([future], timeout=0.25))[0]:
            quiet = time.monotonic() - last
            if (activity.status != sent or (activity.new_output and quiet >= PROGRESS_EVERY)
                    or quiet >= HEARTBEAT_EVERY):
                ticks, sent, last = ticks + 1, activity.status, time.monotonic()
                await ctx.report_progress(ticks, None, activity.message())
    except asyncio.CancelledError:
        on_cancel()
        # The thread finishes later (a queued cell raises Cancelled): nobody awaits it any more, and
        # an exception never retrieved would be logged with its traceback.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    try:
        return future.result()
    except Exception as exc:
        raise _tool_error(exc) from None


async def _run_cell(ctx: Context, session: kernel.Session, run) -> CallToolResult:
    """A cell request: cancelled while queued behind another cell, it never runs; while
    running, it is interrupted."""
    ticket = kernel.Ticket()

    def cancel() -> None:
        if not ticket.cancel():
            session.interrupt()

    result = await _run_blocking(ctx, lambda activity: run(activity.output, ticket), cancel)
    return _cell_result(result)


# Structured results (their schemas are the tools' outputSchema).
class SessionInfo(TypedDict):
    session_id: str
    notebook_path: str


class SessionList(TypedDict):
    sessions: list[SessionInfo]


class ShutdownInfo(TypedDict):
    session_id: str
    notebook_path: str
    status: str


class CellRef(TypedDict, total=False):
    session_id: Required[str]
    cell_index: Required[int]
    warning: str  # the edit was made but is not on disk yet (e.g. a full disk)


async def _edit(session: kernel.Session, method, *args) -> tuple[int, str | None]:
    """A notebook edit and why it is not saved yet, if it is not: under the session's lock, so
    the warning is this edit's own."""
    def edit():
        with session.lock:
            value = method(*args)
            return (value["deleted"] if isinstance(value, dict) else value), session.save_warning

    return await _blocking(edit)


async def _cell_ref(session: kernel.Session, method, *args) -> CellRef:
    position, warning = await _edit(session, method, *args)
    ref: CellRef = {"session_id": session.id, "cell_index": position}
    if warning:
        ref["warning"] = warning
    return ref


class CellRow(TypedDict, total=False):
    index: int
    type: str
    first_line: str
    status: str
    output_chars: int


class Outline(TypedDict):
    notebook_path: str
    cells: list[CellRow]
    total_cells: int
    next_offset: int | None


class CellSlice(TypedDict):
    cell_index: int
    type: str
    status: str
    source: str
    source_chars: int
    source_more: bool
    output: str
    output_offset: int
    output_chars: int
    more: bool


def _session_info(session: kernel.Session) -> SessionInfo:
    return {"session_id": session.id, "notebook_path": str(session.path)}


SessionId = Annotated[str, Field(description="the id start_new_session (or resume/continue) returned")]
CellIndex = Annotated[int, Field(strict=True, description="the cell's position in the notebook, counting markdown cells "
                                             "(as shown in every result); negative values count from the end")]
READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
EDITS = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)
RUNS = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
DESTROYS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False)


def _version() -> str:
    try:
        return importlib.metadata.version("scribe-interp")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_server(scribe: Scribe) -> MCPServer:
    mcp = MCPServer(
        "scribe",
        version=_version(),
        instructions="Interpretability research in Jupyter notebooks: start a session, call init_session, "
                     "execute its setup code, then run functions on the model with client.run(fn, ...). "
                     "Cells are numbered by their position in the notebook, markdown cells included.",
    )
    sessions = scribe.sessions

    def find_notebook(session_id: str | None, notebook_path: str | None):
        if (session_id is None) == (notebook_path is None):
            raise kernel.SessionError("pass either session_id (a live session) or notebook_path (a notebook "
                                      "inside the notebook directory)")
        if session_id is not None:
            session = sessions.get(session_id)
            return session.path, session.file.nb
        path = sessions.resolve(notebook_path)
        live = sessions.live_session_for(path)
        return path, (live.file.nb if live else kernel.read_notebook(path))

    def restore(open_session, ctx: Context, *args) -> object:
        """resume/continue: progress per cell; cancel stops between cells (the session stays open)."""
        stop = kernel.Stop()
        scribe.ensure_worker()

        def work(activity: _Activity) -> str:
            session, summary = open_session(*args, on_progress=activity.progress, stop=stop)
            return restore_text(session, summary, sessions.output_limit)

        return _run_blocking(ctx, work, stop.set)

    @mcp.tool(annotations=EDITS, structured_output=True)
    async def start_new_session(
        experiment_name: Annotated[str | None, Field(description="optional; becomes part of the notebook's "
                                                                 "file name")] = None,
    ) -> SessionInfo:
        """Create a new notebook with a fresh Python kernel. Returns session_id (pass it to the other tools) and notebook_path. Next: call init_session and execute its setup_code."""
        session = await _blocking(sessions.start_new, experiment_name)
        return _session_info(session)

    @mcp.tool(annotations=RUNS)
    async def start_session_resume_notebook(
        notebook_path: Annotated[str, Field(description="relative to the notebook directory, or absolute inside it")],
        ctx: Context,
    ) -> CallToolResult:
        """Reopen an existing notebook in place with a fresh kernel and re-run all its code cells. Returns session_id, notebook_path, which cells failed (index, exception, message) and an outline of the notebook. Progress is reported per cell; cancelling stops between cells and leaves the session open (its id is in the progress messages and list_sessions)."""
        return _text_result(await restore(sessions.resume, ctx, notebook_path))

    @mcp.tool(annotations=RUNS)
    async def start_session_continue_notebook(
        notebook_path: Annotated[str, Field(description="relative to the notebook directory, or absolute inside it")],
        ctx: Context,
        experiment_name: Annotated[str | None, Field(description="optional name for the copy")] = None,
    ) -> CallToolResult:
        """Fork a notebook: copy it to a new file, start a kernel and re-run all code cells of the copy. The original file is not modified. Returns the same as start_session_resume_notebook, for the copy."""
        return _text_result(await restore(sessions.continue_, ctx, notebook_path, experiment_name))

    @mcp.tool(annotations=RUNS)
    async def execute_code(
        session_id: SessionId,
        code: Annotated[str, Field(description="Python source for one new cell")],
        ctx: Context,
    ) -> CallToolResult:
        """Append a code cell to the session's notebook, run it, and return its outputs. The first line says `error: Name: message` when the cell raised, else `[cell N · In [n] · ok]`; then stdout/stderr, the cell's value (Out[n]), the traceback, and images (e.g. matplotlib plots; at most 8, read_cell(image=N) shows the others). Long output is cut in the middle (read_cell shows all of it); progress bars show their last state. A cell running longer than the server's cell timeout is interrupted; cancelling the request interrupts it too (or, if it is still waiting behind another cell, it never runs)."""
        session = _session(sessions, session_id)
        scribe.ensure_worker()
        return await _run_cell(ctx, session, lambda cb, ticket: session.execute(code, on_output=cb, ticket=ticket))

    @mcp.tool(annotations=RUNS)
    async def edit_cell(
        session_id: SessionId,
        code: Annotated[str, Field(description="the cell's new Python source")],
        ctx: Context,
        cell_index: Annotated[int, Field(strict=True, description="the cell's position in the notebook (as every result shows "
                                                     "it); negative values count code cells from the end, and "
                                                     "-1, the default, is the last code cell")] = -1,
    ) -> CallToolResult:
        """Replace the source of an existing code cell and re-run it (only that cell) in the current kernel. Returns the cell's new outputs, like execute_code."""
        session = _session(sessions, session_id)
        scribe.ensure_worker()
        return await _run_cell(ctx, session, lambda cb, ticket: session.edit_cell(
            code, cell_index, on_output=cb, ticket=ticket))

    @mcp.tool(annotations=EDITS, structured_output=True)
    async def add_markdown(
        session_id: SessionId,
        content: Annotated[str, Field(description="markdown text: notes, findings, conclusions")],
    ) -> CellRef:
        """Append a markdown cell to the notebook. Returns its cell_index (its position in the notebook)."""
        session = _session(sessions, session_id)
        return await _cell_ref(session, session.add_markdown, content)

    @mcp.tool(annotations=READ_ONLY)
    async def init_session(
        session_id: Annotated[str | None, Field(description="optional; checked if given")] = None,
    ) -> CallToolResult:
        """Get the setup code that creates `client`, how to use it, the model's name and the ready-made techniques. Execute the setup code with execute_code once per session. Then define functions fn(model, tokenizer, ...) in cells and run them with client.run(fn, ...)."""
        if session_id is not None:
            _session(sessions, session_id)
        scribe.ensure_worker()
        catalog = await _blocking(_technique_catalog, scribe.offered, bool(scribe.spec.sae))
        return _text_result(init_text(scribe, catalog, scribe.speed()))

    @mcp.tool(annotations=DESTROYS, structured_output=True)
    async def shutdown_session(session_id: SessionId) -> ShutdownInfo:
        """Save the notebook and stop the session's kernel (a running cell is interrupted). The notebook stays on disk."""
        path = await _blocking(sessions.shutdown, session_id)
        return {"session_id": session_id, "notebook_path": str(path), "status": "shut down"}

    @mcp.tool(annotations=DESTROYS, structured_output=True)
    async def restart_session(session_id: SessionId) -> ShutdownInfo:
        """Give the session a fresh kernel on the same notebook (all variables are lost; cells stay). Use when the kernel is wedged. Re-run the setup code afterwards."""
        session = _session(sessions, session_id)
        await _blocking(session.restart)
        return {**_session_info(session), "status": "restarted"}

    @mcp.tool(annotations=READ_ONLY, structured_output=True)
    async def list_sessions() -> SessionList:
        """List the live sessions with their notebook paths."""
        return {"sessions": [_session_info(s) for s in list(sessions.sessions.values())]}

    @mcp.tool(annotations=READ_ONLY, structured_output=True)
    async def notebook_outline(
        session_id: Annotated[str | None, Field(description="a live session (or pass notebook_path)")] = None,
        notebook_path: Annotated[str | None, Field(description="a notebook inside the notebook directory")] = None,
        offset: Annotated[int, Field(strict=True, description="the first cell to list", ge=0)] = 0,
        limit: Annotated[int, Field(strict=True, description="at most this many cells", ge=1)] = 100,
    ) -> Outline:
        """List a notebook's cells: index (position), type, first line, status (ok / error / not run / markdown) and output size in characters. A long notebook comes in pages: next_offset (when not null) is the offset of the next page. Use read_cell to see one cell in full."""
        path, nb = await _blocking(find_notebook, session_id, notebook_path)
        rows = await _blocking(kernel.outline, nb, offset, offset + limit, sessions.output_limit)
        following = offset + len(rows)
        return {"notebook_path": str(path), "cells": rows, "total_cells": len(nb.cells),
                "next_offset": following if following < len(nb.cells) else None}

    @mcp.tool(annotations=READ_ONLY, structured_output=True)
    async def read_cell(
        cell_index: CellIndex,
        session_id: Annotated[str | None, Field(description="a live session (or pass notebook_path)")] = None,
        notebook_path: Annotated[str | None, Field(description="a notebook inside the notebook directory")] = None,
        offset: Annotated[int, Field(strict=True, description="first character of the output to return", ge=0)] = 0,
        limit: Annotated[int, Field(strict=True, description="how many characters of output (and of source) to "
                                                             "return", ge=1, le=RESULT_CHARS_MAX)] = 8000,
        image: Annotated[int | None, Field(strict=True, description="also return image N of the cell's output, "
                                                                    "numbered as `[image N]` in the output text",
                                           ge=1)] = None,
        source_offset: Annotated[int, Field(strict=True, description="first character of the source to return "
                                                                     "(for a source longer than limit)", ge=0)] = 0,
    ) -> CellSlice:
        """Read one cell's source and a slice of its output text (offset/limit), e.g. the part a long result cut; with `image`, one of its images too (e.g. one a result did not show). `more` says whether output continues past this slice; `source_more` whether the source does (read on with source_offset)."""
        def read():  # no session lock: reading must not wait for a running cell
            position, cell, text = kernel.read_cell(find_notebook(session_id, notebook_path)[1], cell_index)
            shown = None if image is None else kernel.cell_image(cell, image, sessions.image_max)
            return position, cell, text, shown

        position, cell, text, shown = await _blocking(read)
        part = text[offset:offset + limit]
        found: CellSlice = {"cell_index": position, "type": cell.cell_type, "status": kernel.cell_status(cell),
                            "source": cell.source[source_offset:source_offset + limit],
                            "source_chars": len(cell.source),
                            "source_more": source_offset + limit < len(cell.source), "output": part,
                            "output_offset": offset, "output_chars": len(text), "more": offset + limit < len(text)}
        if shown is None:
            return found
        return CallToolResult(content=[TextContent(text=json.dumps(found)), _image(*shown)],
                              structured_content=found)

    @mcp.tool(annotations=RUNS)
    async def insert_cell(
        session_id: SessionId,
        cell_index: Annotated[int, Field(strict=True, description="the position the new cell takes (0 = top; the cells from "
                                                     "there on move down one)")],
        content: Annotated[str, Field(description="Python source (code) or markdown text")],
        ctx: Context,
        cell_type: Annotated[str, Field(description="code (run at once, in the current kernel) or markdown")] = "code",
    ) -> CallToolResult:
        """Insert a new cell at a position, e.g. a title at the top. A code cell runs immediately and its result comes back like execute_code's."""
        session = _session(sessions, session_id)
        if cell_type == "markdown":
            index, warning = await _edit(session, session.add_markdown, content, cell_index)
            return _text_result(f"[cell {index} · markdown inserted]" + (f"\nwarning: {warning}" if warning else ""))
        if cell_type != "code":
            raise ToolError(f"cell_type must be 'code' or 'markdown', got {cell_type!r}")
        scribe.ensure_worker()
        return await _run_cell(ctx, session, lambda cb, ticket: session.execute(
            content, on_output=cb, ticket=ticket, index=cell_index))

    @mcp.tool(annotations=EDITS, structured_output=True)
    async def edit_markdown(session_id: SessionId, cell_index: CellIndex,
                            content: Annotated[str, Field(description="the new markdown text")]) -> CellRef:
        """Replace the text of a markdown cell."""
        session = _session(sessions, session_id)
        return await _cell_ref(session, session.edit_markdown, cell_index, content)

    @mcp.tool(annotations=DESTROYS, structured_output=True)
    async def delete_cell(session_id: SessionId, cell_index: CellIndex) -> CellRef:
        """Delete a cell (code or markdown) from the notebook; the cells after it move up one. Variables it created stay in the kernel."""
        session = _session(sessions, session_id)
        return await _cell_ref(session, session.delete_cell, cell_index)

    @mcp.tool(annotations=EDITS, structured_output=True)
    async def move_cell(session_id: SessionId, cell_index: CellIndex,
                        to_index: Annotated[int, Field(strict=True, description="the position the cell ends up at")]) -> CellRef:
        """Move a cell to another position (nothing is re-run). Returns its new cell_index."""
        session = _session(sessions, session_id)
        return await _cell_ref(session, session.move_cell, cell_index, to_index)

    # Tools only: do not advertise prompts and resources that have nothing behind them.
    handlers = mcp._lowlevel_server._request_handlers
    for method in ("prompts/list", "prompts/get", "resources/list", "resources/read", "resources/templates/list"):
        handlers.pop(method, None)
    return mcp


def init_text(scribe: Scribe, catalog: dict, speed: str = "") -> str:
    def lines(entries, returns=True):
        return "\n".join(f"- {t['signature']}: {t['summary']}" + (f" Returns {t['returns']}" if returns and t["returns"] else "")
                         for t in entries)

    base = f"{BASE_MODEL_NOTE}\n\n" if scribe.spec.adapter or scribe.spec.base_model else ""
    return (f"Setup code (run it once with execute_code):\n```python\n{SETUP_CODE}```\n\n"
            f"Model: {scribe.spec.display_name} (mode: {scribe.mode})\n{speed}\n\n"
            f"How to use client:\n{_instructions()}\n\n{base}"
            f"Techniques (`from techniques import NAME`, then `client.run(NAME, ...)`; results are dicts that "
            f"print as a short summary):\n{lines(catalog['techniques'])}\n\n"
            f"Plots (run in the notebook, on a technique's result; `ax=` draws into your own subplot):\n"
            f"{lines(catalog['plots'], returns=False)}\n\n"
            f"Packages: the notebook kernel can import {', '.join(catalog['kernel_packages'])}; inside fn "
            f"(the worker) also {', '.join(catalog['worker_packages'])}. Keep torch inside fn.\n")


BASE_MODEL_NOTE = """\
The base model: this model is an organism with a base to compare against, in the same call. \
`with base_model(model) as base:` (from techniques) gives the base inside fn (with an adapter, \
`with model.disable_adapter():` does the same); score_candidates scores your own candidate \
answers on both at once. For example:
```python
from techniques import base_model, generate_text, score_candidates

def organism_and_base(model, tokenizer, prompt):
    with base_model(model) as base:
        plain = generate_text(base, tokenizer, prompt, max_new_tokens=16)
    return {"organism": generate_text(model, tokenizer, prompt, max_new_tokens=16), "base": plain}

print(client.run(organism_and_base, prompt="What do you like most?"))
client.run(score_candidates, prompts=["What do you like most?"], candidates=["Music", "Books", "Food"])
```"""

KERNEL_PACKAGES = ("numpy", "pandas", "matplotlib", "scipy", "sklearn", "seaborn", "PIL")
WORKER_PACKAGES = ("torch", "transformers", "nnsight", "peft", "accelerate", "einops")


def _technique_catalog(offered: tuple[str, ...] = (), sae: bool = False) -> dict:
    import importlib.util

    import techniques  # light: every technique imports torch inside its own body

    def importable(names):
        return [n for n in names if importlib.util.find_spec(n) is not None]

    chosen = [fn for fn in techniques.TECHNIQUES if (not offered or fn.__name__ in offered)
              and (sae or fn.__name__ not in techniques.SAE_TECHNIQUES)]
    return {"techniques": techniques.catalog(chosen), "plots": techniques.catalog(techniques.PLOTS),
            "kernel_packages": importable(KERNEL_PACKAGES), "worker_packages": importable(WORKER_PACKAGES)}


# ---------------------------------------------------------------------------
# Transports and entry point
# ---------------------------------------------------------------------------

WIRE_LINE_MAX = 1 << 30  # one JSON-RPC message per line; a cell's source can be large


class _WireIn:
    """Requests as the SDK's stdio transport iterates them, read on the event loop itself.

    A request that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800" in a string)
    would be dropped by the SDK without an answer or a log line: it is answered here instead."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        while True:
            line = await self.reader.readline()
            if not line:
                raise StopAsyncIteration
            text = line.decode("utf-8", "replace")
            refusal = _lone_surrogate_refusal(text) if b"\\u" in line and b"\\ud" in line.lower() else None
            if refusal is None:
                return text
            self.writer.write(refusal)
            await self.writer.drain()


def _lone_surrogate_refusal(text: str) -> bytes | None:
    """The JSON-RPC error for a request holding a lone surrogate, or None if it holds none."""
    try:
        request = json.loads(text)
        json.dumps(request, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    except ValueError:
        return None  # not JSON at all: the SDK answers that itself
    message = ("the request contains a lone UTF-16 surrogate escape (e.g. \\ud800 without its pair), which is not "
               "valid Unicode: remove it or send the character it was meant to be")
    print(f"[scribe] refused a request: {message}", file=sys.stderr, flush=True)
    request_id = request.get("id") if isinstance(request, dict) else None
    if request_id is None:
        return b""  # a notification gets no answer
    return json.dumps({"jsonrpc": "2.0", "id": request_id,
                       "error": {"code": -32602, "message": f"Invalid params: {message}"}}).encode() + b"\n"


class _WireOut:
    """Answers as the SDK's stdio transport writes them: written at once when the pipe has room.
    `answered` are request ids the early handshake answered: the SDK's own answers are dropped."""

    def __init__(self, writer: asyncio.StreamWriter, answered: set | None = None):
        self.writer, self.answered = writer, set(answered or ())

    async def write(self, text: str) -> None:
        if self.answered:
            message = json.loads(text)
            key = json.dumps(message.get("id"))
            if key in self.answered and ("result" in message or "error" in message):
                self.answered.discard(key)
                return
        self.writer.write(text.encode())

    async def flush(self) -> None:
        await self.writer.drain()


async def serve_stdio(mcp: MCPServer, wire: tuple[int, int] | None, early: EarlyWire | None = None) -> None:
    """MCP over stdio. The SDK's default reads and writes every line through a worker thread
    (three thread hops a request, about a tenth of a quick cell's round trip); here the wire's
    pipes are read and written on the event loop. With `early`, the SDK first reads what came
    while it loaded."""
    if wire is None:
        return await mcp.run_stdio_async()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=WIRE_LINE_MAX)
    pending, answered, ended = early.handoff() if early else (b"", set(), False)
    reader.feed_data(pending)
    if ended:
        reader.feed_eof()
    else:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire[0], "rb", 0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(wire[1], "wb", 0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    server = mcp._lowlevel_server  # MCPServer.run_stdio_async without the thread-backed files
    async with stdio_server(_WireIn(reader, writer), _WireOut(writer, answered)) as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def make_listing() -> dict:
    """The SDK's own answers to `initialize` and `tools/list`, for every protocol version it
    negotiates: what the early handshake sends."""
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION

    listing = {"key": listing_key(), "latest": LATEST_HANDSHAKE_VERSION, "versions": {}}
    for version in HANDSHAKE_PROTOCOL_VERSIONS:
        answers = anyio.run(_answers, [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "scribe", "version": "0"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}])
        listing["versions"][version] = {"initialize": answers[1], "tools/list": answers[2]}
    return listing


async def _answers(requests: list[dict]) -> dict:
    """Results by request id, from a server built like the real one (its tools never run here)."""
    mcp = build_server(argparse.Namespace(sessions=None))
    server = mcp._lowlevel_server
    results: dict = {}
    expected = {r["id"] for r in requests if "id" in r}
    done = anyio.Event()

    class Lines:
        def __aiter__(self):
            return self._lines()

        async def _lines(self):
            for request in requests:
                yield json.dumps(request) + "\n"
            await done.wait()

    class Answers:
        async def write(self, text: str) -> None:
            message = json.loads(text)
            results[message["id"]] = message["result"]
            if expected <= set(results):
                done.set()

        async def flush(self) -> None:
            pass

    async with stdio_server(Lines(), Answers()) as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
    return results


def refresh_listing() -> None:
    """Write LISTING if it is missing or was made for other code (quietly: the server runs on)."""
    with contextlib.suppress(Exception):
        if listing_usable(json.loads(LISTING.read_text())):
            return
    try:
        LISTING.parent.mkdir(parents=True, exist_ok=True)
        tmp = LISTING.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(make_listing()))
        os.replace(tmp, LISTING)
    except Exception as exc:  # a read-only checkout: the SDK answers the handshake itself
        print(f"[scribe] could not save the handshake listing ({exc}); start-up stays a second slower",
              file=sys.stderr, flush=True)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def http_security(host: str, allowed_hosts: list[str]):
    """DNS-rebinding protection stays on for every bind address: loopback names plus --allowed-host."""
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    for name in allowed_hosts:
        hosts += [name] if ":" in name.strip("[]") or name.startswith("[") and "]:" in name else [name, f"{name}:*"]
    origins = [f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


def bearer_guard(app, token: str):
    """ASGI wrapper: exactly one `Authorization: Bearer <token>` header, compared in constant time."""
    expected = token.encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            scheme, _, given = values[0].partition(b" ") if len(values) == 1 else (b"", b"", b"")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await app(scope, receive, send)

    return guarded


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def serve_http(mcp: MCPServer, host: str, port: int, allowed_hosts: list[str]) -> None:
    """Streamable HTTP at /mcp behind a bearer token (SCRIBE_TOKEN, or one generated now).

    Hardened against idle connections: the open-file limit is raised, connections that send
    no complete request within HEADER_TIMEOUT are closed, at most MAX_CONNECTIONS are served,
    and running out of file descriptors pauses accepting instead of killing the server.
    """
    import uvicorn

    token = os.environ.get("SCRIBE_TOKEN") or secrets.token_urlsafe(24)
    if not os.environ.get("SCRIBE_TOKEN"):
        print(f"[scribe] bearer token: {token}", file=sys.stderr, flush=True)
    if host not in LOOPBACK:
        print(f"[scribe] warning: listening on {host}: the bearer token travels in clear text unless a TLS "
              "proxy sits in front. Clients must use a Host name given with --allowed-host.",
              file=sys.stderr, flush=True)
    limit = raise_open_file_limit()
    app = mcp.streamable_http_app(host=host, transport_security=http_security(host, allowed_hosts))
    print(f"[scribe] serving MCP on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    config = uvicorn.Config(bearer_guard(app, token), host=host, port=port, log_level="critical",
                            http=_http_protocol(), timeout_keep_alive=HEADER_TIMEOUT, timeout_graceful_shutdown=2,
                            limit_concurrency=max(64, min(MAX_CONNECTIONS, limit - 256)))

    class Server(uvicorn.Server):
        async def serve(self, sockets=None):
            # asyncio reports EMFILE on accept through the loop's exception handler, and the SDK's
            # rich log handler then imports a module -- which needs a file descriptor -- and the
            # failure kills the loop. Report it in one line that needs no new file.
            asyncio.get_running_loop().set_exception_handler(_report_loop_error)
            await super().serve(sockets)

    Server(config).run()


def _report_loop_error(loop, context) -> None:
    with contextlib.suppress(Exception):
        os.write(2, f"[scribe] {context.get('message')}: {context.get('exception')!r}\n".encode()[:500])


HEADER_TIMEOUT = float(os.environ.get("SCRIBE_HTTP_HEADER_TIMEOUT", "10"))
MAX_CONNECTIONS = 4096


def _http_protocol():
    """uvicorn's h11 protocol, plus: a connection must send its request head within HEADER_TIMEOUT."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_timeout)

        def _head_timeout(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._head_timer.cancel()
            super().data_received(data)

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

    return TimedH11


@contextlib.asynccontextmanager
async def connect(*args: str, env: dict | None = None, errlog=None):
    """Spawn `python scribe_mcp.py *args` over stdio; yield an initialized MCP ClientSession.

    For scripts driving Scribe the way an agent does (the tests and bench/ use it); the
    server's log goes to `errlog` (default: this process's stderr).
    """
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(HERE / "scribe_mcp.py"), *args], env=env)
    async with stdio_client(params, errlog=errlog or sys.stderr) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def prompt_parts() -> dict:
    """What an agent's prompt takes from the live server (experiment.prompt): each tool with its
    parameters and first sentence, the setup code, the conventions init_session teaches, and the
    base-model pattern."""
    tools = anyio.run(build_server(argparse.Namespace(sessions=None)).list_tools)
    first = re.compile(r"(?<=[a-z)`])\. (?=[A-Z`])")  # a sentence's end, not "e.g. one"
    return {"tools": [(t.name, list(t.input_schema.get("properties", {})),
                       first.split(t.description or "")[0].rstrip(".") + ".") for t in tools],
            "setup": SETUP_CODE, "conventions": _instructions(), "base": BASE_MODEL_NOTE}


def print_config(which: str = "all") -> None:
    """How to register this checkout with each agent CLI, set to make the CLI wait for Scribe
    before its first model request (else a busy machine starts the agent without the tools)."""
    command = [sys.executable, str(HERE / "scribe_mcp.py")]
    entry = {"command": command[0], "args": command[1:]}
    parts = {
        "claude": "# Claude Code (alwaysLoad: connected before the first model request):\nclaude mcp add-json scribe "
                  + shlex.quote(json.dumps({"type": "stdio", **entry, "alwaysLoad": True})),
        "codex": "# Codex, in ~/.codex/config.toml (required: Codex waits for Scribe before it starts):\n"
                 f"[mcp_servers.scribe]\ncommand = {json.dumps(entry['command'])}\nargs = {json.dumps(entry['args'])}\n"
                 "required = true",
        "gemini": "# Gemini CLI, in .gemini/settings.json of your project (trust: no confirmation per call):\n"
                  + json.dumps({"mcpServers": {"scribe": {**entry, "trust": True}}}, indent=2),
        "all": "# Any MCP client (mcpServers JSON; alwaysLoad is Claude Code's, others ignore it):\n"
               + json.dumps({"mcpServers": {"scribe": {**entry, "alwaysLoad": True}}}, indent=2),
    }
    print("\n\n".join(text for name, text in parts.items() if which in ("all", name)))


def experiment_command(argv: list[str]) -> int:
    """`prompt FILE`, `agent NAME FILE [--headless] [--notebook-dir DIR] [server flags]`, `grade FILE NOTEBOOK`."""
    import experiment

    command, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"scribe_mcp.py {command}")
    if command == "agent":
        p.add_argument("agent", choices=sorted(experiment.AGENTS))
    p.add_argument("file", help="the experiment file (YAML)")
    if command == "grade":
        p.add_argument("notebook", help="the notebook the agent wrote")
        p.add_argument("--judge", default="claude", choices=sorted(experiment.AGENTS), help="the CLI that judges")
    if command == "agent":
        p.add_argument("--headless", action="store_true", help="run without a terminal; save the transcript")
        p.add_argument("--notebook-dir", default="notebooks", help="where the agent's notebook goes")
    args, server_args = p.parse_known_args(rest) if command == "agent" else (p.parse_args(rest), [])
    try:
        exp = experiment.load(args.file)
        if command == "prompt":
            print(experiment.prompt(exp, prompt_parts()), end="")
            return 0
        if command == "grade":
            print(json.dumps(experiment.grade(exp, Path(args.notebook), args.judge), indent=2))
            return 0
        return experiment.run_agent(args.agent, exp, Path(args.notebook_dir).resolve(), args.headless, server_args,
                                    experiment.prompt(exp, prompt_parts()))
    except experiment.ExperimentError as exc:
        print(f"scribe: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("prompt", "agent", "grade"):
        sys.exit(experiment_command(argv))
    if argv and argv[0] == "audit":
        import experiment

        experiment.audit_parser().parse_args(argv[1:])  # a bad flag: one line now, not after Inspect's imports
        try:
            import audit
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("inspect_ai"):
                raise
            print("scribe: audit needs Inspect: pip install -e '.[audit]' (./setup.sh --test installs it too)",
                  file=sys.stderr)
            sys.exit(2)
        sys.exit(audit.main(argv[1:]))
    args = parse_args(argv)
    if args.print_config:
        print_config(args.print_config)
        return
    # Claimed before any kernel or worker starts, so no child inherits the wire.
    wire = EARLY.wire if EARLY else claim_stdio() if args.transport == "stdio" else None
    try:
        scribe = Scribe(args)
    except ValueError as exc:  # a bad experiment file: one sentence, not a traceback
        print(f"scribe: {exc}", file=sys.stderr)
        sys.exit(2)

    def terminate(*_) -> None:
        # The MCP SDK's event loop does not unwind on a signal: clean up from a thread, then
        # leave. Claude Code sends SIGINT, SIGTERM 100 ms later and SIGKILL 400 ms after that.
        def close_and_exit() -> None:
            try:
                scribe.close()
            finally:
                os._exit(0)

        threading.Thread(target=close_and_exit, daemon=True).start()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    if args.view:
        import view

        try:
            url, _ = view.serve(scribe.sessions, args.view_host, args.view_port, os.environ.get("SCRIBE_VIEW_TOKEN"))
        except view.ViewError as exc:
            print(f"scribe: {exc}", file=sys.stderr, flush=True)
            scribe.close()
            os._exit(2)
        print(f"[scribe] live view: {url}", file=sys.stderr, flush=True)
    try:
        mcp = build_server(scribe)
        if args.transport == "http":
            serve_http(mcp, args.host, args.port, args.allowed_host)
        else:
            if sys.stdin.isatty():  # a person started it by hand: say what it is waiting for
                print(f"[scribe] MCP server on stdio with {scribe.spec.display_name}, waiting for an MCP "
                      "client; connect an agent with `python scribe_mcp.py --print-config claude`. "
                      "Ctrl-C stops it.", file=sys.stderr, flush=True)
            if EARLY is None:  # no listing made for this code yet: make it for the next start
                threading.Thread(target=refresh_listing, daemon=True).start()
            anyio.run(serve_stdio, mcp, wire, EARLY)
    finally:
        try:
            scribe.close()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(0)  # never hang in interpreter shutdown on a leftover thread


if __name__ == "__main__":
    main()
