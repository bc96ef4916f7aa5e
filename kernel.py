"""Notebook sessions: one real ipykernel plus one .ipynb file on disk per session.

The MCP layer only translates tool calls into `SessionManager` / `Session` calls; this module
owns the kernels' and notebooks' whole life. It knows nothing about models: the MCP server
passes environment variables (`kernel_env`) that let code in the kernel find the model worker.

What the agent reads (`CellResult.text`, `.images`) is kept apart from what is saved (the
cell's outputs in Jupyter's own format), so truncation and downscaling never touch the file.
"""

from __future__ import annotations

import base64
import contextlib
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
from jupyter_client import KernelManager

DEFAULT_CELL_TIMEOUT = 600.0
DEFAULT_OUTPUT_LIMIT = 8000
DEFAULT_IMAGE_MAX = 1024
DEFAULT_IDLE_TIMEOUT = 4 * 3600.0
# How long a timed-out cell gets to honour the interrupt before the kernel is restarted.
INTERRUPT_GRACE = 5.0
# While a long cell runs, its outputs so far are saved this often.
SAVE_EVERY = 2.0

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROJECT_DIR = str(Path(__file__).resolve().parent)


class SessionError(Exception):
    """A request that cannot be served; the message says what was wrong and what to do."""


@dataclass
class CellResult:
    """One executed cell: outputs as saved, plus the compact view an agent reads."""

    cell_index: int  # among code cells
    execution_count: int | None
    outputs: list
    status: str  # "ok", "error", "timeout", "died"
    text: str = ""
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (format, data)


# ---------------------------------------------------------------------------
# Rendering: what the agent sees
# ---------------------------------------------------------------------------


def render(outputs: list, output_limit: int = DEFAULT_OUTPUT_LIMIT,
           image_max: int = DEFAULT_IMAGE_MAX) -> tuple[str, list[tuple[str, bytes]]]:
    """Outputs → (text, images). Text over the limit keeps its head and tail."""
    parts, images = [], []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            parts.append(out["text"])
        elif kind == "error":
            tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
            parts.append(f"{out['ename']}: {out['evalue']}\n{tb}\n")
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            image = next((m for m in ("image/png", "image/jpeg") if m in data), None)
            if image:
                images.append(downscale(image.split("/")[1], base64.b64decode(data[image]), image_max))
                parts.append(f"[image {len(images)}]\n")
            elif "text/plain" in data:
                prefix = f"Out[{out['execution_count']}]: " if kind == "execute_result" else ""
                parts.append(f"{prefix}{data['text/plain']}\n")
    return truncate("".join(parts), output_limit), images


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n... [{cut} characters cut; the full output is in the notebook] ...\n{tail}"


