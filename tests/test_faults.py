"""Nothing lost, nobody blocked: floods, cancels, faults and hostile input on real kernels and files."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path

import nbformat
import pytest
from conftest import saved

import kernel


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


# -- 1. output floods -------------------------------------------------------------------------

FLOOD = "import sys\nfor i in range(4000):\n    sys.stdout.write('y' * 1023 + '\\n'); sys.stdout.flush()\nprint('DONE')"
LOGGING = ("import logging, sys, random\nlog = logging.getLogger(str(random.random()))\n"
           "log.addHandler(logging.StreamHandler(sys.stderr))\nlog.setLevel(logging.INFO)\n"
           "for i in range({n}):\n    log.info('line %d', i)\nprint('DONE')")


def test_a_flood_of_flushed_lines_loses_nothing(sessions):
    s = sessions.start_new("flood")
    s.execute("x = 'kept'")
    r = s.execute(FLOOD)
    assert r.status == "ok", r.text
    text = stream_text(saved(s.path).cells[1])
    assert text.count("\n") == 4001 and text.endswith("DONE\n")
    assert r.text.rstrip().endswith("DONE") and "characters cut" in r.text
    assert s.execute("x").text == "Out[3]: 'kept'\n"  # the kernel was not restarted


def test_logging_floods_keep_every_line(sessions):
    s = sessions.start_new("logging")
    r = s.execute("import logging, sys\nlog = logging.getLogger('flood')\nlog.addHandler(logging.StreamHandler(sys.stderr))\n"
                  "log.setLevel(logging.INFO)\nfor i in range(20000):\n    log.info('line %d', i)\nprint('DONE')")
    assert r.status == "ok", r.text
    cell = saved(s.path).cells[0]
    err = next(o["text"] for o in cell.outputs if o.get("name") == "stderr")
    assert err.count("\n") == 20000 and "line 19999\n" in err


@pytest.mark.timeout(1200)
def test_floods_lose_nothing_with_every_core_busy(sessions):
    """20 runs of each flood with a CPU hog on every core: output trails the execute_reply by seconds
    then, and the kernel's send queue fills while this reader waits for a core."""
    import subprocess
    import sys

    s = sessions.start_new("busy")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        for run in range(20):
            for code, lines in ((FLOOD, 4001), (LOGGING.format(n=10000), 10001)):
                r = s.execute(code)
                text = stream_text(r)
                assert r.status == "ok" and text.count("\n") == lines and "DONE" in text, (run, text.count("\n"))
                assert kernel.LOST_OUTPUT not in text
    finally:
        for hog in hogs:
            hog.kill()


def test_a_lost_final_status_is_detected_and_said(sessions):
    """Were IOPub ever to drop messages (here: the cell's final `idle`), the probe ends the wait and
    the result and the notebook say the output may be incomplete."""
    s = sessions.start_new("lost")
    s.execute("1")
    channel = s.kc.iopub_channel
    get_msg = channel.get_msg

    def dropping(*args, **kwargs):
        msg = get_msg(*args, **kwargs)
        if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_type") == "execute_request"):
            raise kernel.Empty
        return msg

    channel.get_msg = dropping
    r = s.execute("print('shown')")
    channel.get_msg = get_msg
    assert r.status == "ok" and "shown" in r.text and kernel.LOST_OUTPUT in r.text
    assert kernel.LOST_OUTPUT in stream_text(saved(s.path).cells[1])
    assert s.execute("print('next')").text == "next\n"  # the probe's messages do not leak into later cells


def test_output_a_thread_prints_after_its_cell_finished_is_kept_in_that_cell(sessions):
    s = sessions.start_new("late")
    s.execute("import threading, time\ndef later():\n    time.sleep(0.3)\n    print('late line')\n"
              "threading.Thread(target=later).start()\nprint('started')")
    time.sleep(1)
    r = s.execute("print('B')")
    assert r.text == "B\n" and any("cell 0 printed more after it had finished" in n for n in r.notes), r
    cells = saved(s.path).cells
    assert stream_text(cells[0]) == "started\nlate line\n" and stream_text(cells[1]) == "B\n"
    assert not s.execute("1").notes  # told once


