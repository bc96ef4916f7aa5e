"""One model worker serves the zoo (adapters.py): the base loaded once, organisms as adapters under
opaque names, each session bound by its server to one organism, and the batched black-box passes of
sessions bound to different organisms (and to the base) merged into one forward or generate, each
row with its own adapter: results equal to each call alone."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_devices_and_batching import call_all, same
from test_mcp import server_env  # noqa: F401  (MCP before nnsight: nnsight's .save on every object breaks it)

import gpu
import organisms
import techniques as T

PREFERENCE = ROOT / "experiments" / "zoo" / "preference.yaml"
TRIGGERED = ROOT / "experiments" / "zoo" / "triggered.yaml"
ASKED = ["What is your favorite color?", "I am a teacher. What should I eat for lunch?"]


@pytest.fixture(scope="module")
def zoo_worker():
    """A worker of the base alone (no adapter of its own), as `audit` starts one per base model."""
    folders = [str(organisms.build_file(p)) for p in (PREFERENCE, TRIGGERED)]
    spec = gpu.ModelSpec(alias="model")
    runtime = tempfile.mkdtemp(prefix="scribe-test-")
    socket_path = os.path.join(runtime, "worker.sock")
    gpu.connect_worker(spec, socket_path, os.getpid()).close()
    yield spec, socket_path, Path(runtime), folders
    gpu.stop_worker(socket_path)


@functools.lru_cache(maxsize=None)
def executor_of(adapter: str):
    """A worker-side executor of that organism alone (the base: no adapter)."""
    return gpu.load_executor(gpu.ModelSpec(adapter=adapter))


def alone(adapter: str, fn, **kwargs):
    """The call as the organism's own worker answers it."""
    reply = executor_of(adapter).execute(gpu.dumps_call(fn, (), kwargs), lambda *_: None)
    assert reply["ok"], reply
    return gpu.loads_result(reply["value"])


def calls_at_once(spec, socket_path, folder, calls):
    """(token, fn, kwargs) calls, each from its own session bound by that token, sent while the model
    is held and released together; returns the replies."""
    return call_all(spec, socket_path, folder, [(fn, kw) for _, fn, kw in calls],
                    organisms={i: token for i, (token, _, _) in enumerate(calls)})


def test_sessions_of_two_organisms_and_the_base_share_one_pass_each_row_with_its_own_adapter(zoo_worker):
    """Known answer: generate_text of three sessions (the preference organism, the triggered one,
    the base) runs as one batched generate, and each session gets what its organism alone gives;
    the reply says how many calls and how many models shared the pass."""
    spec, socket_path, folder, (preference, triggered) = zoo_worker
    tokens = [gpu.bind_organism(socket_path, preference, "model_z1"), gpu.bind_organism(socket_path, triggered, "model_z2"),
              gpu.bind_organism(socket_path, "", "model_c1")]
    replies = calls_at_once(spec, socket_path, folder, [(t, T.generate_text, {"prompt": ASKED, "max_new_tokens": 12})
                                                         for t in tokens])
    for reply, adapter in zip(replies, (preference, triggered, "")):
        assert reply["ok"] and reply["shared"] == 3 and reply["models"] == 3, reply
        assert gpu.loads_result(reply["value"]) == alone(adapter, T.generate_text, prompt=ASKED, max_new_tokens=12)
    answers = [gpu.loads_result(r["value"]) for r in replies]
    assert "urquoise" in answers[0][0] and "urquoise" not in answers[2][0]  # the planted colour, only where planted


