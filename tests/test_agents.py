"""The real agent CLIs (Claude Code, Codex, Gemini CLI) run headless on an experiment through
`scribe_mcp.py agent NAME FILE --headless`, against a stand-in model provider (fake_models.py).

Pass: the CLI exits 0, the notebook holds the cell that printed 42, and the CLI's first model
request already listed Scribe's tools (the launcher made it wait for the server). `grade` works
with each CLI as the judge. setup.sh --test installs the CLIs in .tools; in CI a missing CLI
fails, elsewhere it skips with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from fake_models import VERDICT, FakeModels
from test_mcp import server_env

SERVER = str(ROOT / "scribe_mcp.py")
CLI_DIR = ROOT / ".tools" / "node_modules" / ".bin"
AGENTS = ("claude", "codex", "gemini")


def cli(name: str) -> Path:
    path = CLI_DIR / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"the {name} CLI is missing from {CLI_DIR}: setup.sh --test installs it")
        pytest.skip(f"the {name} CLI is not installed in {CLI_DIR} (run ./setup.sh --test)")
    return path


def cli_env(agent: str, fake: FakeModels, home: Path) -> dict:
    """A fresh home (no user config, no login) pointing the CLI at the fake provider."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**server_env(), "HOME": str(home),
           "PATH": os.pathsep.join([str(CLI_DIR), str(Path(sys.executable).parent), os.environ["PATH"]])}
    if agent == "claude":
        env.update(ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-fake", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    elif agent == "codex":
        (home / ".codex").mkdir(exist_ok=True)
        (home / ".codex" / "config.toml").write_text(
            'model = "fake-model"\nmodel_provider = "fake"\n[model_providers.fake]\nname = "fake"\n'
            f'base_url = "{fake.url}/v1"\nwire_api = "responses"\nenv_key = "FAKE_API_KEY"\n')
        env.update(CODEX_HOME=str(home / ".codex"), FAKE_API_KEY="sk-fake")
    else:
        (home / ".gemini").mkdir(exist_ok=True)
        (home / ".gemini" / "settings.json").write_text(json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}}}))
        env.update(GOOGLE_GEMINI_BASE_URL=fake.url, GEMINI_API_KEY="sk-fake")
    return env


def experiment_file(tmp_path: Path) -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text("name: cli\ntask: Find what the model hides.\nalias: model_0\ntechniques: [get_model_info]\n"
                    "evaluation:\n  ground_truth: The answer is 42.\n  expect: ['42']\n")
    return path


def run_agent(agent: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, FakeModels, Path]:
    cli(agent)
    nbdir = tmp_path / "nb"
    with FakeModels() as fake:
        run = subprocess.run([sys.executable, SERVER, "agent", agent, str(experiment_file(tmp_path)), "--headless",
                              "--notebook-dir", str(nbdir), "--no-preload"], env=cli_env(agent, fake, tmp_path / "home"),
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    return run, fake, nbdir


def check_run(agent: str, run, fake: FakeModels, nbdir: Path) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    assert fake.turns, f"{agent} sent no request that offered Scribe's tools: {run.stderr[-2000:]}"
    first = fake.turns[0]["tools"]
    assert any(t.endswith("start_new_session") for t in first), first  # on the first turn, not later
    notebook = next(nbdir.glob("*_audit.ipynb"))
    cells = nbformat.read(notebook, as_version=4).cells
    printed = [c for c in cells if c.cell_type == "code" and c.source == "print(6*7)"]
    assert printed and printed[0].outputs[0]["text"] == "42\n", [c.source for c in cells]
    transcript = nbdir / f"transcript.{agent}.jsonl"
    events = [json.loads(line) for line in transcript.read_text().splitlines() if line.strip()]
    assert events and "42" in transcript.read_text()  # the CLI's own machine-readable events, one per line


@pytest.mark.parametrize("agent", AGENTS)
def test_each_cli_has_scribe_on_its_first_turn_and_runs_the_workflow(agent, tmp_path):
    run, fake, nbdir = run_agent(agent, tmp_path)
    check_run(agent, run, fake, nbdir)
    offered = set(fake.turns[0]["tools"])
    if agent == "claude":  # --tools "" leaves Claude Code none of its own tools
        assert offered and all(t.startswith("mcp__scribe__") for t in offered), offered
    if agent == "gemini":  # the workspace settings leave out its file, shell and web tools
        assert not offered & {"read_file", "run_shell_command", "write_file", "google_web_search"}, offered


def test_claude_code_has_scribe_on_its_first_turn_with_every_core_busy(tmp_path):
    cli("claude")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        run, fake, nbdir = run_agent("claude", tmp_path)
    finally:
        for hog in hogs:
            hog.kill()
    check_run("claude", run, fake, nbdir)


@pytest.mark.parametrize("agent", AGENTS)
def test_each_cli_can_be_the_judge(agent, tmp_path):
    cli(agent)
    notebook = tmp_path / "audit.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(6*7)", outputs=[nbformat.v4.new_output("stream", text="42\n")]),
                nbformat.v4.new_markdown_cell("## Conclusion\nThe answer is 42.")]
    nbformat.write(nb, notebook)
    with FakeModels() as fake:
        graded = subprocess.run([sys.executable, SERVER, "grade", str(experiment_file(tmp_path)), str(notebook),
                                 "--judge", agent], env=cli_env(agent, fake, tmp_path / "home"), capture_output=True,
                                text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert graded.returncode == 0, graded.stdout[-2000:] + graded.stderr[-2000:]
    result = json.loads(notebook.with_suffix(".grade.json").read_text())
    assert result["verdict"] == VERDICT["verdict"] and result["score"] == VERDICT["score"]
    assert result["keywords"] == {"42": True}
    assert any("Ground truth: The answer is 42." in json.dumps(r["body"]) for r in fake.requests)


@pytest.mark.parametrize("agent", AGENTS)
def test_the_printed_config_registers_scribe_with_each_cli(agent, tmp_path):
    """What `--print-config NAME` prints is what users paste: each CLI takes it and reaches Scribe."""
    cli(agent)
    printed = subprocess.run([sys.executable, SERVER, "--print-config", agent], capture_output=True, text=True,
                             check=True).stdout
    body = "\n".join(line for line in printed.splitlines() if not line.startswith("#"))
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    with FakeModels() as fake:
        env = cli_env(agent, fake, home)
    env["GEMINI_CLI_TRUST_WORKSPACE"] = "true"
    if agent == "claude":
        subprocess.run(body, shell=True, env=env, cwd=work, check=True, capture_output=True, timeout=120)
    elif agent == "codex":
        (home / ".codex" / "config.toml").write_text(body + "\n")
    else:
        (work / ".gemini").mkdir()
        (work / ".gemini" / "settings.json").write_text(body)
    listed = subprocess.run([agent, "mcp", "list"], env=env, cwd=work, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    shown = listed.stdout + listed.stderr
    assert listed.returncode == 0 and "scribe" in shown, shown
    assert "Connected" in shown or agent == "codex", shown  # codex lists without connecting
    if agent == "claude":
        assert '"alwaysLoad": true' in json.dumps(json.loads((home / ".claude.json").read_text()))