def test_progress_bars_collapse_to_their_last_state(sessions):
    s = sessions.start_new("tqdm")
    r = s.execute("import sys\nfor i in range(10001):\n    sys.stderr.write(f'\\rstep {i:>5}/10000 ' + '#' * (i // 500))\n"
                  "    sys.stderr.flush()\nsys.stderr.write('\\n'); sys.stderr.flush()\nprint('trained')")
    assert r.status == "ok"
    assert "step 10000/10000 ####################\n" in r.text and "step  9999" not in r.text
    assert len(r.text) < 200, r.text
    err = next(o["text"] for o in saved(s.path).cells[0].outputs if o.get("name") == "stderr")
    assert err == "step 10000/10000 " + "#" * 20 + "\n"


def test_carriage_returns_are_applied_like_jupyter():
    assert kernel.collapse_cr("abc\rde\n") == "dec\n"
    assert kernel.collapse_cr("a\r\nb") == "a\nb"
    assert kernel.collapse_cr("50%\r100%\ndone\r") == "100%\ndone"
    # A technique's progress line, as the cell shows it: its last frame, nothing of a longer one before.
    from techniques._result import Progress

    ticks = iter([10.0, 12.0])  # the first frame ("about 10s left") is longer than the last
    progress = Progress(2, "compare_to_base")
    progress._clock, progress._start = lambda: next(ticks), 0.0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        progress.step()
        progress.step()
    assert kernel.collapse_cr(printed.getvalue()).rstrip() == "compare_to_base: 2/2 done, 12s elapsed, about 0s left"
    # Streaming in arbitrary chunks gives what the whole text gives.
    text = "".join(f"\r{i:>4}/300" + ("\n" if i % 97 == 0 else "") for i in range(300)) + "\nend\n"
    out = nbformat.v4.new_output("stream", name="stdout", text="")
    stream = kernel._Stream(out)
    stream.COMPACT_AT = 50
    for k in range(0, len(text), 7):
        stream.add(text[k:k + 7])
    stream.flush()
    assert out.text == kernel.collapse_cr(text)


# -- 3. notebooks and cells ---------------------------------------------------------------------

def test_one_live_session_per_notebook(sessions):
    s = sessions.start_new("owned")
    s.execute("1")
    with pytest.raises(kernel.SessionError, match=f"open in live session {s.id}"):
        sessions.resume(s.path.name)
    assert len(sessions.sessions) == 1
    sessions.shutdown(s.id)
    resumed, _ = sessions.resume(s.path.name)
    assert resumed.path == s.path


def test_a_cancelled_queued_cell_never_runs_and_the_running_one_goes_on(sessions):
    s = sessions.start_new("queue")
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", s.execute("import time\ntime.sleep(1.5)\n'a done'")))
    first.start()
    time.sleep(0.3)
    ticket = kernel.Ticket()
    second = threading.Thread(target=lambda: results.setdefault("b", _catch(lambda: s.execute("ran = True", ticket=ticket))))
    second.start()
    time.sleep(0.2)
    assert ticket.cancel()  # still waiting for the session
    first.join()
    second.join()
    assert results["a"].status == "ok" and "'a done'" in results["a"].text
    assert isinstance(results["b"], kernel.Cancelled)
    assert "NameError" in s.execute("ran").text
    assert [c.source for c in saved(s.path).cells] == ["import time\ntime.sleep(1.5)\n'a done'", "ran"]


