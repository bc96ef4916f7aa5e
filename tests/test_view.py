"""The live view in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request

import anyio
from test_mcp import call, free_port, scribe, server_env

from scribe_mcp import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "view-token-123"


def fetch(url: str, method: str = "GET") -> int | None:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return None  # nothing listens there


def test_the_live_view_shows_cells_as_the_agent_writes_them(tmp_path):
    from playwright.async_api import async_playwright

    assert shutil.which("chromium"), "Chromium is not installed: run ./setup.sh --test"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**server_env(), "SCRIBE_VIEW_TOKEN": TOKEN}
    shot = tmp_path / "live-view.png"
    latencies: list[float] = []

    async def scenario():
        async with connect("--notebook-dir", str(tmp_path / "nb"), "--no-preload", "--view", "--view-port",
                           str(port), env=env) as s, async_playwright() as p:
            await call(s, "list_sessions")  # answered once the server is up (the handshake comes earlier)
            assert fetch(f"{base}/?token=wrong") == 401 and fetch(f"{base}/?token={TOKEN}", "POST") == 405
            assert fetch(f"{base}/notebook/deadbeef.ipynb?token={TOKEN}") == 404
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            # Playwright evaluates its wait conditions with eval, which the page's policy forbids.
            page = await browser.new_page(viewport={"width": 1100, "height": 900}, bypass_csp=True)
            await page.goto(f"{base}/?token={TOKEN}")
            sid = (await call(s, "start_new_session", experiment_name="watched")).structured_content["session_id"]
            steps = [
                ("execute_code", {"code": "message = 'hello from the agent'\nprint(message)"}, "hello from the agent"),
                ("add_markdown", {"content": "## A finding\nThe plot *rises*."}, "A finding"),
                ("execute_code", {"code": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"}, "img"),
            ]
            for n, (tool, args, marker) in enumerate(steps, start=1):
                await call(s, tool, session_id=sid, **args)
                done = time.monotonic()
                check = (f"document.querySelectorAll('#notebook .cell').length >= {n} && "
                         + ("document.querySelector('#notebook img') !== null" if marker == "img"
                            else f"document.body.innerText.includes({marker!r})"))
                await page.wait_for_function(check, timeout=5000)
                latencies.append(time.monotonic() - done)
            async with anyio.create_task_group() as tg:  # a running cell shows with its latest output
                tg.start_soon(lambda: call(s, "execute_code", session_id=sid, code=(
                    "import time\nfor i in range(6):\n    print('step', i, flush=True)\n    time.sleep(0.5)")))
                await page.wait_for_function("document.querySelector('.cell.running') !== null && "
                                             "document.querySelector('.cell.running').innerText.includes('step 1')",
                                             timeout=5000)
            await page.wait_for_function("document.querySelector('.cell.running') === null && "
                                         "document.body.innerText.includes('step 5')", timeout=5000)
            await page.screenshot(path=str(shot), full_page=True)
            cells = page.locator("#notebook .cell")
            texts = [await cells.nth(i).inner_text() for i in range(await cells.count())]
            found = {"texts": texts, "heading": await page.locator("#notebook .cell.md h2").inner_text(),
                     "highlighted": await page.locator("#notebook .src span").count(),
                     "link": await page.locator(f"a[href^='/notebook/{sid}.ipynb']").count()}
            await browser.close()
            return found

    found = anyio.run(scenario)
    print(f"view: cells appeared {', '.join(f'{x * 1000:.0f} ms' for x in latencies)} after their tool call returned")
    assert shot.stat().st_size > 10_000
    texts = found["texts"]
    assert "hello from the agent" in texts[0] and "A finding" in texts[1] and "step 5" in texts[3]
    assert found["heading"] == "A finding" and found["highlighted"] > 3 and found["link"] == 1


def test_the_view_is_off_unless_asked(tmp_path):
    port = free_port()

    async def scenario():
        async with scribe(tmp_path / "nb", "--no-preload", "--view-port", str(port)) as s:
            await call(s, "list_sessions")  # the server is up, and still nothing listens there
            return fetch(f"http://127.0.0.1:{port}/")

    assert anyio.run(scenario) is None


def test_many_viewers_all_get_the_update(tmp_path):
    """Fifty open event streams: every one gets the update, and a quick cell stays quick."""
    import socket
    import statistics
    import threading

    port = free_port()
    env = {**server_env(), "SCRIBE_VIEW_TOKEN": TOKEN}

    def viewer(seen: list):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(f"GET /events?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while b"ready_marker" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            seen.append(True)

    async def timed_cells(s, sid, n=15):
        out = []
        for _ in range(n):
            start = time.monotonic()
            await call(s, "execute_code", session_id=sid, code="1+1")
            out.append(time.monotonic() - start)
        return statistics.median(out)

    async def scenario():
        async with connect("--notebook-dir", str(tmp_path / "nb"), "--no-preload", "--view", "--view-port",
                           str(port), env=env) as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            alone = await timed_cells(s, sid)
            seen: list = []
            threads = [threading.Thread(target=viewer, args=(seen,), daemon=True) for _ in range(50)]
            for t in threads:
                t.start()
            await anyio.sleep(1.0)
            watched = await timed_cells(s, sid)
            await call(s, "execute_code", session_id=sid, code="'ready_marker'")
            for t in threads:
                await anyio.to_thread.run_sync(t.join, 10)
            return alone, watched, len(seen)

    alone, watched, reached = anyio.run(scenario)
    assert reached == 50
    print(f"view: a quick cell took {alone * 1000:.1f} ms alone, {watched * 1000:.1f} ms with 50 viewers")


HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'


def test_the_view_runs_no_script_from_names_markdown_or_outputs(tmp_path):
    """An agent controls notebook names, markdown and outputs: in Chromium none of it runs as script,
    and all of it shows as text. The page's policy forbids inline script and eval."""
    from playwright.async_api import async_playwright

    assert shutil.which("chromium"), "Chromium is not installed: run ./setup.sh --test"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**server_env(), "SCRIBE_VIEW_TOKEN": TOKEN}
    cells = [
        f"import nbformat\nnbformat.write(nbformat.v4.new_notebook(), {HOSTILE + '.ipynb'!r})",
        f"print({HOSTILE!r})",
        f"from IPython.display import HTML, display\ndisplay(HTML({HOSTILE!r}))",
        f"raise ValueError({HOSTILE!r})",
    ]
    markdown = f"{HOSTILE}\n\n<script>document.body.dataset.pwned=2</script>\n\n[link](javascript:document.body.dataset.pwned=3)"

    async def scenario():
        async with connect("--notebook-dir", str(tmp_path / "nb"), "--no-preload", "--view", "--view-port",
                           str(port), env=env) as s, async_playwright() as p:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            for code in cells:
                await s.call_tool("execute_code", {"session_id": sid, "code": code})
            await call(s, "add_markdown", session_id=sid, content=markdown)
            resumed = await s.call_tool("start_session_resume_notebook", {"notebook_path": HOSTILE + ".ipynb"})
            assert not resumed.is_error, resumed.content[0].text
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page()
            response = await page.goto(f"{base}/?token={TOKEN}")
            policy = response.headers.get("content-security-policy", "")
            await page.locator("nav button").nth(1).wait_for()
            for tab in (1, 0):  # the session of the hostile name, then the one with the hostile cells
                await page.locator("nav button").nth(tab).click()
                await page.locator("#notebook a").wait_for()
                await page.wait_for_timeout(300)  # let an injected image fail to load, were there one
                seen = await page.evaluate("({pwned: document.body.dataset.pwned || null, "
                                           "imgs: document.querySelectorAll('#notebook img').length, "
                                           "text: document.body.innerText})")
                assert seen["pwned"] is None and seen["imgs"] == 0, seen
                assert HOSTILE in seen["text"], seen["text"][:2000]
            await browser.close()
            return policy

    policy = anyio.run(scenario)
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert "unsafe-eval" not in policy


def test_a_taken_view_port_stops_the_server_and_a_deleted_notebook_is_a_404(tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, str(ROOT / "scribe_mcp.py"), "--no-preload", "--view", "--view-port",
                              str(port), "--notebook-dir", str(tmp_path / "nb")], env=server_env(),
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"scribe: the live view cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another with --view-port"], run.stderr

    port = free_port()

    async def scenario():
        async with connect("--notebook-dir", str(tmp_path / "nb"), "--no-preload", "--view", "--view-port",
                           str(port), env={**server_env(), "SCRIBE_VIEW_TOKEN": TOKEN}) as s:
            info = (await call(s, "start_new_session")).structured_content
            url = f"http://127.0.0.1:{port}/notebook/{info['session_id']}.ipynb?token={TOKEN}"
            before = fetch(url)
            __import__("os").remove(info["notebook_path"])
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as exc:
                return before, exc.code, exc.read().decode()

    before, status, body = anyio.run(scenario)
    assert before == 200 and status == 404 and "gone from disk" in body
