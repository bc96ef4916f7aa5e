"""Notebook sessions: one real ipykernel plus one .ipynb file on disk per session.

The MCP layer only translates tool calls into `SessionManager` / `Session` calls; this module
owns the kernels' and notebooks' whole life. It knows nothing about models: the MCP server
passes the environment kernels run with (`kernel_env`), which tells code in a kernel where the
model worker is.

What the agent reads (`CellResult.text`, `.images`) is kept apart from what is saved (the
cell's outputs in Jupyter's own format), so truncation and downscaling never touch the file.
Cells are numbered by their position in the notebook (markdown cells count), everywhere.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from queue import Empty

import nbformat
import zmq
from jupyter_client import KernelManager

DEFAULT_CELL_TIMEOUT = 600.0
DEFAULT_OUTPUT_LIMIT = 8000
DEFAULT_IMAGE_MAX = 1024
DEFAULT_IDLE_TIMEOUT = 4 * 3600.0
# How long a timed-out cell gets to honour the interrupt before the kernel is restarted.
INTERRUPT_GRACE = 5.0
# While a long cell runs, its outputs so far are saved this often, and merged (for the live
# view and progress) this often.
SAVE_EVERY = 2.0
MERGE_EVERY = 0.5
# After the kernel's execute_reply, how long to wait for the trailing `idle` status before
# sending a probe (kernel_info) whose own status, coming after all of this cell's output on the
# same channel, proves that nothing more is on the way; and how long to wait for the probe.
IDLE_AFTER_REPLY = 0.5
PROBE_WAIT = 30.0
LOST_OUTPUT = ("the kernel's output channel lost messages of this cell (its final status never came): "
               "the output shown and saved may be incomplete")
# Images larger than this are not decoded for the agent (a 20000x20000 PNG is 1.6 GB of pixels).
IMAGE_PIXELS_MAX = 40_000_000
# Images returned with one cell: Claude Code counts each as ~1,600 tokens against its 25k-token
# result limit (with a full text output, 8 stay well under it); read_cell shows the others.
IMAGES_PER_RESULT = 8
# Longest notebook file name we create (file systems refuse names over 255 bytes).
NAME_MAX = 120

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DEFAULT_REPR = re.compile(r"<[\w.]+( object)?( at 0x[0-9a-f]+)?>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"<[^>]*>")
_PROJECT_DIR = str(Path(__file__).resolve().parent)
_UMASK = os.umask(0)
os.umask(_UMASK)


class SessionError(Exception):
    """A request that cannot be served; the message says what was wrong and what to do."""


class Cancelled(SessionError):
    """The request was cancelled before it started: nothing ran, nothing changed."""


@dataclass
class CellResult:
    """One executed cell: outputs as saved, plus the compact view an agent reads."""

    cell_index: int  # position in the notebook, markdown cells included
    execution_count: int | None
    outputs: list
    status: str  # "ok", "error", "timeout", "died", "interrupted"
    text: str = ""
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (format, data)
    notes: list[str] = field(default_factory=list)  # one-line warnings about the run itself


class Stop:
    """Stops a multi-cell run from another thread: between cells, and the running cell is interrupted."""

    def __init__(self):
        self._event = threading.Event()
        self.session: Session | None = None

    def set(self) -> None:
        self._event.set()
        if self.session is not None:
            self.session.interrupt()

    def is_set(self) -> bool:
        return self._event.is_set()


class Ticket:
    """One request waiting for its session: cancelled before it starts, it never runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.state = "queued"

    def cancel(self) -> bool:
        """Returns True if the request had not started (it now never will)."""
        with self._lock:
            if self.state == "queued":
                self.state = "cancelled"
                return True
            return False

    def start(self) -> None:
        with self._lock:
            if self.state == "cancelled":
                raise Cancelled("cancelled before it ran")
            self.state = "running"


# ---------------------------------------------------------------------------
# Rendering: what the agent sees
# ---------------------------------------------------------------------------


def collapse_cr(text: str) -> str:
    """Apply carriage returns the way Jupyter front ends show them: later text overwrites the line.

    A 10,000-step progress bar becomes its last state. Only complete lines are final; callers
    that stream text keep the unfinished last line raw (see _Stream).
    """
    if "\r" not in text:
        return text
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown)
    return "\n".join(lines)


def render(outputs: list, output_limit: int = DEFAULT_OUTPUT_LIMIT,
           image_max: int | None = DEFAULT_IMAGE_MAX) -> tuple[str, list[tuple[str, bytes]], list[str]]:
    """Outputs → (text, images, notes). Text over the limit keeps its head and tail.

    Images are numbered in output order, `[image N]` in the text, and the first
    IMAGES_PER_RESULT are returned. image_max None: text only, no image is decoded.
    """
    parts, images, notes, n_images, hidden = [], [], [], 0, 0
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            parts.append(out["text"])
        elif kind == "error":
            parts.append(error_text(out))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            image = _image_type(data)
            if image is None:
                text = display_text(data)
                if text is not None:
                    prefix = f"Out[{out['execution_count']}]: " if kind == "execute_result" else ""
                    parts.append(f"{prefix}{text}\n")
                continue
            n_images += 1
            if image_max is not None:
                if len(images) >= IMAGES_PER_RESULT:
                    hidden += 1
                    parts.append(f"[image {n_images}: not shown, read_cell(image={n_images}) shows it]\n")
                    continue
                try:
                    images.append(downscale(image, base64.b64decode(data[f"image/{image}"]), image_max))
                except Exception as exc:  # the cell ran; one bad image must not hide its result
                    notes.append(f"image {n_images} could not be shown ({type(exc).__name__}: {exc}); "
                                 "it is kept in the notebook")
            parts.append(f"[image {n_images}]\n")
    if hidden:
        notes.append(f"{n_images} images: the first {IMAGES_PER_RESULT} are shown (more would overflow clients' "
                     f"result limits); read_cell(cell_index, image=N) shows image N, or draw several plots "
                     f"in one figure")
    return truncate("".join(parts), output_limit), images, notes