def image_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header without decoding the image."""
    if fmt == "png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def downscale(fmt: str, data: bytes, image_max: int) -> tuple[str, bytes]:
    size = image_size(fmt, data)
    if size is not None and max(size) <= image_max:
        return fmt, data
    import io

    from PIL import Image  # only for images that need it: PIL costs ~50 ms to import

    img = Image.open(io.BytesIO(data))
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

    def save(self, changed=None) -> None:
        """Write the file; `changed` is a cell edited since the last save (its cached JSON is stale)."""
        if changed is not None:
            self._cell_json.pop(id(changed), None)
        cells = []
        for cell in self.nb.cells:
            text = self._cell_json.get(id(cell))
            if text is None:
                text = self._cell_json[id(cell)] = json.dumps(cell, sort_keys=True, indent=1, ensure_ascii=False)
            cells.append(text)
        head = {k: v for k, v in self.nb.items() if k != "cells"}
        body = json.dumps(head, sort_keys=True, indent=1, ensure_ascii=False)
        text = body[:-1].rstrip() + ',\n "cells": [\n' + ",\n".join(cells) + "\n ]\n}\n"
        # Crash-safe: a reader (or a crash) sees the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        live = {id(c) for c in self.nb.cells}
        if len(self._cell_json) > len(live):  # forget cells that were removed
            self._cell_json = {k: v for k, v in self._cell_json.items() if k in live}


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------


class Session:
    """One kernel and one notebook. Calls on a session are serialized by its lock."""

    def __init__(self, session_id: str, path: Path, nb: nbformat.NotebookNode, manager: SessionManager):
        self.id, self.manager = session_id, manager
        self.file = NotebookFile(path, nb)
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        self.restored: dict | None = None  # resume/continue: what re-running the cells gave
        self.km: KernelManager | None = None
        self.kc = None
        self._runtime = Path(tempfile.mkdtemp(prefix=f"scribe-kernel-{session_id}-"))

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def code_cells(self) -> list:
        return [c for c in self.file.nb.cells if c.cell_type == "code"]

    # -- kernel life ------------------------------------------------------

    def start_kernel(self) -> None:
        env = dict(os.environ)
        env.update(self.manager.kernel_env)
        # Cells can `import gpu` and `from techniques import ...` from any notebook folder.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_DIR, env.get("PYTHONPATH")]))
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        km = KernelManager(transport="ipc")
        km.ip = str(self._runtime / "kernel")  # ipc sockets go here, not in the server's cwd
        km.start_kernel(cwd=str(self.path.parent), env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
        except RuntimeError as exc:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise SessionError(f"the kernel did not start: {exc}") from None
        self.km, self.kc = km, kc

    def stop_kernel(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # already dead: nothing left to stop
                pass
            self.km.cleanup_resources()
        self.km = self.kc = None

    def restart(self) -> None:
        """A fresh kernel on the same notebook; every cell stays on disk.

        If a cell is running, its kernel is killed first: the cell reports the death and lets go.
        """
        if not self.lock.acquire(timeout=0.1):
            # KernelManager is not thread-safe: kill the process and let the cell's thread notice.
            pid = getattr(getattr(self.km, "provisioner", None), "pid", None)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.lock.acquire()
        try:
            self.stop_kernel()
            self.start_kernel()
        finally:
            self.lock.release()

    def interrupt(self) -> None:
        if self.km is not None:
            self.km.interrupt_kernel()

    def shutdown(self, wait: float = 10.0) -> None:
        """Final save, kernel stopped. A cell still running after `wait` seconds is cut off."""
        owned = self.lock.acquire(timeout=wait)
        try:
            self.file.save()
            self.stop_kernel()
            shutil.rmtree(self._runtime, ignore_errors=True)
        finally:
            if owned:
                self.lock.release()

    # -- cells ----------------------------------------------------------

    def execute(self, code: str, timeout: float | None = None, on_output=None) -> CellResult:
        """Append a code cell, run it, save, and return its result."""
        if not isinstance(code, str) or not code.strip():
            raise SessionError("code is empty: pass the Python source to run")
        with self.lock:
            cell = nbformat.v4.new_code_cell(code)
            self.file.nb.cells.append(cell)
            # Saved when it finishes, or after SAVE_EVERY seconds if it is still running: one
            # write per quick cell keeps cell 500 as cheap as cell 1.
            return self._run(cell, len(self.code_cells) - 1, timeout, on_output)

    def edit_cell(self, code: str, cell_index: int = -1, timeout: float | None = None, on_output=None) -> CellResult:
        """Replace a code cell's source (index among code cells, negative from the end) and re-run it."""
        with self.lock:
            cells = self.code_cells
            if not cells:
                raise SessionError("this notebook has no code cells yet: use execute_code first")
            if not isinstance(cell_index, int) or not -len(cells) <= cell_index < len(cells):
                raise SessionError(
                    f"cell_index {cell_index!r} is out of range: this notebook has {len(cells)} code "
                    f"cells, valid indices are 0..{len(cells) - 1} or -{len(cells)}..-1"
                )
            cell = cells[cell_index]
            cell.source = code
            return self._run(cell, cell_index % len(cells), timeout, on_output)

    def add_markdown(self, content: str) -> int:
        """Append a markdown cell; returns its index among all cells."""
        with self.lock:
            self.file.nb.cells.append(nbformat.v4.new_markdown_cell(content))
            self.file.save()
            self.last_used = time.monotonic()
            return len(self.file.nb.cells) - 1

    def run_all(self) -> dict:
        """Re-run every code cell in order, past errors; a summary of what failed."""
        failures, cells = [], self.code_cells
        for index, cell in enumerate(cells):
            result = self._run(cell, index, None, None)
            if result.status != "ok":
                err = next((o for o in result.outputs if o.get("output_type") == "error"), None)
                failures.append({"cell_index": index, "ename": err["ename"] if err else result.status,
                                 "evalue": err["evalue"] if err else ""})
        return {"cells_run": len(cells), "errors": failures}

    def _run(self, cell, index: int, timeout: float | None, on_output) -> CellResult:
        if self.km is None or not self.km.is_alive():
            self.restart()
        timeout = self.manager.cell_timeout if timeout is None else timeout
        cell.outputs, cell.execution_count = [], None
        msg_id = self.kc.execute(cell.source, allow_stdin=False, stop_on_error=False)
        status, note = self._collect(cell, msg_id, timeout, on_output)
        self.file.save(changed=cell)
        self.last_used = time.monotonic()
        text, images = render(cell.outputs, self.manager.output_limit, self.manager.image_max)
        if status == "ok" and any(o.output_type == "error" for o in cell.outputs):
            status = "error"
        return CellResult(index, cell.execution_count, cell.outputs, status, text + note, images)

    def _collect(self, cell, msg_id: str, timeout: float, on_output) -> tuple[str, str]:
        """Read the kernel's messages for one execution into the cell until it is idle."""
        deadline = time.monotonic() + timeout
        last_save = time.monotonic()
        interrupted_at = None
        while True:
            now = time.monotonic()
            if interrupted_at is None and now > deadline:
                self.km.interrupt_kernel()
                interrupted_at = now
            elif interrupted_at is not None and now > interrupted_at + INTERRUPT_GRACE:
                self.restart()
                return "timeout", (f"\n[Timed out after {timeout:g}s; the interrupt did not stop the cell, so the "
                                   "kernel was restarted: all variables are lost, re-run the cells you need]")
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except Empty:
                if not self.km.is_alive():
                    cell.outputs.append(nbformat.v4.new_output(
                        "error", ename="KernelDied",
                        evalue="the kernel died while running this cell (os._exit, a crash, or out of memory)",
                        traceback=[]))
                    self.restart()
                    return "died", ("\n[The kernel died. A fresh kernel was started: variables from earlier "
                                    "cells are gone, re-run the cells you need]")
                if now - last_save > SAVE_EVERY:
                    self.file.save(changed=cell)
                    last_save = now
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                self._drain_shell(msg_id)
                if interrupted_at is not None:
                    return "timeout", f"\n[Timed out after {timeout:g}s: the cell was interrupted; the kernel keeps its state]"
                return "ok", ""
            if kind == "execute_input":
                cell.execution_count = content["execution_count"]
            elif kind == "clear_output":
                cell.outputs.clear()
            elif kind in ("stream", "display_data", "execute_result", "error"):
                self._add_output(cell, kind, content)
                if on_output is not None and kind == "stream":
                    on_output(content["text"])

    @staticmethod
    def _add_output(cell, kind: str, content: dict) -> None:
        outputs = cell.outputs
        if kind == "stream":
            if outputs and outputs[-1].output_type == "stream" and outputs[-1].name == content["name"]:
                outputs[-1].text += content["text"]  # Jupyter shows consecutive writes as one block
            else:
                outputs.append(nbformat.v4.new_output("stream", name=content["name"], text=content["text"]))
        elif kind == "error":
            outputs.append(nbformat.v4.new_output("error", ename=content["ename"], evalue=content["evalue"],
                                                  traceback=content["traceback"]))
        else:
            out = nbformat.v4.new_output(kind, data=content["data"], metadata=content.get("metadata", {}))
            if kind == "execute_result":
                out.execution_count = content["execution_count"]
            outputs.append(out)

    def _drain_shell(self, msg_id: str) -> None:
        while True:
            try:
                if self.kc.get_shell_msg(timeout=2)["parent_header"].get("msg_id") == msg_id:
                    return
            except Empty:
                return


