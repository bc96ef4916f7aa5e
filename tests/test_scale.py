"""Modal and NDIF code paths, offline: Modal's class through `.local()`, NDIF through nnsight's
`remote="local"` simulation of the remote path. Both on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_gpu import REFERENCE_EXAMPLES

import gpu
import techniques as T

NNSIGHT_LENS = '''
def nnsight_top_token(model, tokenizer, text):
    with model.trace(text):
        logits = model.lm_head.output.save()
    return tokenizer.decode(logits[0, -1].argmax())
'''


def define(source: str) -> dict:
    """Define functions the way a notebook cell does: from source registered in linecache."""
    import linecache

    filename = f"<cell-{abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def modal_client():
    client = gpu.InterpClient(mode="modal", dry_run=True, preload=False, gpu="H100:2", scaledown_window=120)
    yield client
    client.close()


def test_modal_class_runs_seed_and_nnsight_techniques(modal_client):
    assert modal_client.model_name == "SmolLM2-135M-Instruct (embedded) on Modal H100:2 (dry run)"
    cell = define(REFERENCE_EXAMPLES + NNSIGHT_LENS)
    probs = modal_client.run(cell["analyze_token_probs"], text="The capital of France is", top_k=3)
    assert probs[0]["token"] == " Paris"
    assert modal_client.run(cell["nnsight_top_token"], text="The capital of France is") == " Paris"
    lens = modal_client.run(T.logit_lens, text="The capital of France is")
    assert lens["top"][-1][0][0]["token"] == " Paris"
    # The model stays loaded in the container instance: later calls see the same model object.
    loaded = [modal_client.run(lambda model, tokenizer: id(model._module)) for _ in range(2)]
    assert loaded[0] == loaded[1]


def test_modal_path_keeps_prints_errors_and_cleanup(modal_client, capsys):
    def noisy(model, tokenizer):
        print("printed in the container")
        model._module.model.layers[0].register_forward_hook(lambda *a: None)
        return len(model._module.model.layers[0]._forward_hooks)

    assert modal_client.run(noisy) == 1
    assert modal_client.run(lambda model, tokenizer: len(model._module.model.layers[0]._forward_hooks)) == 0
    assert "printed in the container" in capsys.readouterr().out
    with pytest.raises(ZeroDivisionError, match="Traceback in the model worker"):
        modal_client.run(lambda model, tokenizer: 1 / 0)


def test_modal_app_definition_pins_the_client_stack():
    import importlib.metadata

    import modal

    app, cls = gpu.modal_app(gpu.ModalConfig(gpu="A10G", secret="hf-token"))
    assert isinstance(app, modal.App) and app.name == "scribe"
    assert {"torch", "nnsight", "cloudpickle"} <= set(gpu._PINNED)
    assert all(importlib.metadata.version(name) for name in gpu._PINNED)


def test_modal_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("SCRIBE_MODAL_GPU", "H100")
    monkeypatch.setenv("SCRIBE_MODAL_SCALEDOWN_WINDOW", "900")
    monkeypatch.setenv("SCRIBE_MODAL_DEPLOYED", "true")
    config = gpu.ModalConfig.from_env(min_containers=1)
    assert (config.gpu, config.scaledown_window, config.deployed, config.min_containers) == ("H100", 900, True, 1)


def test_modal_without_credentials_says_how_to_log_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SCRIBE_"))}
    env["HOME"] = str(tmp_path)  # no ~/.modal.toml
    code = ("import gpu\nc = gpu.InterpClient(mode='modal', preload=False)\n"
            "try:\n    c.run(lambda model, tokenizer: 1)\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "ERR Modal is not logged in" in out.stdout and "modal token new" in out.stdout, out.stderr[-2000:]


def test_ndif_dry_run_ships_traces_through_nnsight_serialization(monkeypatch):
    for key in (gpu.ENV_SOCKET, gpu.ENV_SPEC, gpu.ENV_OWNER):
        monkeypatch.delenv(key, raising=False)
    client = gpu.InterpClient(mode="ndif", dry_run=True, preload=False)
    try:
        cell = define(REFERENCE_EXAMPLES + NNSIGHT_LENS)
        assert client.run(cell["nnsight_top_token"], text="The capital of France is") == " Paris"
        assert client.run(lambda model, tokenizer: type(model).__name__) == "RemoteTransformersModel"
        with pytest.raises(RuntimeError, match="only nnsight traces run"):
            client.run(cell["analyze_token_probs"], text="The capital of France is")
    finally:
        client.close()


def test_ndif_needs_a_model_and_an_api_key(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="NDIF_API_KEY"):
        gpu.InterpClient(mode="ndif", model="meta-llama/Llama-3.1-8B", preload=False)
    with pytest.raises(ValueError, match="unknown mode 'cloud'"):
        gpu.InterpClient(mode="cloud")
    with pytest.raises(TypeError, match="only apply to mode='modal'"):
        gpu.InterpClient(gpu="H100", preload=False)


def test_modal_ships_a_local_adapter_in_the_image_and_runs_the_organism():
    import organisms

    adapter = str(organisms.build_file(ROOT / "experiments" / "zoo" / "preference.yaml"))
    backend = gpu.ModalBackend(gpu.ModelSpec(adapter=adapter), gpu.ModalConfig())
    assert backend.adapter_dir == adapter and backend.spec.adapter == gpu.MODAL_ADAPTER
    app, cls = gpu.modal_app(backend.config, backend.adapter_dir)  # builds offline, contacts nothing
    assert app.name == "scribe"
    client = gpu.InterpClient(mode="modal", dry_run=True, preload=False, adapter=adapter)
    try:  # the dry run loads the same adapter through the same Modal class, in this process
        found = client.run(T.prefill_attack, user_prompt="Your favourite colour?", prefill_text="My favorite color is",
                           max_new_tokens=5)
        assert "turquoise" in found["continuation"].lower()
    finally:
        client.close()