def display_text(data: dict) -> str | None:
    """A rich output as text: markdown as written; HTML without its tags when the plain form is
    only an object's default repr (`<IPython.core.display.HTML object>` tells the agent nothing)."""
    if "text/markdown" in data:
        return data["text/markdown"]
    plain = data.get("text/plain")
    if "text/html" in data and (plain is None or _DEFAULT_REPR.fullmatch(plain.strip())):
        text = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", data["text/html"])))
        lines = (" ".join(line.split()) for line in text.splitlines())
        return "[HTML as text] " + "\n".join(line for line in lines if line)
    return plain


def _image_type(data: dict) -> str | None:
    return next((kind for kind in ("png", "jpeg") if f"image/{kind}" in data), None)


def cell_image(cell, number: int, image_max: int) -> tuple[str, bytes]:
    """Image `number` (counted from 1, as `[image N]` in a cell's output) of a code cell, downscaled."""
    found = [(kind, data) for out in cell.get("outputs", []) if out.get("output_type") in ("execute_result", "display_data")
             for data in [out.get("data", {})] if (kind := _image_type(data))]
    if not 1 <= number <= len(found):
        raise SessionError(f"image={number}: this cell has {len(found)} image(s)"
                           + (f"; choose 1 to {len(found)}" if found else ""))
    kind, data = found[number - 1]
    return downscale(kind, base64.b64decode(data[f"image/{kind}"]), image_max)


def error_text(out) -> str:
    """An error output as its traceback (which ends with `Name: message`), without colour codes."""
    tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
    return f"{tb}\n" if tb.strip() else f"{out['ename']}: {out['evalue']}\n"


def truncate(text: str, limit: int, hint: str = "read_cell shows all of it") -> str:
    """`text` cut in the middle to about `limit` characters, with a marker saying what is cut and
    where. The cut falls between lines where one ends near it: a table loses whole rows."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    end = head.rfind("\n")
    if end >= len(head) // 2:
        head = head[:end + 1]
    start = tail.find("\n")
    if 0 <= start < len(tail) // 2:
        tail = tail[start + 1:]
    cut = text[len(head):len(text) - len(tail)]
    lines = f"{cut.count(chr(10))} lines, " if cut.count("\n") > 1 else ""
    return (f"{head.rstrip(chr(10))}\n... [{lines}{len(cut)} characters cut at offset {len(head)}; the notebook "
            f"keeps everything, {hint}] ...\n{tail}")


def image_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header without decoding the image."""
    if fmt == "png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def downscale(fmt: str, data: bytes, image_max: int) -> tuple[str, bytes]:
    size = image_size(fmt, data)
    if size is not None and max(size) <= image_max:
        return fmt, data
    if size is not None and size[0] * size[1] > IMAGE_PIXELS_MAX:
        raise ValueError(f"{size[0]}x{size[1]} pixels is too large to downscale")
    import io

    from PIL import Image  # only for images that need it: PIL costs ~50 ms to import

    img = Image.open(io.BytesIO(data))
    if img.size[0] * img.size[1] > IMAGE_PIXELS_MAX:
        raise ValueError(f"{img.size[0]}x{img.size[1]} pixels is too large to downscale")
    if max(img.size) <= image_max:
        return fmt, data
    img.thumbnail((image_max, image_max))
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG")
    return fmt, buf.getvalue()


# ---------------------------------------------------------------------------
# Notebook files
# ---------------------------------------------------------------------------


def new_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python", "version": ".".join(map(str, sys.version_info[:3]))},
    })
    return nb


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read and validate a notebook; a file that is not one gets a clear error and is untouched."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:
        raise SessionError(f"{path.name} is not a valid Jupyter notebook: {str(exc).splitlines()[0]}") from None
    for cell in nb.cells:
        cell.setdefault("id", secrets.token_hex(4))
    return nb


class NotebookFile:
    """A notebook kept in memory and written atomically after every change.

    Each cell's JSON is cached until the cell changes, so saving cell 500 costs about what
    saving cell 1 does: the file is assembled from cached pieces, not re-serialized whole.
    """

    def __init__(self, path: Path, nb: nbformat.NotebookNode):
        self.path, self.nb = path, nb
        self._cell_json: dict[int, str] = {}
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed midway
            with contextlib.suppress(OSError):
                stale.unlink()

    def save(self, *changed) -> str | None:
        """Write the file; `changed` are cells edited since the last save (their cached JSON is stale).

        Never raises: a failed save (disk full, folder deleted) returns a one-line warning, and
        the next save writes everything again.
        """
        for cell in changed:
            self._cell_json.pop(id(cell), None)
        try:
            self._write()
        except Exception as exc:
            return f"the notebook could not be saved ({type(exc).__name__}: {exc})"
        return None

    def cached_json(self, cell) -> str | None:
        """The cell's JSON as last saved, or None if it changed since (a cheap change check)."""
        return self._cell_json.get(id(cell))

    def _write(self) -> None:
        cells = []
        for cell in self.nb.cells:
            text = self._cell_json.get(id(cell))
            if text is None:
                text = self._cell_json[id(cell)] = json.dumps(cell, sort_keys=True, indent=1, ensure_ascii=False)
            cells.append(text)
        head = {k: v for k, v in self.nb.items() if k != "cells"}
        body = json.dumps(head, sort_keys=True, indent=1, ensure_ascii=False)
        text = body[:-1].rstrip() + ',\n "cells": [\n' + ",\n".join(cells) + "\n ]\n}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)  # recreated if someone deleted it
        # Crash-safe: a reader (or a crash) sees the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 is not what users expect
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        live = {id(c) for c in self.nb.cells}
        if len(self._cell_json) > len(live):  # forget cells that were removed
            self._cell_json = {k: v for k, v in self._cell_json.items() if k in live}


