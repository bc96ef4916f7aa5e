"""Notebook sessions with real kernels and real files (no model needed except where noted)."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, saved

import kernel


def test_new_session_names_file_and_never_overwrites(sessions, nbdir):
    a = sessions.start_new("Logit Lens: France?")
    b = sessions.start_new("Logit Lens: France?")
    assert a.id != b.id and len(a.id) == 8
    assert a.path.parent == nbdir.resolve()
    assert a.path.name.endswith("_logit-lens-france.ipynb")
    same_minute = a.path.name[:16] == b.path.name[:16]
    assert b.path.name.endswith("_logit-lens-france_2.ipynb" if same_minute else "_logit-lens-france.ipynb")
    assert a.path.name[:16].count("-") == 4  # YYYY-MM-DD-HH-MM
    assert saved(a.path).cells == []
    cwd = a.execute("import os, gpu, techniques\nprint(os.getcwd())")
    assert cwd.status == "ok" and cwd.text.strip() == str(nbdir.resolve())


def test_execute_saves_outputs_in_jupyter_format(sessions):
    s = sessions.start_new("outputs")
    r = s.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n40 + 2")
    assert r.status == "ok" and r.cell_index == 0 and r.execution_count == 1
    assert "out\n" in r.text and "err\n" in r.text and "Out[1]: 42" in r.text
    cell = saved(s.path).cells[0]
    kinds = [(o["output_type"], o.get("name")) for o in cell.outputs]
    assert kinds == [("stream", "stdout"), ("stream", "stderr"), ("execute_result", None)]
    assert cell.execution_count == 1 and cell.outputs[2]["data"]["text/plain"] == "42"

    err = s.execute("def f():\n    raise ValueError('bad value')\nf()")
    assert err.status == "error" and err.text.rstrip().endswith("ValueError: bad value")
    assert "\x1b[" not in err.text and "raise ValueError('bad value')" in err.text
    assert saved(s.path).cells[1].outputs[0]["ename"] == "ValueError"


def test_edit_cell_reruns_only_that_cell_and_checks_the_index(sessions):
    s = sessions.start_new("edit")
    s.execute("counter = 0")
    s.execute("counter += 1\ncounter")
    s.add_markdown("# notes")
    r = s.edit_cell("counter += 10\ncounter", cell_index=-1)
    assert r.cell_index == 1 and "Out[3]: 11" in r.text
    r = s.edit_cell("'first'", cell_index=0)
    assert r.cell_index == 0 and "first" in r.text
    nb = saved(s.path)
    assert [c.cell_type for c in nb.cells] == ["code", "code", "markdown"]
    assert nb.cells[1].source == "counter += 10\ncounter" and nb.cells[0].source == "'first'"
    with pytest.raises(kernel.SessionError, match=r"valid indices are 0\.\.2 or -3\.\.-1"):
        s.edit_cell("x", cell_index=5)
    with pytest.raises(kernel.SessionError, match="cell 2 is a markdown cell: edit it with edit_markdown"):
        s.edit_cell("x", cell_index=2)
    with pytest.raises(kernel.SessionError, match="whole number, got True"):
        s.edit_cell("x", cell_index=True)
    with pytest.raises(kernel.SessionError, match="code is empty"):
        s.edit_cell("  \n", cell_index=0)
    assert len(saved(s.path).cells) == 3  # nothing lost


def test_add_markdown_returns_its_index(sessions):
    s = sessions.start_new("md")
    s.execute("1")
    assert s.add_markdown("## Finding\nParis wins.") == 1
    assert saved(s.path).cells[1].source == "## Finding\nParis wins."


def test_images_come_back_downscaled_and_markdown_and_html_read_as_text(nbdir):
    m = kernel.SessionManager(nbdir, image_max=200)
    try:
        s = m.start_new("plots")
        r = s.execute("import matplotlib.pyplot as plt\nplt.figure(figsize=(8, 4))\nplt.plot([1, 3, 2])\nplt.show()")
        assert r.status == "ok" and len(r.images) == 1 and "[image 1]" in r.text
        fmt, data = r.images[0]
        assert fmt == "png" and max(kernel.image_size(fmt, data)) == 200
        full = base64.b64decode(saved(s.path).cells[0].outputs[0]["data"]["image/png"])
        assert max(kernel.image_size("png", full)) > 200  # the notebook keeps the full image
        r = s.execute("from IPython.display import HTML, Markdown, display\n"
                      "display(Markdown('# Result\\n*p* = 0.01'))\n"
                      "display(HTML('<script>var junk = 1;</script><table><tr><td>a &amp; b</td><td>2</td></tr></table>'))\n"
                      "import pandas as pd\npd.DataFrame({'col': [7]}).style")
        assert not r.images and "# Result\n*p* = 0.01\n" in r.text and "[HTML as text] a & b 2\n" in r.text
        assert "junk" not in r.text and "object>" not in r.text and "col" in r.text and "7" in r.text
    finally:
        m.shutdown_all()


def test_question_mark_help_reaches_the_agent_as_text(sessions):
    s = sessions.start_new("help")
    r = s.execute("len?")
    assert r.status == "ok" and r.text.startswith("Signature: len(obj, /)\n") and "\x1b[" not in r.text, r.text
    assert saved(s.path).cells[0].outputs[0]["text"] == r.text


def test_long_output_is_cut_for_the_agent_but_kept_in_the_notebook(nbdir):
    m = kernel.SessionManager(nbdir, output_limit=1000)
    try:
        s = m.start_new("long")
        r = s.execute("print('HEAD'); print('x' * 50000); print('TAIL')")
        assert len(r.text) < 1200 and r.text.startswith("HEAD") and r.text.rstrip().endswith("TAIL")
        assert "characters cut" in r.text
        assert len(saved(s.path).cells[0].outputs[0]["text"]) > 50000
        # A table loses whole rows, and the marker says how many and from which offset to read them.
        rows = "\n".join(f"row {i:>3} | {'value':>20} | {i * i:>8}" for i in range(200))
        table = s.execute(f"print({rows!r})").text
        shown = table.splitlines()
        marker = next(line for line in shown if line.startswith("... ["))
        assert all(re.fullmatch(r"row +\d+ \| +value \| +\d+", line) for line in shown if line != marker), shown
        kept = [int(line.split()[1]) for line in shown if line != marker]
        assert f"[{200 - len(kept)} lines, " in marker and "cut at offset" in marker, marker
    finally:
        m.shutdown_all()


def test_timeout_interrupts_and_keeps_state(sessions):
    s = sessions.start_new("timeout")
    s.execute("kept = 'still here'")
    r = s.execute("import time\nprint('before', flush=True)\nwhile True:\n    time.sleep(0.05)", timeout=1)
    assert r.status == "timeout" and "Timed out after 1s" in r.text and "before" in r.text
    assert "KeyboardInterrupt" in r.text
    assert "still here" in s.execute("kept").text


def test_timeout_that_ignores_the_interrupt_restarts_the_kernel(sessions, monkeypatch):
    monkeypatch.setattr(kernel, "INTERRUPT_GRACE", 1.0)
    s = sessions.start_new("stubborn")
    s.execute("kept = 1")
    code = "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"
    r = s.execute(code, timeout=1)
    assert r.status == "timeout" and "kernel was restarted" in r.text
    assert "NameError" in s.execute("kept").text
    assert len(saved(s.path).cells) == 3


def test_kernel_death_is_reported_and_the_session_recovers(sessions):
    s = sessions.start_new("death")
    s.execute("x = 1")
    r = s.execute("import os\nos._exit(1)")
    assert r.status == "died" and "KernelDied" in r.text and "fresh kernel" in r.text
    assert s.execute("print('alive')").text == "alive\n"
    nb = saved(s.path)
    assert len(nb.cells) == 3 and nb.cells[1].outputs[0]["ename"] == "KernelDied"
    s.restart()
    assert s.execute("1 + 1").status == "ok"


def test_resume_reruns_cells_and_reports_failures(sessions, nbdir):
    s = sessions.start_new("to-resume")
    s.execute("a = 21")
    s.execute("undefined_name")
    s.execute("print(a * 2)")
    s.add_markdown("text")
    path = s.path
    sessions.shutdown(s.id)

    resumed, summary = sessions.resume(path.name)
    assert resumed.path == path
    outline = summary.pop("outline")
    assert summary == {"cells_run": 3, "errors": [{"cell_index": 1, "ename": "NameError",
                                                   "evalue": "name 'undefined_name' is not defined"}]}
    assert outline.splitlines()[1].startswith("  1 code error (") and outline.endswith("3 markdown: text")
    assert resumed.execute("a").text == "Out[4]: 21\n"
    assert len(saved(path).cells) == 5


def test_continue_forks_and_leaves_the_original_untouched(sessions, nbdir):
    s = sessions.start_new("original")
    s.execute("value = 'kept'")
    sessions.shutdown(s.id)
    before = s.path.read_bytes()
    fork, summary = sessions.continue_(str(s.path))
    assert fork.path != s.path and fork.path.name.endswith("_original_continued.ipynb")
    assert summary["cells_run"] == 1 and summary["errors"] == []
    fork.execute("value + '!'")
    assert s.path.read_bytes() == before
    assert len(saved(fork.path).cells) == 2
    named, _ = sessions.continue_(s.path.name, experiment_name="Second try")
    assert named.path.name.endswith("_second-try_continued.ipynb")


def test_paths_must_stay_inside_the_notebook_dir(sessions, nbdir, tmp_path):
    outside = tmp_path / "outside.ipynb"
    nbformat.write(kernel.new_notebook(), outside)
    with pytest.raises(kernel.SessionError, match="outside the notebook directory"):
        sessions.resume(str(outside))
    with pytest.raises(kernel.SessionError, match="outside the notebook directory"):
        sessions.resume("../outside.ipynb")
    (nbdir / "link.ipynb").symlink_to(outside)
    with pytest.raises(kernel.SessionError, match="outside the notebook directory"):
        sessions.resume("link.ipynb")
    with pytest.raises(kernel.SessionError, match="no notebook at"):
        sessions.resume("missing.ipynb")


def test_invalid_notebooks_get_a_clear_error_and_are_untouched(sessions, nbdir):
    bad = nbdir / "broken.ipynb"
    bad.write_text("{not json")
    with pytest.raises(kernel.SessionError, match="not a valid Jupyter notebook"):
        sessions.resume("broken.ipynb")
    assert bad.read_text() == "{not json"
    assert sessions.sessions == {}


def test_unknown_session_lists_live_ones(sessions):
    s = sessions.start_new("live")
    with pytest.raises(kernel.SessionError, match=f"unknown session_id 'nope'; live sessions: {s.id}"):
        sessions.get("nope")


def test_sessions_run_independently_at_once(sessions):
    import threading

    a, b = sessions.start_new("a"), sessions.start_new("b")
    results = {}

    def work(s, name):
        results[name] = s.execute(f"import time\nstart = time.time()\ntime.sleep(1)\n'{name}', start, time.time()").text

    threads = [threading.Thread(target=work, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "'a'" in results["a"] and "'b'" in results["b"]
    (_, a_start, a_end), (_, b_start, b_end) = (eval(results[n].split(": ", 1)[1]) for n in ("a", "b"))
    assert a_start < b_end and b_start < a_end  # in parallel: each ran while the other did


def test_idle_sessions_shut_themselves_down(nbdir):
    m = kernel.SessionManager(nbdir, idle_timeout=0.5)
    try:
        s = m.start_new("idle")
        deadline = time.monotonic() + 10
        while (s.id in m.sessions or s.km is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.id not in m.sessions and s.km is None
        assert saved(s.path).cells == []
    finally:
        m.shutdown_all()


def test_killing_the_owner_mid_write_leaves_a_valid_notebook(tmp_path):
    """kill -9 of the process that writes the notebook, while cells with outputs are being saved."""
    nbdir = tmp_path / "nb"
    script = tmp_path / "writer.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import kernel\n"
        f"m = kernel.SessionManager({str(nbdir)!r})\n"
        "s = m.start_new('crash')\n"
        "print(s.path, flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    s.execute(f\"print('cell {i}' * 2000)\")\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    time.sleep(2.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    nb = saved(path)
    assert len(nb.cells) > 5
    finished = [c for c in nb.cells if c.outputs]
    assert len(finished) >= len(nb.cells) - 1  # every finished cell kept its output
    assert all(c.outputs[0]["text"].startswith(f"cell {i}") for i, c in enumerate(finished))
    m = kernel.SessionManager(nbdir)
    try:
        resumed, _ = m.resume(path.name)  # reopening also clears temp files a killed save left
        assert not list(nbdir.glob(".*.tmp"))
    finally:
        m.shutdown_all()


def test_cell_json_cache_keeps_the_file_identical_to_nbformat(sessions):
    s = sessions.start_new("format")
    s.execute("print('a')")
    s.add_markdown("b")
    s.edit_cell("print('c')", 0)
    assert nbformat.reads(s.path.read_text(), as_version=4) == s.file.nb


def test_long_cells_are_saved_while_they_run(sessions, monkeypatch):
    import threading

    monkeypatch.setattr(kernel, "SAVE_EVERY", 0.5)
    s = sessions.start_new("long-running")
    s.execute("x = 1")
    seen = []

    def watch():
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not seen:
            cells = saved(s.path).cells
            if len(cells) == 2 and "halfway" in "".join(o.get("text", "") for o in cells[1].outputs):
                seen.append(time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    s.execute("import time\nprint('halfway', flush=True)\ntime.sleep(2.5)\nprint('done')")
    watcher.join()
    assert seen and seen[0] - start < 2.4  # on disk before the cell finished


def test_restart_unblocks_a_wedged_cell(sessions):
    import threading

    s = sessions.start_new("wedged")
    results = []
    runner = threading.Thread(target=lambda: results.append(s.execute("import time\ntime.sleep(60)")))
    runner.start()
    time.sleep(1.5)
    s.restart()
    runner.join(30)
    assert not runner.is_alive() and results and results[0].status == "interrupted"
    assert "restart_session gave this session a fresh kernel" in results[0].text
    assert s.execute("'fresh'").text == "Out[1]: 'fresh'\n"


def test_a_spare_kernel_makes_new_sessions_start_at_once(nbdir):
    m = kernel.SessionManager(nbdir, spare_kernel=True)
    try:
        for _ in range(2):
            deadline = time.monotonic() + 20
            while m._spare is None and time.monotonic() < deadline:
                time.sleep(0.05)
            spare_km = m._spare[1]
            s = m.start_new("quick")
            assert s.km is spare_km  # the warm spare was handed out: no kernel start on this path
            r = s.execute("import os\nprint(os.environ['SCRIBE_SESSION_ID'], os.getcwd())")
            assert r.text == f"{s.id} {nbdir.resolve()}\n"
    finally:
        m.shutdown_all()
    assert m._spare is None