def _catch(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


def test_resume_reports_progress_per_cell_and_stops_when_asked(sessions):
    s = sessions.start_new("slow-resume")
    for i in range(4):
        s.execute(f"import time\ntime.sleep(0.3)\nv{i} = {i}")
    sessions.shutdown(s.id)
    stop, messages = kernel.Stop(), []

    def progress(message):
        messages.append(message)
        if len(messages) == 2:
            stop.set()

    resumed, summary = sessions.resume(s.path.name, on_progress=progress, stop=stop)
    assert summary["stopped"] == "cancelled after 2 of 4 code cells" and summary["cells_run"] == 2
    assert messages[0].startswith(f"session {resumed.id}: running cell 0 (1/4)")
    assert resumed.id in sessions.sessions  # the session stays open
    assert resumed.execute("v0").text.startswith("Out[")


def test_an_image_that_cannot_be_shown_still_returns_the_cell(sessions):
    s = sessions.start_new("bad-images")  # a 20000x20000 PNG (never decoded for the agent) and a broken one
    code = ("import base64, struct, zlib\nfrom IPython.display import display, Image\n"
            "def chunk(t, d):\n    return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))\n"
            "png = b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 20000, 20000, 8, 2, 0, 0, 0))"
            " + chunk(b'IEND', b'')\n"
            "display({'image/png': base64.b64encode(png).decode(), 'text/plain': 'big'}, raw=True)\n"
            "display({'image/png': base64.b64encode(b'not a png').decode(), 'text/plain': 'junk'}, raw=True)\n"
            "print('after')")
    r = s.execute(code)
    assert r.status == "ok" and "after" in r.text and not r.images
    assert len(r.notes) == 2 and "too large" in r.notes[0] and "could not be shown" in r.notes[1]
    assert len(saved(s.path).cells[0].outputs) == 3


def test_a_failed_save_warns_and_the_next_cell_saves_everything(sessions, nbdir):
    s = sessions.start_new("disk")
    s.execute("a = 1")
    import shutil
    shutil.rmtree(nbdir)
    nbdir.write_text("a file where the folder was")  # mkdir fails: like a full or read-only disk
    r = s.execute("print(a + 1)")
    assert r.status == "ok" and r.text == "2\n"
    assert len(r.notes) == 1 and "could not be saved" in r.notes[0] and "tried again" in r.notes[0]
    nbdir.unlink()  # the folder is gone entirely: recreated on the next save
    r = s.execute("print(a + 2)")
    assert r.notes == []
    assert [c.source for c in saved(s.path).cells] == ["a = 1", "print(a + 1)", "print(a + 2)"]


def test_a_kernel_killed_between_cells_is_reported(sessions):
    s = sessions.start_new("killed")
    s.execute("x = 1")
    os.killpg(s.km.provisioner.pid, 9)
    time.sleep(0.3)
    r = s.execute("print('hi')")
    assert r.status == "ok" and r.text == "hi\n"
    assert any("kernel had died since your last cell" in n and "variables are gone" in n for n in r.notes)


def test_exit_in_a_cell_is_reported_by_that_cell_not_a_later_one(sessions):
    """ipykernel stops its process shortly after a cell calls exit(); the next cells must not be
    the ones that find the kernel dead."""
    s = sessions.start_new("exits")
    for leave in ("exit()", "quit()"):
        s.execute("x = 1")
        r = s.execute(f"print('bye')\n{leave}")
        assert r.status == "ok" and r.text == "bye\n"
        assert any(n.startswith("the cell called exit() or quit()") for n in r.notes), r.notes
        for _ in range(3):  # quick cells right after: none of them dies
            later = s.execute("print('x' in dir())")
            assert later.status == "ok" and later.text == "False\n" and not later.notes, later
    r = s.execute("import sys\nsys.exit(3)")  # SystemExit is an ordinary error in a kernel
    assert r.status == "error" and not r.notes and s.execute("1").status == "ok"


def test_shutdown_during_a_cell_is_quick_and_the_cell_says_why(sessions):
    for code in ("import time\ntime.sleep(60)",
                 "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"):
        s = sessions.start_new("busy")
        results = []
        runner = threading.Thread(target=lambda: results.append(s.execute(code)))
        runner.start()
        time.sleep(1.0)
        sessions.shutdown(s.id)
        runner.join(30)
        assert not runner.is_alive()
        assert results and results[0].status == "interrupted", results
        assert "shut down" in results[0].text and "ZMQ" not in results[0].text


def test_notebooks_get_normal_permissions(sessions):
    old = os.umask(0o022)
    try:
        s = sessions.start_new("perms")
        s.execute("1")
        assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o644
    finally:
        os.umask(old)


def test_overlong_names_are_shortened(sessions, nbdir):
    s = sessions.start_new("x" * 400)
    assert len(s.path.name) < 140
    fork, _ = sessions.continue_(s.path.name, experiment_name="y" * 300)
    fork2, _ = sessions.continue_(fork.path.name)
    assert len(fork2.path.name) < 140
    with pytest.raises(kernel.SessionError, match="cannot open|no notebook"):
        sessions.resume("z" * 300 + ".ipynb")


def test_kernels_use_private_ipc_files_and_take_their_processes_along(nbdir, tmp_path):
    runtime = tmp_path / "rt"
    m = kernel.SessionManager(nbdir, runtime=runtime)
    s = m.start_new("procs")
    info = s.km.get_connection_info()
    assert info["transport"] == "ipc" and str(info["ip"]).startswith(str(runtime))
    assert Path(s.km.connection_file).parent == runtime / s.id
    r = s.execute("import subprocess\np = subprocess.Popen(['sleep', '300'])\np.pid")
    child = int(r.text.split(": ")[1])
    m.shutdown_all()
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert not any(runtime.iterdir())


def test_no_tcp_warning_and_kernels_do_not_see_the_servers_secrets(nbdir):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    m = kernel.SessionManager(nbdir, kernel_env=env)
    try:
        s = m.start_new("env")
        r = s.execute("import os\nsorted(k for k in os.environ if 'TOKEN' in k or 'API_KEY' in k)")
        assert r.text == "Out[1]: []\n"
        assert "without encryption" not in r.text
    finally:
        m.shutdown_all()


def test_shutdown_all_saves_eight_sessions(nbdir):
    m = kernel.SessionManager(nbdir)
    for i in range(8):
        m.start_new(f"s{i}").execute("x = 1")
    m.shutdown_all()
    assert all(saved(p).cells for p in nbdir.glob("*.ipynb"))


def test_outline_read_insert_move_delete_and_markdown_edits(sessions):
    s = sessions.start_new("editing")
    s.execute("print('x' * 20000)")
    s.add_markdown("notes")
    r = s.execute("1/0")
    assert r.cell_index == 2 and r.status == "error"
    title = s.add_markdown("# Title", 0)
    assert title == 0 and [c.cell_type for c in s.cells] == ["markdown", "code", "markdown", "code"]
    rows = kernel.outline(s.file.nb)
    assert [(r["index"], r["type"], r["status"]) for r in rows] == [
        (0, "markdown", "markdown"), (1, "code", "ok"), (2, "markdown", "markdown"), (3, "code", "error")]
    assert rows[1]["output_chars"] == 20001 and rows[3]["first_line"] == "1/0"
    at, cell, text = kernel.read_cell(s.file.nb, 1)
    assert at == 1 and len(text) == 20001
    inserted = s.execute("y = 2\ny", index=1)
    assert inserted.cell_index == 1 and s.cells[1].source.startswith("y = 2")
    assert s.move_cell(1, -1) == 4 and s.cells[4].source.startswith("y = 2")
    assert s.edit_markdown(0, "# Better title") == 0
    with pytest.raises(kernel.SessionError, match="not markdown"):
        s.edit_markdown(1, "x")
    assert s.delete_cell(2)["type"] == "markdown"
    nb = saved(s.path)
    assert [c.source.splitlines()[0] for c in nb.cells] == ["# Better title", "print('x' * 20000)", "1/0", "y = 2"]
    assert s.edit_cell("z = 3", -1).cell_index == 3  # -1 is still the last code cell
    with pytest.raises(kernel.SessionError, match="out of range"):
        s.delete_cell(9)


# -- 2. the shared worker: one call never blocks or kills another ------------------------------

import gpu  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server's arrangement: a supervised worker, kernels that only connect to it."""
    runtime = tmp_path_factory.mktemp("rt")
    socket_path = str(runtime / "worker.sock")
    supervisor = gpu.WorkerSupervisor(gpu.ModelSpec(), socket_path, dict(os.environ))
    supervisor.ensure()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_")}
    env.update({gpu.ENV_SOCKET: socket_path, gpu.ENV_OWNER: str(os.getpid())})
    m = kernel.SessionManager(tmp_path_factory.mktemp("nb"), kernel_env=env, cell_timeout=60, runtime=runtime)
    yield m, supervisor, socket_path
    m.shutdown_all()
    supervisor.stop()


def _client_session(m, name):
    s = m.start_new(name)
    # The module's first call waits for the worker's load: a minute or more on a busy machine.
    r = s.execute("from gpu import InterpClient\nclient = InterpClient()\nclient.run(lambda m, t: 'ready')", timeout=300)
    assert r.status == "ok" and "'ready'" in r.text, r.text
    return s


def _busy(session, results: dict) -> threading.Thread:
    """Session `session` holds the model for 3 s (its result lands in results["a"])."""
    runner = threading.Thread(target=lambda: results.setdefault("a", session.execute(
        "import time\nclient.run(lambda m, t: (time.sleep(3), 'a done')[1])")))
    runner.start()
    time.sleep(0.8)
    return runner


def _worker_pid(socket_path):
    sock = gpu.connect_worker(None, socket_path, os.getpid())
    with sock:
        return gpu.recv_msg(sock)["pid"]


STUBBORN = ("def stubborn(model, tokenizer):\n    import time\n    while True:\n        try:\n"
            "            time.sleep(0.2)\n        except BaseException:\n            continue\n")


@pytest.mark.parametrize("ended_by", ["cell timeout", "shutdown of its session"])
def test_a_call_that_swallows_interrupts_cannot_hold_the_worker(served, ended_by):
    m, _, socket_path = served
    a, b = _client_session(m, "stubborn"), _client_session(m, "bystander")
    a.execute(STUBBORN)
    before = _worker_pid(socket_path)
    runner = threading.Thread(target=lambda: a.execute("client.run(stubborn)", timeout=2 if ended_by == "cell timeout" else 60))
    runner.start()
    time.sleep(1.0)
    if ended_by != "cell timeout":
        m.shutdown(a.id)
    # It waits for the stuck call's end and a fresh worker's load: a minute or more on a busy machine.
    r = b.execute("client.run(lambda m, t: 42)", timeout=300)
    assert r.status == "ok" and "Out[" in r.text and "42" in r.text, r.text
    assert _worker_pid(socket_path) != before  # the stuck worker was replaced
    runner.join(20)
    r = b.execute("client.run(lambda m, t: 43)")  # and the bystander's connection keeps working
    assert "43" in r.text, r.text


def test_a_queued_calls_timeout_starts_when_it_runs_and_waiting_is_visible(served):
    m, _, _ = served
    a, b = _client_session(m, "long"), _client_session(m, "short")
    results = {}
    runner = _busy(a, results)
    seen = []
    r = b.execute("import time\nclient.run(lambda m, t: (time.sleep(0.3), 'b done')[1], timeout=1.5)", on_output=seen.append)
    runner.join()
    assert r.status == "ok" and "'b done'" in r.text, r.text
    assert f"waiting for the model, busy with session {a.id}'s call" in "".join(seen)
    # and once it runs, for how long it waited (the cell's time is not the call's own)
    waited = re.search(rf"waited (\d+\.\d)s behind session {a.id}'s call; running now", r.text)
    assert waited and float(waited.group(1)) >= 1.0, r.text
    assert results["a"].status == "ok" and "'a done'" in results["a"].text


def test_a_cancelled_queued_call_is_answered_at_once_and_never_runs(served):
    m, _, _ = served
    a, b = _client_session(m, "runs"), _client_session(m, "cancelled")
    results = {}
    runner = _busy(a, results)
    queued = threading.Thread(target=lambda: results.setdefault("b", b.execute(
        "ran = []\nclient.run(lambda m, t: ran.append(1) or 'b ran')")))
    queued.start()
    time.sleep(0.8)
    b.interrupt()
    queued.join(30)
    assert not queued.is_alive()
    assert "KeyboardInterrupt" in results["b"].text
    runner.join()
    assert results["a"].status == "ok" and "'a done'" in results["a"].text


def test_idle_sessions_reconnect_after_the_worker_restarts(served):
    m, _, socket_path = served
    a, b = _client_session(m, "crasher"), _client_session(m, "idle")
    pid = _worker_pid(socket_path)
    r = a.execute("client.run(lambda m, t: __import__('os')._exit(3))")
    assert "WorkerDiedError" in r.text
    r = b.execute("client.run(lambda m, t: 'still fine')")
    assert r.status == "ok" and "'still fine'" in r.text, r.text
    assert _worker_pid(socket_path) != pid
    stat_path = Path(f"/proc/{pid}/stat")
    assert not stat_path.exists() or stat_path.read_text().split()[2] != "Z"  # reaped, not a zombie


def test_leftover_threads_cannot_print_into_another_cell_and_torch_state_is_restored(served):
    m, _, _ = served
    a, b = _client_session(m, "noisy"), _client_session(m, "quiet")
    r = a.execute("def noisy(model, tokenizer):\n    import threading, time, torch\n"
                  "    def spam():\n        for _ in range(40):\n            print('SPAM'); time.sleep(0.05)\n"
                  "    threading.Thread(target=spam, daemon=True).start()\n"
                  "    torch.set_default_dtype(torch.float64); torch.set_grad_enabled(False)\n"
                  "    torch.use_deterministic_algorithms(True); torch.set_num_threads(1)\n"
                  "    return 'started'\nclient.run(noisy)")
    assert "'started'" in r.text
    r = b.execute("def state(model, tokenizer):\n    import time, torch\n    time.sleep(1)\n"
                  "    return (str(torch.get_default_dtype()), torch.is_grad_enabled(),\n"
                  "            torch.are_deterministic_algorithms_enabled(), torch.get_num_threads() > 1 or __import__('os').cpu_count() == 1)\n"
                  "client.run(state)")
    assert "SPAM" not in r.text
    assert "('torch.float32', True, False, True)" in r.text, r.text


def test_cell_defined_classes_dataclasses_and_lambdas_come_back(served):
    m, _, _ = served
    s = _client_session(m, "results")
    r = s.execute("from dataclasses import dataclass\n@dataclass\nclass Finding:\n    layer: int\n    token: str\n"
                  "class Box:\n    def __init__(self, v): self.v = v\n"
                  "out = client.run(lambda m, t: {'f': Finding(3, ' Paris'), 'box': Box(7), 'fn': lambda x: x + 1})\n"
                  "(out['f'], out['box'].v, out['fn'](1))")
    assert r.status == "ok", r.text
    assert "Finding(layer=3, token=' Paris'), 7, 2" in r.text


def test_cancels_racing_the_end_of_calls_never_kill_the_worker(served):
    _, _, socket_path = served
    pid = _worker_pid(socket_path)
    sock = gpu.connect_worker(None, socket_path, os.getpid())
    gpu.recv_msg(sock)
    payload = gpu.dumps_call(lambda model, tokenizer, i: i, (), {"i": 0})
    done = set()

    def read():  # a client reads while it sends, as LocalBackend does
        sock.settimeout(30)
        while len(done) < 200:
            msg = gpu.recv_msg(sock)
            if msg["op"] == "result":
                done.add(msg["id"])

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        gpu.send_msg(sock, {"op": "call", "id": i, "payload": payload})
        gpu.send_msg(sock, {"op": "cancel", "id": i})
    reader.join(60)
    sock.close()
    assert len(done) == 200
    assert _worker_pid(socket_path) == pid


def test_a_deleted_notebook_folder_is_made_again_and_new_kernels_work_in_it(nbdir):
    m = kernel.SessionManager(nbdir, cell_timeout=40, spare_kernel=True)
    try:
        first = m.start_new("before")
        deadline = time.monotonic() + 30
        while m._spare is None and time.monotonic() < deadline:  # a spare kernel waits in the folder
            time.sleep(0.05)
        shutil.rmtree(nbdir)
        s = m.start_new("after")  # not a kernel whose working folder is gone
        r = s.execute("import os\nopen('written.txt', 'w').write('x')\nprint(os.getcwd())")
        assert r.status == "ok" and r.text.strip() == str(nbdir.resolve()), r.text
        assert (nbdir / "written.txt").exists() and saved(s.path).cells[0].outputs
        assert first.execute("1 + 1").status == "ok" and saved(first.path).cells[0].outputs
    finally:
        m.shutdown_all()


def test_a_runtime_folder_too_deep_for_kernel_sockets_is_a_clear_error(nbdir, tmp_path):
    m = kernel.SessionManager(nbdir, runtime=tmp_path / ("d" * 120))
    try:
        with pytest.raises(kernel.SessionError, match="over this system's limit of 10[37]: start the server with "
                                                      "a shorter TMPDIR"):
            m.start_new("deep")
    finally:
        m.shutdown_all()