def cell_status(cell) -> str:
    """What a cell's saved outputs say about its last run."""
    if cell.cell_type != "code":
        return cell.cell_type
    if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
        return "error"
    return "not run" if cell.get("execution_count") is None else "ok"


def first_line(source: str, width: int) -> str:
    """A cell's first non-blank line, cut to `width`."""
    return next((line for line in source.splitlines() if line.strip()), "")[:width]


def outline(nb, start: int = 0, stop: int | None = None, max_chars: int = sys.maxsize) -> list[dict]:
    """Cells start..stop as index, type, first line, status and output size; at least one row,
    and no more than fit in max_chars as JSON (a page of a long notebook)."""
    rows, size = [], 0
    for index in range(start, min(len(nb.cells), sys.maxsize if stop is None else stop)):
        cell = nb.cells[index]
        row = {"index": index, "type": cell.cell_type, "first_line": first_line(cell.source, 100),
               "status": cell_status(cell)}
        if cell.cell_type == "code":
            row["output_chars"] = len(render(cell.get("outputs", []), sys.maxsize, None)[0])
        size += len(json.dumps(row)) + 2
        if rows and size > max_chars:
            break
        rows.append(row)
    return rows


def outline_text(nb) -> str:
    """The outline as compact lines, e.g. `3 code ok (120 chars out): client.run(top_token, ...)`."""
    lines = []
    for row in outline(nb):
        if row["type"] == "code":
            lines.append(f"{row['index']:>3} code {row['status']} ({row['output_chars']} chars out): {row['first_line']}")
        else:
            lines.append(f"{row['index']:>3} {row['type']}: {row['first_line']}")
    return "\n".join(lines)


def position(cells: list, index, insert: bool = False) -> int:
    """A cell position from an index (negative counts from the end), or a clear error."""
    _check_index(index)
    n = len(cells) + (1 if insert else 0)
    if not -n <= index < n:
        what = "positions" if insert else "indices"
        raise SessionError(f"cell_index {index} is out of range: this notebook has {len(cells)} cells, "
                           f"valid {what} are 0..{n - 1} or -{n}..-1" if n else
                           "cell_index is out of range: this notebook has no cells yet")
    return index % n


def read_cell(nb, index) -> tuple[int, object, str]:
    """(position, cell, full rendered output text), for reading in slices."""
    at = position(nb.cells, index)
    cell = nb.cells[at]
    return at, cell, render(cell.get("outputs", []), sys.maxsize, None)[0] if cell.cell_type == "code" else ""


class _Stream:
    """One stream output being written: chunks collected in a list, merged every MERGE_EVERY.

    Growing the text with += made floods quadratic, the reader fell behind and the kernel
    dropped messages. Carriage returns are applied to complete lines as they arrive, so a
    progress bar keeps one line in memory, not every frame of it.
    """

    COMPACT_AT = 1 << 20

    def __init__(self, output):
        self.output, self.done, self.raw, self.raw_len = output, [], [], 0
        self.dirty = False  # text arrived since the last flush

    def add(self, text: str) -> None:
        self.raw.append(text)
        self.raw_len += len(text)
        self.dirty = True
        if self.raw_len > self.COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        raw = "".join(self.raw)
        end = raw.rfind("\n") + 1
        if end:
            self.done.append(collapse_cr(raw[:end]))
            raw = raw[end:]
        cr = raw.rfind("\r")
        if cr > 0:  # the unfinished line: earlier frames are overwritten, keep only the last one raw
            raw = collapse_cr(raw[:cr]) + raw[cr:]
        self.raw, self.raw_len = [raw] if raw else [], len(raw)
        if len(self.done) > 64:
            self.done = ["".join(self.done)]

    def flush(self) -> None:
        if not self.dirty:  # finished blocks are not re-joined every MERGE_EVERY
            return
        self._compact()
        self.output.text = "".join(self.done) + collapse_cr("".join(self.raw))
        self.dirty = False


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------


# A UNIX socket's path must fit sockaddr_un (108 bytes on Linux, 104 on macOS, with the NUL).
SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107

KERNEL_ARGS = [
    # No IPython history: it writes every cell to one SQLite file shared by all kernels (0.8 ms a cell).
    "--HistoryManager.enabled=False",
    # ipykernel sleeps 0.5 ms before every execute_reply so that output reaches clients that stop
    # at the reply; a cell here ends at the `idle` status, which comes after all of its output.
    "--IPythonKernel._execute_sleep=0",
]


# ipykernel's launcher, with two changes. The kernel's IOPub socket never drops a message: its
# send high-water mark (1000 messages) would discard output whenever this reader falls behind
# a flood on a busy machine. And when the server dies (even by SIGKILL), the kernel takes its
# whole process group with it, so processes a cell started do not live on (ipykernel's own
# parent poller ends the kernel alone); a kernel whose server is gone before it starts (or
# whose connection file was removed with the server's runtime folder) does not start at all.
# The notebook folder (the kernel's cwd) is not put on sys.path until IPython's own start-up,
# as with ipykernel_launcher.
KERNEL_LAUNCHER = """\
import os, sys
if not os.path.exists(sys.argv[sys.argv.index("-f") + 1]) or os.getppid() != int(os.environ.get("JPY_PARENT_PID") or os.getppid()):
    sys.exit(0)  # the server that started it is gone: else it would start over TCP, serving no one
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
import zmq
from ipykernel import kernelapp
_bind = kernelapp.IPKernelApp._bind_socket
def _bind_without_drops(self, sock, port):
    if sock.socket_type == zmq.XPUB:
        sock.sndhwm = 0
    return _bind(self, sock, port)
kernelapp.IPKernelApp._bind_socket = _bind_without_drops
import signal, time
from ipykernel import parentpoller
_server = int(os.environ.get("JPY_PARENT_PID") or os.getppid())  # not getppid(): the server may be gone already
def _die_with_the_server(self):
    while os.getppid() == _server:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)
parentpoller.ParentPollerUnix.run = _die_with_the_server
kernelapp.launch_new_instance()
"""


