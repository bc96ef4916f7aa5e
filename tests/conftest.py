"""Shared fixtures: one real model worker for the whole run, real kernels, real files."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu  # noqa: E402
import kernel  # noqa: E402

SETUP = "from gpu import InterpClient\nclient = InterpClient()\n"


@pytest.fixture(scope="session")
def worker_env():
    """Start the shared worker once (embedded model) and point every kernel and client at it."""
    socket_path = os.path.join(tempfile.mkdtemp(prefix="scribe-test-"), "worker.sock")
    env = {gpu.ENV_SOCKET: socket_path, gpu.ENV_SPEC: gpu.ModelSpec().to_json(), gpu.ENV_OWNER: str(os.getpid())}
    os.environ.update(env)
    gpu.connect_worker(gpu.ModelSpec(), socket_path, os.getpid()).close()
    yield env
    gpu.stop_worker(socket_path)


@pytest.fixture(scope="session")
def client(worker_env):
    c = gpu.InterpClient()
    yield c
    c.close()


@pytest.fixture
def manager(worker_env, tmp_path):
    m = kernel.SessionManager(tmp_path / "notebooks", kernel_env=worker_env, cell_timeout=120)
    yield m
    m.shutdown_all()


@pytest.fixture(scope="module")
def kernel_session(worker_env, tmp_path_factory):
    """One kernel with `client` created, shared by a module's tests."""
    m = kernel.SessionManager(tmp_path_factory.mktemp("nb"), kernel_env=worker_env, cell_timeout=120)
    s = m.start_new("shared")
    result = s.execute(SETUP)
    assert result.status == "ok", result.text
    yield s
    m.shutdown_all()


def rebuilt_twice(code: str, tmp_path: Path) -> list[dict]:
    """Run a build script twice in fresh processes that stand for two machines: one core and two
    (torch's default thread count), other hash seeds; `code` saves a dict of tensors to sys.argv[1]."""
    import subprocess

    import torch

    found = []
    for threads in (1, 2):
        path = tmp_path / f"rebuilt-{threads}.pt"
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600,
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(threads), "OMP_NUM_THREADS": str(threads)})
        assert out.returncode == 0, out.stderr[-3000:]
        found.append(torch.load(path))
    assert found[0].keys() == found[1].keys() and len(found[0]) > 0
    return found


def run_ok(session, code: str) -> str:
    """Execute code in a kernel, fail the test with the cell's output if it errored."""
    result = session.execute(code)
    assert result.status == "ok", result.text
    return result.text


@pytest.fixture
def nbdir(tmp_path):
    return tmp_path / "notebooks"


@pytest.fixture
def sessions(nbdir):
    """Sessions without the model worker (plain kernels)."""
    m = kernel.SessionManager(nbdir, cell_timeout=40)
    yield m
    m.shutdown_all()


def saved(path: Path) -> nbformat.NotebookNode:
    """A notebook as it is on disk, validated."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb
