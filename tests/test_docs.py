"""README.md is the front door: its tables must match the code (no model needed)."""

from __future__ import annotations

import re
import subprocess
import sys

import anyio
from conftest import ROOT

import techniques
from scribe_mcp import Scribe, build_parser, build_server, parse_args

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def first_column(text: str) -> str:
    return "\n".join(line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `"))


def test_tool_table_lists_exactly_the_servers_tools(tmp_path):
    documented = set(re.findall(r"^\| `(\w+)\(", section("Tools"), re.M))
    scribe = Scribe(parse_args(["--no-preload", "--notebook-dir", str(tmp_path)]))
    try:
        served = {tool.name for tool in anyio.run(build_server(scribe).list_tools)}
    finally:
        scribe.close()
    assert documented == served


def test_configuration_table_lists_exactly_the_flags():
    documented = set(re.findall(r"--[a-z][a-z-]+", first_column(section("Configuration"))))
    flags = {o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")}
    flags -= {"--help"}
    flags |= {"--no-preload"}  # BooleanOptionalAction: documented as --preload/--no-preload
    assert documented == flags


def test_technique_table_lists_exactly_the_catalog():
    documented = set(re.findall(r"`(\w+)\(", first_column(section("Techniques"))))
    assert documented == {entry["name"] for entry in techniques.catalog()}


def test_help_shows_each_default_once_from_the_parser():
    text = subprocess.run([sys.executable, str(ROOT / "scribe_mcp.py"), "--help"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}).stdout
    flat = " ".join(text.split())
    assert "[SCRIBE_CELL_TIMEOUT, default 600.0]" in flat and "[SCRIBE_OUTPUT_LIMIT, default 8000]" in flat
    assert "[SCRIBE_PORT, default 8765]" in flat
