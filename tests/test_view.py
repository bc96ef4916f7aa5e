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
            assert fetch(f"{base}/?token=wrong") == 401 and fetch(f"{base}/?token={TOKEN}", "POST") == 405
            assert fetch(f"{base}/notebook/deadbeef.ipynb?token={TOKEN}") == 404
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
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
    assert max(latencies) < 1.0, latencies
    texts = found["texts"]
    assert "hello from the agent" in texts[0] and "A finding" in texts[1] and "step 5" in texts[3]
    assert found["heading"] == "A finding" and found["highlighted"] > 3 and found["link"] == 1


def test_the_view_is_off_unless_asked(tmp_path):
    port = free_port()

    async def scenario():
        async with scribe(tmp_path / "nb", "--no-preload", "--view-port", str(port)):
            return fetch(f"http://127.0.0.1:{port}/")

    assert anyio.run(scenario) is None


def test_many_viewers_do_not_slow_the_agent(tmp_path):
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
    assert watched < 2 * alone + 0.01, (alone, watched)