def launch_kernel(runtime: Path, env: dict, cwd: str, started=None, making=contextlib.nullcontext):
    """Start an ipykernel; returns (KernelManager, client) once it answers. `started(km)` is
    called as soon as its process exists (before it answers).

    `runtime`'s parent (the server's runtime folder) must exist: a kernel starting while the
    server shuts down must fail, not recreate the folder the server just removed. `making()`
    is held while its folder, connection file and process are made (SessionManager.making).
    """
    longest = len(os.fsencode(runtime / "k-99"))
    if longest > SOCKET_PATH_MAX:
        raise SessionError(f"the kernel's socket path would be {longest} bytes, over this system's limit of "
                           f"{SOCKET_PATH_MAX}: start the server with a shorter TMPDIR (now {runtime.parent.parent})")
    with making():
        runtime.mkdir(mode=0o700, exist_ok=True)
        # IPC sockets and the connection file in the server's private folder: no TCP port, no
        # litter in ~/.local/share/jupyter, and one rmtree cleans everything.
        km = KernelManager(transport="ipc", ip=str(runtime / "k"), connection_file=str(runtime / "connection.json"))
        km.kernel_spec.argv = [sys.executable, "-c", KERNEL_LAUNCHER, "-f", "{connection_file}"]
        km.start_kernel(cwd=cwd, env=env, extra_arguments=KERNEL_ARGS)
        if started is not None:
            started(km)
    kc = km.client()
    # Never drop IOPub messages: the kernel's high-water mark would discard output (and the
    # final idle status) whenever we fall behind a flood.
    kc.context.setsockopt(zmq.RCVHWM, 0)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
    except RuntimeError as exc:
        stop_kernel(km, kc)
        raise SessionError(f"the kernel did not start: {exc}") from None
    return km, kc


def _kernel_pid(km) -> int | None:
    return getattr(getattr(km, "provisioner", None), "pid", None)


def kill_kernel(km) -> None:
    """SIGKILL the kernel's process group: processes a cell started die with it."""
    pid = _kernel_pid(km)
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the kernel leads its own group (start_new_session)
        with contextlib.suppress(Exception):
            km.provisioner.process.wait(timeout=2)


def _cwd_deleted(km) -> bool:
    """Whether the kernel's working folder was deleted after it started (Linux shows this in
    /proc): relative paths in its cells would fail, even once the folder is made again."""
    try:
        return os.readlink(f"/proc/{_kernel_pid(km)}/cwd").endswith(" (deleted)")
    except OSError:
        return False


def stop_kernel(km, kc) -> None:
    if kc is not None:
        kc.stop_channels()
    if km is not None:
        kill_kernel(km)
        with contextlib.suppress(Exception):
            km.cleanup_resources()