class SessionManager:
    """All live sessions of one server, with their shared settings."""

    def __init__(self, notebook_dir: str | Path = "notebooks", *, cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT, image_max: int = DEFAULT_IMAGE_MAX,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, kernel_env: dict | None = None):
        self.notebook_dir = Path(notebook_dir).expanduser().resolve()
        self.notebook_dir.mkdir(parents=True, exist_ok=True)
        self.cell_timeout, self.output_limit, self.image_max = cell_timeout, output_limit, image_max
        self.idle_timeout = idle_timeout
        self.kernel_env = dict(kernel_env or {})
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if idle_timeout > 0:
            threading.Thread(target=self._reap_idle, daemon=True).start()

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            live = ", ".join(sorted(self.sessions)) or "none"
            raise SessionError(f"unknown session_id {session_id!r}; live sessions: {live}. "
                               "Start one with start_new_session.")
        session.last_used = time.monotonic()
        return session

    def start_new(self, experiment_name: str | None = None) -> Session:
        return self._open(self._new_path(experiment_name or "session"), new_notebook(), run=False)

    def resume(self, notebook_path: str) -> tuple[Session, dict]:
        """Open a notebook in place, start a kernel and re-run its code cells."""
        path = self.resolve(notebook_path)
        session = self._open(path, read_notebook(path), run=True)
        return session, session.restored

    def continue_(self, notebook_path: str, experiment_name: str | None = None) -> tuple[Session, dict]:
        """Like resume, on a copy; the original file is untouched."""
        source = self.resolve(notebook_path)
        nb = read_notebook(source)
        stem = _slug(experiment_name) if experiment_name else re.sub(r"^\d{4}-\d\d-\d\d-\d\d-\d\d_", "", source.stem)
        session = self._open(self._new_path(f"{stem}_continued", slug=False), nb, run=True)
        return session, session.restored

    def resolve(self, notebook_path: str) -> Path:
        """A notebook path inside the notebook dir (symlinks resolved), or a clear error."""
        if not isinstance(notebook_path, str) or not notebook_path.strip():
            raise SessionError("notebook_path is empty")
        path = Path(notebook_path).expanduser()
        if not path.is_absolute():
            path = self.notebook_dir / path
        path = path.resolve()
        if not path.is_relative_to(self.notebook_dir):
            raise SessionError(f"{notebook_path!r} is outside the notebook directory {self.notebook_dir}; "
                               "only notebooks inside it can be opened")
        if not path.is_file():
            raise SessionError(f"no notebook at {notebook_path!r} (looked for {path})")
        if path.suffix != ".ipynb":
            raise SessionError(f"{notebook_path!r} is not an .ipynb file")
        return path

    def shutdown(self, session_id: str) -> Path:
        with self._lock:
            session = self.get(session_id)
            del self.sessions[session_id]
        session.shutdown()
        return session.path

    def shutdown_all(self) -> None:
        self._closed.set()
        for session in list(self.sessions.values()):  # running cells end now, not at their timeout
            with contextlib.suppress(Exception):
                session.interrupt()
        for session_id in list(self.sessions):
            with contextlib.suppress(SessionError):
                self.shutdown(session_id)

    def _open(self, path: Path, nb, run: bool) -> Session:
        session_id = secrets.token_hex(4)
        session = Session(session_id, path, nb, self)
        session.file.save()
        session.start_kernel()
        with self._lock:
            self.sessions[session_id] = session
        if run:
            with session.lock:
                session.restored = session.run_all()
        return session

    def _new_path(self, name: str, slug: bool = True) -> Path:
        stamp = datetime.now().strftime("%Y-%m-%d-%H-%M")
        base = f"{stamp}_{_slug(name) if slug else name}"
        path, n = self.notebook_dir / f"{base}.ipynb", 2
        with self._lock:
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
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-")
    return slug or "session"