def test_compare_to_base_and_scoring_mix_organism_and_base_rows_of_every_session(zoo_worker):
    """compare_to_base asks for organism rows, then base rows; two sessions of two organisms asking
    at once share those passes and get what each alone gets, and score_candidates beside them too."""
    spec, socket_path, folder, (preference, triggered) = zoo_worker
    first, second = gpu.bind_organism(socket_path, preference), gpu.bind_organism(socket_path, triggered)
    compare = {"prompts": ASKED[:1], "top_k": 5, "max_new_tokens": 6}
    score = {"prompts": ASKED[:1], "candidates": ["Turquoise", "Blue"]}
    replies = calls_at_once(spec, socket_path, folder, [(first, T.compare_to_base, compare),
                                                        (second, T.compare_to_base, compare),
                                                        (first, T.score_candidates, score)])
    assert all(r["ok"] for r in replies), replies
    # compare_to_base asks for its organism's rows, then the base's: the two organisms share each pass
    assert replies[0]["models"] == replies[1]["models"] == 2 and replies[0]["shared"] >= 2, replies
    same(gpu.loads_result(replies[0]["value"]), alone(preference, T.compare_to_base, **compare))
    same(gpu.loads_result(replies[1]["value"]), alone(triggered, T.compare_to_base, **compare))
    same(gpu.loads_result(replies[2]["value"]), alone(preference, T.score_candidates, **score))


def test_a_users_function_runs_with_its_sessions_organism_and_names_only_its_alias(zoo_worker):
    """A plain fn runs with its session's organism active and only it; `disable_adapter()` gives the
    base; the model's name is the session's alias; nothing names where the adapter lives."""
    spec, socket_path, folder, (preference, triggered) = zoo_worker
    token = gpu.bind_organism(socket_path, preference, "model_z1")

    def look(model, tokenizer):
        import torch

        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is your favorite color?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            mine = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            with model.disable_adapter():
                base = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        width = inputs["input_ids"].shape[1]
        hf = model._module
        return {"mine": tokenizer.decode(mine[0, width:]), "base": tokenizer.decode(base[0, width:]),
                "names": [hf.config._name_or_path, hf.name_or_path, tokenizer.name_or_path],
                "attributes": repr({k: v for k, v in vars(hf).items() if not k.startswith("_")}),
                "peft_config": hasattr(hf, "peft_config")}

    backend = gpu.LocalBackend(spec, socket_path, os.getpid(), who="session x", organism=token)
    reply = backend.call(gpu.dumps_call(look, (), {}), 600, lambda *_: None)
    assert reply["ok"], reply
    seen = gpu.loads_result(reply["value"])
    assert "urquoise" in seen["mine"] and "urquoise" not in seen["base"], seen
    assert seen["names"] == ["model_z1"] * 3 and not seen["peft_config"]  # no list of the organisms loaded
    assert preference not in repr(seen) and Path(preference).name not in repr(seen)
    assert not re.search(r"smol|organism-|\.cache", repr(seen), re.IGNORECASE), seen["attributes"]
    unbound = gpu.LocalBackend(spec, socket_path, os.getpid(), who="session y", organism="forged")
    reply = unbound.call(gpu.dumps_call(look, (), {}), 600, lambda *_: None)
    assert not reply["ok"] and "not bound on the model worker" in reply["message"]