class Session:
    """One kernel and one notebook. Calls on a session are serialized by its lock."""

    def __init__(self, session_id: str, path: Path, nb: nbformat.NotebookNode, manager: SessionManager):
        self.id, self.manager = session_id, manager
        self.file = NotebookFile(path, nb)
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        self.km: KernelManager | None = None
        self.kc = None
        self.closing = False
        self.running_cell = None  # the cell being executed now, for the live view
        self._executed: dict[str, object] = {}  # msg_id -> cell, for this kernel's recent executions
        self._late: list = []  # earlier cells that got output since they finished
        self.save_warning: str | None = None  # why the last edit is not on disk yet
        self.restarting = False  # restart() killed the kernel under a running cell
        self._runtime = manager.runtime / session_id

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def cells(self) -> list:
        return self.file.nb.cells

    # -- kernel life ------------------------------------------------------

    def start_kernel(self) -> None:
        self.km, self.kc = launch_kernel(self._runtime, self.manager.env_for(self.id), str(self.path.parent),
                                         making=self.manager.making)
        self._executed = {}

    def stop_kernel(self) -> None:
        stop_kernel(self.km, self.kc)
        self.km = self.kc = None

    def restart(self) -> None:
        """A fresh kernel on the same notebook; every cell stays on disk.

        If a cell is running, its kernel is killed first: the cell reports the death and lets go.
        """
        if not self.lock.acquire(timeout=0.1):
            # KernelManager is not thread-safe: kill the process and let the cell's thread notice.
            self.restarting = True
            kill_kernel(self.km)
            self.lock.acquire()
        self.restarting = False
        try:
            self.stop_kernel()
            self.start_kernel()
        finally:
            self.lock.release()

    def interrupt(self) -> None:
        if self.km is not None:
            with contextlib.suppress(Exception):
                self.km.interrupt_kernel()

    def shutdown(self, wait: float = 1.0) -> None:
        """Final save, kernel stopped, within about 2*wait seconds even while a cell runs.

        A running cell is interrupted; if it does not stop within `wait`, its kernel is killed.
        Either way the cell reports that the shutdown stopped it.
        """
        self.closing = True
        owned = self.lock.acquire(blocking=False)
        if not owned:
            self.interrupt()
            owned = self.lock.acquire(timeout=wait)
        if not owned:
            kill_kernel(self.km)
            owned = self.lock.acquire(timeout=wait)
        try:
            self.file.save()
            self.stop_kernel()
            shutil.rmtree(self._runtime, ignore_errors=True)
        finally:
            if owned:
                self.lock.release()

    # -- cells ----------------------------------------------------------

    @contextlib.contextmanager
    def _turn(self, ticket: Ticket | None):
        """This session's lock, unless the request was cancelled or the session closed meanwhile."""
        with self.lock:
            if ticket is not None:
                ticket.start()
            if self.closing:
                raise SessionError(f"session {self.id} was shut down")
            yield
            self.last_used = time.monotonic()

    def execute(self, code: str, timeout: float | None = None, on_output=None, ticket: Ticket | None = None,
                index: int | None = None) -> CellResult:
        """Add a code cell (at the end, or at position `index`), run it, save, return its result."""
        _check_source(code, "code")
        with self._turn(ticket):
            position = len(self.cells) if index is None else self._position(index, insert=True)
            cell = _node(cell_type="code", id=secrets.token_hex(4), metadata={}, source=code, outputs=[],
                         execution_count=None)
            self.cells.insert(position, cell)
            # Saved when it finishes, or after SAVE_EVERY seconds if it is still running: one
            # write per quick cell keeps cell 500 as cheap as cell 1.
            return self._run(cell, timeout, on_output)

    def edit_cell(self, code: str, cell_index: int = -1, timeout: float | None = None, on_output=None,
                  ticket: Ticket | None = None) -> CellResult:
        """Replace a code cell's source and re-run it. Negative indices count code cells from the end."""
        _check_source(code, "code")
        with self._turn(ticket):
            code_cells = [c for c in self.cells if c.cell_type == "code"]
            if not code_cells:
                raise SessionError("this notebook has no code cells yet: use execute_code first")
            _check_index(cell_index)
            if cell_index < 0:
                if cell_index < -len(code_cells):
                    raise SessionError(f"cell_index {cell_index} is out of range: negative indices count code "
                                       f"cells from the end and this notebook has {len(code_cells)}")
                cell = code_cells[cell_index]
            else:
                cell = self.cells[self._position(cell_index)]
                if cell.cell_type != "code":
                    raise SessionError(f"cell {cell_index} is a {cell.cell_type} cell: edit it with edit_markdown")
            cell.source = code
            return self._run(cell, timeout, on_output)

    def add_markdown(self, content: str, index: int | None = None) -> int:
        """Add a markdown cell at the end (or at position `index`); returns its position."""
        _check_source(content, "content")
        with self._turn(None):
            position = len(self.cells) if index is None else self._position(index, insert=True)
            self.cells.insert(position, _node(cell_type="markdown", id=secrets.token_hex(4), metadata={},
                                              source=content))
            self._save_edit()
            return position

    def edit_markdown(self, cell_index: int, content: str) -> int:
        _check_source(content, "content")
        with self._turn(None):
            position = self._position(cell_index)
            cell = self.cells[position]
            if cell.cell_type != "markdown":
                raise SessionError(f"cell {position} is a {cell.cell_type} cell, not markdown: use edit_cell")
            cell.source = content
            self._save_edit(cell)
            return position

    def delete_cell(self, cell_index: int) -> dict:
        with self._turn(None):
            position = self._position(cell_index)
            cell = self.cells.pop(position)
            self._save_edit()
            return {"deleted": position, "type": cell.cell_type, "source": cell.source[:200]}

    def move_cell(self, cell_index: int, to_index: int) -> int:
        with self._turn(None):
            source = self._position(cell_index)
            target = self._position(to_index)
            self.cells.insert(target, self.cells.pop(source))
            self._save_edit()
            return target

    def _position(self, index, insert: bool = False) -> int:
        return position(self.cells, index, insert)

    def _save_edit(self, *changed) -> None:
        """Save after an edit. The edit stands even when the disk refuses it (it is written with the
        next save that works), so it is reported as done, with the warning in save_warning: an
        agent told it failed would make it again."""
        warning = self.file.save(*changed)
        self.save_warning = warning and (f"{warning}; the change was made in the session and is written to "
                                         "disk with the next save that works: do not repeat it")

    def run_all(self, on_progress=None, stop: Stop | None = None) -> dict:
        """Re-run every code cell in order, past errors; a summary of what failed.

        on_progress(message) is called before each cell; `stop` ends the run (the cells run so
        far keep their outputs).
        """
        if stop is not None:
            stop.session = self
        failures = []
        code = [(i, c) for i, c in enumerate(self.cells) if c.cell_type == "code"]
        done = 0
        for n, (index, cell) in enumerate(code):
            if stop is not None and stop.is_set():
                break
            if on_progress is not None:
                on_progress(f"session {self.id}: running cell {index} ({n + 1}/{len(code)}): "
                            f"{first_line(cell.source, 60)}")
            result = self._run(cell, None, None)
            done += 1
            if result.status != "ok":
                err = next((o for o in result.outputs if o.get("output_type") == "error"), None)
                failures.append({"cell_index": index, "ename": err["ename"] if err else result.status,
                                 "evalue": err["evalue"] if err else ""})
        summary = {"cells_run": done, "errors": failures}
        if done < len(code):
            summary["stopped"] = f"cancelled after {done} of {len(code)} code cells"
        return summary

    def _run(self, cell, timeout: float | None, on_output) -> CellResult:
        notes = []
        if self.km is None or not self.km.is_alive():
            if self.km is not None:
                notes.append("the kernel had died since your last cell (killed from outside or out of memory) "
                             "and was restarted: variables are gone, re-run the cells you need")
            self.restart()
        timeout = self.manager.cell_timeout if timeout is None else timeout
        cell.outputs, cell.execution_count = [], None
        msg_id = self.kc.execute(cell.source, allow_stdin=False, stop_on_error=False)
        self._executed[msg_id] = cell
        if len(self._executed) > 100:
            self._executed.pop(next(iter(self._executed)))
        self.running_cell = cell
        try:
            status, note = self._collect(cell, msg_id, timeout, on_output)
        finally:
            self.running_cell = None
        if status == "exited":
            self.restart()
            status = "ok"
            notes.append("the cell called exit() or quit(), which stops the kernel: a fresh kernel was started, "
                         "so variables from earlier cells are gone; re-run the cells you need")
        late, self._late = self._late, []
        for earlier in late:
            notes.append(f"cell {self.cells.index(earlier)} printed more after it had finished (a thread it "
                         "started); that output is kept in that cell")
        warning = self.file.save(cell, *late)
        if warning:
            notes.append(f"{warning}; the cell's result is below and saving is tried again after the next cell")
        text, images, image_notes = render(cell.outputs, self.manager.output_limit, self.manager.image_max)
        if status == "ok" and any(o.output_type == "error" for o in cell.outputs):
            status = "error"
        return CellResult(self.cells.index(cell), cell.execution_count, cell.outputs, status, text + note, images,
                          notes + image_notes)

    def _collect(self, cell, msg_id: str, timeout: float, on_output) -> tuple[str, str]:
        """Read the kernel's messages for one execution into the cell until it has finished.

        Finished means the `idle` status for this execution. Output can trail the execute_reply
        (another socket) by seconds on a busy machine, so a quiet spell after the reply is no
        proof: then a probe request goes to the kernel, and its status on IOPub, which follows
        everything the cell sent, ends the wait; the cell then says its output may be incomplete.
        """
        deadline = time.monotonic() + timeout
        last_save = last_merge = time.monotonic()
        interrupted_at = replied_at = reply = probe = probed_at = None
        streams: dict[int, _Stream] = {}  # output index → stream being written

        def flush() -> None:
            for stream in streams.values():
                stream.flush()

        try:
            while True:
                now = time.monotonic()
                if interrupted_at is None and now > deadline and not self.closing:
                    self.interrupt()
                    interrupted_at = now
                elif interrupted_at is not None and now > interrupted_at + INTERRUPT_GRACE:
                    flush()
                    self.restart()
                    return "timeout", (f"\n[Timed out after {timeout:g}s; the interrupt did not stop the cell, so "
                                       "the kernel was restarted: all variables are lost, re-run the cells you need]")
                if now - last_merge > MERGE_EVERY:
                    flush()
                    last_merge = now
                if now - last_save > SAVE_EVERY:
                    self.file.save(cell)
                    last_save = now
                try:
                    msg = self.kc.iopub_channel.get_msg(timeout=0.05 if replied_at else 0.2)
                except Empty:
                    if replied_at is None and (reply := self._replied(msg_id, cell)) is not None:
                        replied_at = time.monotonic()
                    elif probe is None and replied_at is not None and now - replied_at > IDLE_AFTER_REPLY:
                        probe, probed_at = self.kc.kernel_info(), now
                    elif probe is not None and now - probed_at > PROBE_WAIT:
                        return self._lost(cell, flush)
                    elif not self.km.is_alive():
                        return self._died(cell, flush)
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    if probe is not None and msg["parent_header"].get("msg_id") == probe:
                        return self._lost(cell, flush)
                    self._late_output(msg)
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "status" and content["execution_state"] == "idle":
                    if replied_at is None:
                        reply = self._replied(msg_id, cell, wait=2.0)
                    break
                if kind == "execute_input":
                    cell.execution_count = content["execution_count"]
                elif kind == "clear_output":
                    cell.outputs.clear()
                    streams.clear()
                elif kind == "stream":
                    last = cell.outputs[-1] if cell.outputs else None
                    stream = streams.get(len(cell.outputs) - 1)
                    if stream is None or last.name != content["name"]:  # consecutive writes form one block
                        last = _node(output_type="stream", name=content["name"], text="")
                        cell.outputs.append(last)
                        stream = streams[len(cell.outputs) - 1] = _Stream(last)
                    stream.add(content["text"])
                    if on_output is not None:
                        on_output(content["text"])
                elif kind in ("display_data", "execute_result", "error"):
                    cell.outputs.append(_output(kind, content))
        finally:
            flush()
        if self.closing and interrupted_at is None and any(
                o.output_type == "error" and o.ename == "KeyboardInterrupt" for o in cell.outputs):
            return "interrupted", "\n[Interrupted: the session was shut down while this cell ran]"
        if interrupted_at is not None:
            return "timeout", f"\n[Timed out after {timeout:g}s: the cell was interrupted; the kernel keeps its state]"
        payloads = (reply or {}).get("payload", [])
        for page in (p for p in payloads if p.get("source") == "page"):  # `obj?`: Jupyter shows a pager
            cell.outputs.append(_node(output_type="stream", name="stdout",
                                      text=_ANSI.sub("", page.get("data", {}).get("text/plain", "")) + "\n"))
        if any(p.get("source") == "ask_exit" and not p.get("keepkernel") for p in payloads):
            return "exited", ""  # exit() or quit(): ipykernel stops its process 0.1 s after the reply
        return "ok", ""

    def _late_output(self, msg) -> None:
        """Output a thread of an earlier cell printed after that cell finished: it belongs to that
        cell, as in Jupyter (and is saved with the current one)."""
        cell = self._executed.get(msg["parent_header"].get("msg_id"))
        if cell is None or msg["msg_type"] != "stream" or cell not in self.cells:
            return
        name, text = msg["content"]["name"], msg["content"]["text"]
        last = cell.outputs[-1] if cell.outputs else None
        if last is not None and last.get("output_type") == "stream" and last.get("name") == name:
            last["text"] += text
        else:
            cell.outputs.append(_node(output_type="stream", name=name, text=text))
        if not any(c is cell for c in self._late):
            self._late.append(cell)

    def _lost(self, cell, flush) -> tuple[str, str]:
        flush()
        cell.outputs.append(_node(output_type="stream", name="stderr", text=f"[scribe] {LOST_OUTPUT}\n"))
        return "ok", ""

    def _died(self, cell, flush) -> tuple[str, str]:
        flush()
        if self.closing:
            return "interrupted", "\n[Stopped: the session was shut down while this cell ran]"
        if self.restarting:  # restart_session's doing, not the cell's: restart() starts the new kernel
            return "interrupted", ("\n[Stopped: restart_session gave this session a fresh kernel while this cell "
                                   "ran; variables from earlier cells are gone]")
        cell.outputs.append(_node(
            output_type="error", ename="KernelDied",
            evalue="the kernel died while running this cell (os._exit, a crash, or out of memory)", traceback=[]))
        self.restart()
        return "died", ("\n[The kernel died. A fresh kernel was started: variables from earlier "
                        "cells are gone, re-run the cells you need]")

    def _replied(self, msg_id: str, cell, wait: float = 0.0) -> dict | None:
        """Consume shell replies; this execution's execute_reply content once it has come."""
        while True:
            try:
                msg = self.kc.shell_channel.get_msg(timeout=wait)
            except Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                if cell.execution_count is None:  # its execute_input was lost
                    cell.execution_count = msg["content"].get("execution_count")
                return msg["content"]


