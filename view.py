"""A live, read-only web view of the agent's notebooks, for a projector or a room of laptops.

    python scribe_mcp.py --view          # http://127.0.0.1:8766/?token=... (printed on stderr)

One poller watches the live sessions (4 times a second) and renders each cell to HTML once per
change: markdown with markdown-it (raw HTML off), code with Pygments, text, images, errors; HTML
outputs from cells show as their text. Every viewer gets the same pushed updates over
Server-Sent Events, so a hundred viewers cost what one does. The page has no external
resources (it works offline) and runs no code from notebooks: names and outputs are inserted as
text or escaped HTML, and a Content-Security-Policy lets the page run its own /app.js only. Only live sessions' notebooks
are shown, so never a file outside the notebook directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import re
import secrets
import threading
import time

from kernel import SessionManager, cell_status, collapse_cr, error_text

POLL_EVERY = 0.25


def render_cell(cell, running: bool) -> str:
    """One cell as HTML. Everything from the notebook is escaped or rendered without raw HTML."""
    from markdown_it import MarkdownIt
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    if cell.cell_type == "markdown":
        body = MarkdownIt("commonmark", {"html": False}).render(cell.source)
        return f'<div class="cell md">{body}</div>'
    count = cell.get("execution_count")
    status = "running" if running else cell_status(cell)
    parts = [f'<div class="cell code {status}"><div class="prompt">In [{count if count is not None else " "}]'
             f'{" · running" if running else ""}</div>',
             highlight(cell.source, PythonLexer(), HtmlFormatter(nowrap=False, cssclass="src"))]
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            cls = "stderr" if out.get("name") == "stderr" else "stdout"
            parts.append(f'<pre class="{cls}">{html.escape(collapse_cr(out.get("text", ""))[-20000:])}</pre>')
        elif kind == "error":
            parts.append(f'<pre class="error">{html.escape(error_text(out)[-20000:])}</pre>')
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            image = next((m for m in ("image/png", "image/jpeg") if m in data), None)
            if image:
                raw = data[image] if isinstance(data[image], str) else "".join(data[image])
                parts.append(f'<img alt="plot" src="data:{image};base64,{html.escape(raw.strip())}">')
            elif "text/plain" in data:
                parts.append(f'<pre class="result">{html.escape(str(data["text/plain"])[-20000:])}</pre>')
    parts.append("</div>")
    return "".join(parts)


class LiveView:
    """The shared state every viewer sees; rendering happens here, once per cell change."""

    def __init__(self, sessions: SessionManager, token: str):
        self.sessions, self.token = sessions, token
        self.rendered: dict[str, str] = {}  # cell key -> html
        self.state: dict = {"sessions": []}
        self.version = 0
        self._changed: asyncio.Condition | None = None

    def _key(self, session, cell) -> str:
        """Changes whenever what the cell shows changes; cheap for saved cells (their JSON is cached)."""
        text = session.file.cached_json(cell)
        if text is None:  # changed since the last save (e.g. running): digest what it shows now
            text = json.dumps([cell.source, cell.get("execution_count"), cell.get("outputs", [])], default=str)
        return hashlib.sha1(f"{cell.get('id')}:{text}".encode()).hexdigest()[:16]

    def snapshot(self) -> tuple[dict, dict[str, str]]:
        """The view of every live session, and the HTML of cells not rendered before."""
        fresh, listed = {}, []
        for session in list(self.sessions.sessions.values()):
            keys = []
            for cell in list(session.cells):
                is_running = cell is session.running_cell
                key = self._key(session, cell) + ("r" if is_running else "")
                if key not in self.rendered and key not in fresh:
                    fresh[key] = render_cell(cell, is_running)
                keys.append(key)
            listed.append({"id": session.id, "name": session.path.name, "cells": keys})
        return {"sessions": listed}, fresh

    async def poll(self) -> None:
        self._changed = asyncio.Condition()
        while True:
            state, fresh = await asyncio.to_thread(self.snapshot)
            if state != self.state or fresh:
                self.rendered.update(fresh)
                live = {k for s in state["sessions"] for k in s["cells"]}
                self.rendered = {k: v for k, v in self.rendered.items() if k in live}
                self.state, self.version = state, self.version + 1
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(POLL_EVERY)

    async def wait(self, seen: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
        return self.version

    def authorized(self, scope) -> bool:
        query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
        headers = dict(scope.get("headers", []))
        given = query.get("token") or headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                asyncio.get_running_loop().create_task(self.poll())
                await send({"type": "lifespan.startup.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "GET":
            return await _respond(send, 405, b"read-only\n")
        path = scope["path"]
        if path == "/app.js":  # the page's code: no data in it, and the only script the page may run
            return await _respond(send, 200, SCRIPT.encode(), b"text/javascript; charset=utf-8")
        if not self.authorized(scope):
            return await _respond(send, 401, b"missing or wrong token: open the URL printed at start-up\n")
        if path == "/":
            return await _respond(send, 200, PAGE.encode(), b"text/html; charset=utf-8")
        if path == "/events":
            return await self.events(send)
        match = re.fullmatch(r"/notebook/([0-9a-f]{8})\.ipynb", path)
        session = self.sessions.sessions.get(match[1]) if match else None
        if session is None:
            return await _respond(send, 404, b"no such live session\n")
        try:
            return await _respond(send, 200, session.path.read_bytes(), b"application/x-ipynb+json")
        except OSError:
            return await _respond(send, 404, b"this session's notebook file is gone from disk (deleted or moved)\n")

    async def events(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
        seen, known = -1, set()
        while True:
            if self.version == seen:
                seen = await self.wait(seen)
            else:
                seen = self.version
            state, rendered = self.state, self.rendered
            new = {k: rendered[k] for s in state["sessions"] for k in s["cells"] if k not in known and k in rendered}
            known |= set(new)
            data = json.dumps({**state, "html": new})
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})


# Notebooks hold what the agent wrote: names, outputs and markdown are escaped when rendered, and
# should anything slip through, the browser still runs no script but /app.js and no eval.
CSP = (b"default-src 'none'; script-src 'self'; connect-src 'self'; img-src data:; style-src 'unsafe-inline'; "
       b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def _respond(send, status: int, body: bytes, kind: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", kind), (b"content-security-policy", CSP), (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})


class ViewError(RuntimeError):
    """The view cannot serve where it was asked to (e.g. its port is taken)."""


def serve(sessions: SessionManager, host: str, port: int, token: str | None = None) -> tuple[str, threading.Thread]:
    """Start the view in a background thread; returns its URL (with the token) and the thread.

    The port is bound here, before anything is printed: a port another process holds is an
    error, never a URL with the token that points at someone else's server."""
    import socket

    import uvicorn

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ViewError(f"the live view cannot listen on {host}:{port}: {exc.strerror or exc}; "
                        "choose another with --view-port") from None
    token = token or secrets.token_urlsafe(16)
    view = LiveView(sessions, token)
    server = uvicorn.Server(uvicorn.Config(view, log_level="critical", lifespan="on"))
    server.install_signal_handlers = lambda: None  # the MCP server owns the signals
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"http://{host}:{port}/?token={token}", thread


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Scribe live view</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#2b3a4a;color:#fff;padding:.6em 1em}header a{color:#cde}
nav{padding:.5em 1em}nav button{margin-right:.4em;padding:.3em .7em;border:1px solid #999;background:#fff;cursor:pointer}
nav button.on{background:#2b3a4a;color:#fff}
main{max-width:1000px;margin:0 auto;padding:0 1em 4em}
.cell{background:#fff;border:1px solid #ddd;border-radius:4px;margin:.7em 0;padding:.5em .8em}
.cell.md{background:transparent;border:none}
.cell.running{border-color:#e0a000;box-shadow:0 0 0 2px #ffe08a}
.cell.error{border-left:4px solid #c33}
.prompt{color:#888;font:12px monospace}
pre{white-space:pre-wrap;word-break:break-word;margin:.3em 0;font:13px/1.35 monospace}
.src pre{background:#f4f6f8;padding:.4em}.stderr{background:#fff4f0}.error{background:#fdecec;color:#900}
img{max-width:100%}
.k,.kn,.kd{color:#0550ae;font-weight:bold}.s,.s1,.s2{color:#0a3069}.c,.c1{color:#6e7781;font-style:italic}
.mi,.mf{color:#0550ae}.nf,.nc{color:#8250df}.o{color:#cf222e}
</style></head><body>
<header><b>Scribe</b> — live notebooks (read-only) <span id="status">connecting…</span></header>
<nav id="tabs"></nav><main id="notebook"><p>No live session yet.</p></main>
<script src="/app.js"></script></body></html>
"""

SCRIPT = """\
const token = new URLSearchParams(location.search).get("token");
const html = {}; let state = {sessions: []}; let current = null;
function draw() {
  const tabs = document.getElementById("tabs"); tabs.textContent = "";
  for (const s of state.sessions) {
    const b = document.createElement("button"); b.textContent = s.name; b.className = s.id === current ? "on" : "";
    b.onclick = () => { current = s.id; draw(); }; tabs.appendChild(b);
  }
  const s = state.sessions.find(x => x.id === current) || state.sessions[state.sessions.length - 1];
  const main = document.getElementById("notebook");
  main.textContent = "";
  const p = document.createElement("p"); main.appendChild(p);
  if (!s) { p.textContent = "No live session yet."; return; }
  current = s.id;
  // Names come from the file system (an agent can choose them): text only, never markup.
  const a = document.createElement("a"); a.textContent = s.name;
  a.href = `/notebook/${encodeURIComponent(s.id)}.ipynb?token=${encodeURIComponent(token)}`; p.appendChild(a);
  // Cells are rendered on the server with everything from the notebook escaped.
  const cells = document.createElement("div"); cells.innerHTML = s.cells.map(k => html[k] || "").join("");
  main.appendChild(cells);
}
const events = new EventSource(`/events?token=${encodeURIComponent(token)}`);
events.onopen = () => document.getElementById("status").textContent = "· live";
events.onerror = () => document.getElementById("status").textContent = "· reconnecting…";
events.onmessage = e => { const m = JSON.parse(e.data); Object.assign(html, m.html); state = m; draw(); };
"""