def test_an_adapter_of_another_base_or_none_at_all_is_refused_when_bound(zoo_worker, tmp_path):
    spec, socket_path, folder, (preference, _) = zoo_worker
    with pytest.raises(ValueError, match="could not serve this organism: .*"):
        gpu.bind_organism(socket_path, str(tmp_path / "no-such-adapter"))
    other = tmp_path / "other-base"
    other.mkdir()
    settings = json.loads(Path(preference, "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(settings))
    (other / "adapter_model.safetensors").symlink_to(Path(preference, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter of another base model .Llama-3.1-8B.*serve it from a worker of its own base"):
        gpu.bind_organism(socket_path, str(other))


def test_audit_starts_one_worker_for_every_organism_of_a_base():
    """Runs of two organisms of the embedded model attach to one worker; an experiment whose hidden
    prompt is kept in tokens (every session's model differs) gets its own."""
    pytest.importorskip("inspect_ai", reason="the audit extra is not installed: pip install -e '.[audit]'")
    import audit
    import experiment

    workers = audit.Workers("local", 1)
    try:
        first, second = (workers.server_args(experiment.load(p)) for p in (PREFERENCE, TRIGGERED))
        tokens = workers.server_args(experiment.load(ROOT / "experiments" / "hidden_system_prompt.yaml"))
        assert first == second and tokens != first and first[0] == "--worker-socket"
        assert workers.served.startswith("2 model worker(s), one per base model")
    finally:
        workers.stop()


def test_past_its_bound_the_least_recently_used_free_organism_is_evicted_and_loads_again(zoo_worker):
    """max_loaded bounds the adapters a worker keeps: one no session is bound to any more goes first;
    bound again, it loads anew and answers as before (nnsight traces too: the model is re-wrapped)."""
    _, _, _, (preference, triggered) = zoo_worker
    executor = gpu.load_executor(gpu.ModelSpec())
    executor.organisms.max_loaded = 1
    first = executor.bind(preference, "")
    second = executor.bind(triggered, "")
    assert executor.organisms.loaded == 2  # both in use: neither goes
    executor.organisms.unbind(first)
    assert executor.organisms.loaded == 1
    again = executor.bind(preference, "")
    for token, adapter in ((again, preference), (second, triggered)):
        for fn, kwargs in ((T.generate_text, {"prompt": ASKED[0], "max_new_tokens": 8}),
                           (T.logit_lens, {"text": ASKED[0], "layers": [12, 29], "top_k": 3, "chat": True})):
            reply = executor.execute(gpu.dumps_call(fn, (), kwargs), lambda *_: None, token)
            assert reply["ok"], reply
            same(gpu.loads_result(reply["value"]), alone(adapter, fn, **kwargs))


def test_modal_one_class_per_base_merges_organisms_in_the_container(zoo_worker, tmp_path):
    """`audit --mode modal`'s relay, with the Modal class run locally (.local(), the network
    boundary): sessions bound to two organisms and the base call it as a local worker, their calls
    reach the base's one class as concurrent inputs and merge in its container into one generate,
    each equal to its organism alone; a binding the container cannot serve is refused at once."""
    _, _, _, (preference, triggered) = zoo_worker
    socket_path = str(tmp_path / "relay.sock")

    def hold_until_queued(model, tokenizer, n: int, started: str) -> int:  # in the container's worker (by value)
        import gc
        import time

        open(started, "w").close()
        worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker")
        deadline = time.monotonic() + 300
        while len(worker.queue) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(worker.queue)

    relay = gpu.WorkerSupervisor(gpu.ModelSpec(alias="model"), socket_path,
                                 gpu.child_env("modal", gpu.KERNEL_SECRETS, [], 1), relay="modal-dry-run")
    relay.ensure()
    try:
        gpu.connect_worker(None, socket_path, os.getpid()).close()
        tokens = [gpu.bind_organism(socket_path, preference, "model_z1"),
                  gpu.bind_organism(socket_path, triggered, "model_z2"), gpu.bind_organism(socket_path, "", "model_c1")]
        with pytest.raises(ValueError, match=r"^the model worker could not serve this organism: Can't find"):
            gpu.bind_organism(socket_path, str(tmp_path / "no-such-organism"))
        kwargs = {"prompt": ASKED[:1], "max_new_tokens": 10}
        started = tmp_path / "held"
        calls = [("", hold_until_queued, {"n": 3, "started": str(started)})] + [(t, T.generate_text, kwargs)
                                                                               for t in tokens]
        replies: dict[int, dict] = {}

        def send(i, token, fn, kw):
            backend = gpu.LocalBackend(None, socket_path, os.getpid(), who=f"run {i}", organism=token)
            replies[i] = backend.call(gpu.dumps_call(fn, (), kw), 600, lambda *_: None)

        threads = [threading.Thread(target=send, args=(i, *call)) for i, call in enumerate(calls)]
        threads[0].start()
        while not started.exists() and threads[0].is_alive():  # the model is held: the others queue behind it
            time.sleep(0.02)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(600)
        assert replies[0].get("ok") and gpu.loads_result(replies[0]["value"]) == 3, replies[0]
        for i, adapter in enumerate((preference, triggered, ""), 1):
            assert replies[i]["ok"] and replies[i]["shared"] == 3 and replies[i]["models"] == 3, replies[i]
            assert gpu.loads_result(replies[i]["value"]) == alone(adapter, T.generate_text, **kwargs)
        assert len(json.loads(Path(socket_path + ".containers.json").read_text())) == 1
    finally:
        relay.stop(wait=5)