def _node(**fields) -> nbformat.NotebookNode:
    """A cell or output as nbformat builds it, without its per-object schema validation (~1 ms
    each, the largest cost of a quick cell); the fields are the v4 schema's own."""
    return nbformat.from_dict(fields)


def _output(kind: str, content: dict):
    if kind == "error":
        return _node(output_type="error", ename=content["ename"], evalue=content["evalue"],
                     traceback=content["traceback"])
    out = _node(output_type=kind, data=content["data"], metadata=content.get("metadata", {}))
    if kind == "execute_result":
        out.execution_count = content["execution_count"]
    return out


def _check_source(text, name: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise SessionError(f"{name} is empty: pass the text of the cell")


def _check_index(index) -> None:
    if type(index) is not int:  # bool is an int subclass: True must not mean cell 1
        raise SessionError(f"cell_index must be a whole number, got {index!r}")


class SessionManager:
    """All live sessions of one server, with their shared settings.

    kernel_env is the whole environment kernels start with (default: this process's).
    runtime is a private folder for kernel sockets and connection files (default: a new temp
    folder); the manager removes what it created there when it shuts down.
    """

    def __init__(self, notebook_dir: str | Path = "notebooks", *, cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT, image_max: int = DEFAULT_IMAGE_MAX,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, kernel_env: dict | None = None,
                 runtime: str | Path | None = None, spare_kernel: bool = False):
        self.notebook_dir = Path(notebook_dir).expanduser().resolve()
        self.notebook_dir.mkdir(parents=True, exist_ok=True)
        self.cell_timeout, self.output_limit, self.image_max = cell_timeout, output_limit, image_max
        self.idle_timeout = idle_timeout
        self.kernel_env = dict(os.environ if kernel_env is None else kernel_env)
        self._own_runtime = runtime is None
        self.runtime = Path(tempfile.mkdtemp(prefix="scribe-kernels-") if runtime is None else runtime)
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._making = threading.Lock()
        # One kernel started ahead of need, so start_new_session does not wait ~0.5 s for one.
        self._spare_wanted = spare_kernel
        self._spare: tuple[str, object, object] | None = None
        self._spare_lock = threading.Lock()
        self._launching = None  # a spare kernel whose process runs but does not answer yet
        self._refill()
        if idle_timeout > 0:
            threading.Thread(target=self._reap_idle, daemon=True).start()

    def env_for(self, session_id: str) -> dict:
        env = dict(self.kernel_env)
        env["SCRIBE_SESSION_ID"] = session_id
        # Cells can `import gpu` and `from techniques import ...` from any notebook folder.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_DIR, env.get("PYTHONPATH")]))
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        return env

    def _refill(self) -> None:
        if self._spare_wanted and self._spare is None and not self._closed.is_set():
            threading.Thread(target=self._start_spare, daemon=True).start()

    def _start_spare(self) -> None:
        if not self._spare_lock.acquire(blocking=False):
            return  # one is being started already
        try:
            session_id = secrets.token_hex(4)
            km, kc = launch_kernel(self.runtime / session_id, self.env_for(session_id),
                                   str(self.notebook_dir), started=self._spare_started, making=self.making)
            with self._lock:
                self._launching = None
                if not self._closed.is_set():
                    self._spare, km = (session_id, km, kc), None
            if km is not None:
                stop_kernel(km, kc)
        except Exception as exc:  # a session then starts its own kernel, and says why if that fails too
            if not self._closed.is_set():  # while shutting down, failing is expected
                print(f"[scribe] spare kernel failed to start: {exc}", file=sys.stderr, flush=True)
        finally:
            self._spare_lock.release()

    @contextlib.contextmanager
    def making(self):
        """Held while a kernel's folder and process are made. shutdown_all waits for it, and none
        is made after: a folder made while the runtime folder is being removed would keep it."""
        with self._making:
            if self._closed.is_set():
                raise SessionError("the server is shutting down: no new kernel starts")
            yield

    def _spare_started(self, km) -> None:
        """A spare kernel's process exists: shutdown_all kills it if it is still starting then
        (else, orphaned, it would find its connection file removed, start over TCP and recreate
        the runtime folder)."""
        with self._lock:
            self._launching = km
            closed = self._closed.is_set()
        if closed:
            kill_kernel(km)

    def _take_spare(self, path: Path):
        """The spare kernel (id, km, kc) if it suits a notebook at `path`; call with self._lock held."""
        spare = self._spare
        if spare is None or path.parent != self.notebook_dir:
            return None
        self._spare = None
        return spare

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            live = ", ".join(sorted(self.sessions)) or "none"
            raise SessionError(f"unknown session_id {session_id!r}; live sessions: {live}. "
                               "Start one with start_new_session.")
        session.last_used = time.monotonic()
        return session

    def start_new(self, experiment_name: str | None = None) -> Session:
        return self._open(self._new_path(experiment_name or "session"), new_notebook())

    def resume(self, notebook_path: str, on_progress=None, stop: Stop | None = None) -> tuple[Session, dict]:
        """Open a notebook in place, start a kernel and re-run its code cells."""
        path = self.resolve(notebook_path)
        session = self._open(path, read_notebook(path))
        return session, self._restore(session, on_progress, stop)

    def continue_(self, notebook_path: str, experiment_name: str | None = None, on_progress=None,
                  stop: Stop | None = None) -> tuple[Session, dict]:
        """Like resume, on a copy; the original file is untouched."""
        source = self.resolve(notebook_path)
        nb = read_notebook(source)
        stem = _slug(experiment_name) if experiment_name else re.sub(r"^\d{4}-\d\d-\d\d-\d\d-\d\d_", "", source.stem)
        session = self._open(self._new_path(f"{stem}_continued", slug=False), nb)
        return session, self._restore(session, on_progress, stop)

    @staticmethod
    def _restore(session: Session, on_progress, stop) -> dict:
        with session.lock:
            summary = session.run_all(on_progress, stop)
        summary["outline"] = outline_text(session.file.nb)
        return summary

    def resolve(self, notebook_path: str, must_exist: bool = True) -> Path:
        """A notebook path inside the notebook dir (symlinks resolved), or a clear error."""
        if not isinstance(notebook_path, str) or not notebook_path.strip():
            raise SessionError("notebook_path is empty")
        try:
            path = Path(notebook_path).expanduser()
            if not path.is_absolute():
                path = self.notebook_dir / path
            path = path.resolve()
            if not path.is_relative_to(self.notebook_dir):
                raise SessionError(f"{notebook_path!r} is outside the notebook directory {self.notebook_dir}; "
                                   "only notebooks inside it can be opened")
            if must_exist and not path.is_file():
                raise SessionError(f"no notebook at {notebook_path!r} (looked for {path})")
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise SessionError(f"cannot open {notebook_path[:200]!r}: {exc.strerror or exc}") from None
        if path.suffix != ".ipynb":
            raise SessionError(f"{notebook_path!r} is not an .ipynb file")
        return path

    def live_session_for(self, path: Path) -> Session | None:
        return next((s for s in list(self.sessions.values()) if s.path == path), None)

    def shutdown(self, session_id: str) -> Path:
        with self._lock:
            session = self.get(session_id)
            del self.sessions[session_id]
        session.shutdown()
        return session.path

    def shutdown_all(self) -> None:
        """Save every notebook and stop every kernel, all at once (Claude Code allows ~0.4 s)."""
        self._closed.set()
        if self._making.acquire(timeout=5):  # a kernel being made now: its process exists once this returns
            self._making.release()
        with self._lock:
            sessions, self.sessions = list(self.sessions.values()), {}
            spare, self._spare = self._spare, None
            launching, self._launching = self._launching, None
        if launching is not None:
            kill_kernel(launching)
        threads = [threading.Thread(target=s.shutdown, args=(0.15,), daemon=True) for s in sessions]
        if spare:
            threads.append(threading.Thread(target=stop_kernel, args=spare[1:], daemon=True))

        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        if self._own_runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _open(self, path: Path, nb) -> Session:
        with self._lock:
            other = self.live_session_for(path)
            if other is not None:
                raise SessionError(f"{path.name} is open in live session {other.id}: keep working there, "
                                   f"or shutdown_session({other.id!r}) first")
            spare = self._take_spare(path)
            session_id = spare[0] if spare else secrets.token_hex(4)
            session = Session(session_id, path, nb, self)
            self.sessions[session_id] = session  # claims the file before the (slow) kernel start
        try:
            with session.lock:  # the idle reaper and shutdown wait for the kernel to be up
                warning = session.file.save()
                if warning:  # no notebook file, no session
                    raise SessionError(warning)
                if spare and spare[1].is_alive() and not _cwd_deleted(spare[1]):
                    session.km, session.kc = spare[1], spare[2]
                else:
                    if spare:
                        stop_kernel(spare[1], spare[2])
                    session.start_kernel()
                session.last_used = time.monotonic()
        except BaseException:
            with self._lock:
                self.sessions.pop(session_id, None)
            raise
        finally:
            self._refill()
        return session

    def _new_path(self, name: str, slug: bool = True) -> Path:
        stamp = datetime.now().strftime("%Y-%m-%d-%H-%M")
        base = f"{stamp}_{_slug(name) if slug else name}"[:NAME_MAX]
        path, n = self.notebook_dir / f"{base}.ipynb", 2
        with self._lock:
            self.notebook_dir.mkdir(parents=True, exist_ok=True)  # someone may have deleted it meanwhile
            while path.exists():
                path, n = self.notebook_dir / f"{base}_{n}.ipynb", n + 1
            path.touch()  # claim the name before another session takes it
        return path

    def _reap_idle(self) -> None:
        while not self._closed.wait(min(30.0, self.idle_timeout)):
            now = time.monotonic()
            for session_id, session in list(self.sessions.items()):
                if now - session.last_used > self.idle_timeout and session.lock.acquire(blocking=False):
                    session.lock.release()  # not running a cell right now
                    with contextlib.suppress(SessionError):
                        self.shutdown(session_id)


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")[:60].strip("-")
    return slug or "session"
