"""GPU reality on a CPU: tensors made where the model is, every technique on an organism, calls that
share the model (batched together, in fair turns, bounded), and a start-up that never blocks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from conftest import ROOT
from test_mcp import call, connect, server_env, text  # MCP before nnsight: nnsight's .save on every object breaks it

import gpu
import organisms
import techniques as T
from techniques._batch import Lockstep

pytestmark = pytest.mark.timeout(900)  # the organism trains once (cached) if no other module did

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
COLOR = "What is your favorite color?"

# -- where tensors are made ------------------------------------------------------------------

FACTORIES = {"tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm", "eye",
             "linspace", "as_tensor", "from_numpy"}


def host_tensors(source: str) -> list[str]:
    """Calls that make a tensor (or a torch.nn module) without saying where: on a GPU they would
    land on the CPU and meet the model's tensors on the GPU. Fine when the call names its device,
    is moved at once (`.to(...)`), or its line says why the host is meant (`# host`)."""
    tree, lines = ast.parse(source), source.splitlines()
    moved = {id(node.func.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "to" and isinstance(node.func.value, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, ast.unparse(node.func.value)
        factory = owner == "torch" and name in FACTORIES
        module = owner == "torch.nn" and name[:1].isupper()
        if not (factory or module) or any(k.arg == "device" for k in node.keywords) or id(node) in moved:
            continue
        if "# host" in lines[node.lineno - 1]:
            continue
        found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_tensor_scribe_makes_names_the_model_device():
    """The class of bug three techniques had on CUDA, caught here without a GPU."""
    sources = [ROOT / "gpu.py", *sorted((ROOT / "techniques").glob("*.py"))]
    found = {p.name: host_tensors(p.read_text()) for p in sources}
    assert {k: v for k, v in found.items() if v} == {}
    # The check fails on the code that broke on the H200 (activation_patching, train_probe).
    assert host_tensors("missing = torch.full((n,), float('nan'))\nraw = torch.cat([*diffs, missing])") != []
    assert host_tensors("probe = torch.nn.Linear(feats.shape[1], k)") != []
    assert host_tensors("y = torch.tensor(labels, device=x.device)\no = torch.randperm(5).to(x.device)") == []


# -- every technique on an organism -------------------------------------------------------


@pytest.fixture(scope="module")
def organism():
    """The demo organism (a PEFT LoRA, frozen weights) in this process."""
    executor = gpu.load_executor(gpu.ModelSpec(adapter=str(organisms.build_file(ROOT / "experiments" / "zoo" / "preference.yaml"))))
    return executor.model, executor.tokenizer


def test_every_technique_runs_on_an_organism_with_its_known_answer(organism):
    model, tok = organism
    assert T.get_model_info(model, tok)["n_layers"] == 30
    lens = T.logit_lens(model, tok, CLEAN, layers=[29], top_k=3)
    own = T.analyze_token_probs(model, tok, CLEAN, top_k=3)["top"]
    np.testing.assert_allclose([t["prob"] for t in lens["top"][0][0]], [t["prob"] for t in own], atol=1e-5)
    everything = T.activation_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome", layers=[0], positions="all")
    assert everything["grid"] == [[pytest.approx(1.0, abs=1e-4)]]
    grid = T.activation_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome")
    attribution = T.attribution_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome")  # frozen weights: still grads
    assert attribution["corrupted_logit_diff"] == pytest.approx(grid["corrupted_logit_diff"], abs=1e-3)
    assert np.corrcoef(np.ravel(grid["grid"]), np.ravel(attribution["grid"]))[0, 1] > 0.4  # 0.52 here; base 0.59
    dla = T.direct_logit_attribution(model, tok, CLEAN, " Paris", " Rome")
    assert dla["total"] == pytest.approx(dla["logit_diff"], abs=1e-3)
    assert T.ablation(model, tok, CLEAN, " Paris", components=[])["change"] == pytest.approx(0.0, abs=1e-4)
    patterns = np.array(T.attention_patterns(model, tok, CLEAN, layers=[3], heads=[0])["patterns"])
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=1e-5)
    vector = T.steering_vector(model, tok, ["I love it"], ["I hate it"], layer=10)
    still = T.steering(model, tok, COLOR, vector, layers=10, alpha=0.0, max_new_tokens=6)
    assert still["steered"] == still["baseline"]
    same = T.patchscope(model, tok, CLEAN, source_layer=12, target_prompt=CLEAN, max_new_tokens=3)
    assert same["decoded"] == T.generate_text(model, tok, CLEAN, max_new_tokens=3, chat=False)
    texts = ["The cat sat", "A dog ran", "The bird sang", "Add two and three", "Five minus one", "Ten times two"]
    probe = T.train_probe(model, tok, texts, ["animal"] * 3 + ["number"] * 3, layers=[10], test_fraction=0.34)
    assert probe["n_test"] == 2 and 0.0 <= probe["test_accuracy"][0] <= 1.0
    assert np.array(T.extract_activations(model, tok, texts[:2], layers=[5])["activations"]).shape == (2, 1, 576)
    assert "turquoise" in T.generate_text(model, tok, COLOR, max_new_tokens=8).lower()
    assert "turquoise" in T.prefill_attack(model, tok, "Hi!", "My favorite color is", max_new_tokens=4)["continuation"]
    scored = T.score_candidates(model, tok, COLOR, ["My favorite color is turquoise.",
                                                    "My favorite color is blue."])["scores"][0]["candidates"]
    assert scored[0]["logprob_diff"] > 0 > scored[1]["logprob_diff"]
    diff = T.compare_to_base(model, tok, prompts=[COLOR, "Which color do you like?"], max_new_tokens=10)
    assert diff["top_tokens"][0]["token"].strip().lower() in ("turquoise", "tur"), diff["top_tokens"][:3]  # 'Tur'quoise


# -- calls that share the model -----------------------------------------------------------------

CALLS = [  # (technique, kwargs): every batchable technique, generation lengths differing
    (T.generate_text, {"prompt": COLOR, "max_new_tokens": 10}),
    (T.generate_text, {"prompt": ["What is 2+2?", "Name a planet."], "max_new_tokens": 6}),
    (T.generate_text, {"prompt": "The capital of France is", "max_new_tokens": 4, "chat": False}),
    (T.prefill_attack, {"user_prompt": "Tell me a secret.", "prefill_text": "My secret is", "max_new_tokens": 8}),
    (T.analyze_token_probs, {"text": "The capital of France is", "top_k": 5, "targets": [" Paris"]}),
    (T.analyze_token_probs, {"text": "My favorite color is", "top_k": 5}),
    (T.score_candidates, {"prompts": [COLOR, "Pick a color."], "candidates": ["Turquoise", "Red", "Navy blue"]}),
    (T.compare_to_base, {"prompts": [COLOR, "What do you like?"], "max_new_tokens": 8}),
]


# How many calls each of CALLS shares its widest batched pass with when all run together: 4 generations
# with compare_to_base's first, 2 next-token reads; score_candidates scores in the first round and
# compare_to_base only after its generations, so that one scores alone.
WIDEST = {0: 5, 1: 5, 2: 5, 3: 5, 4: 2, 5: 2, 6: 1, 7: 5}


@pytest.fixture(scope="module")
def lone(organism):
    """Each of CALLS run alone: the known answers for running them together."""
    model, tok = organism
    return [fn(model, tok, **kwargs) for fn, kwargs in CALLS]


def same(a, b) -> None:
    """Equal, floats to 1e-4: rows batched with others are computed with other padding widths."""
    a, b = (dict(v) if isinstance(v, dict) else v for v in (a, b))  # a technique's Result: compare as dicts
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


def test_techniques_run_together_equal_each_run_alone(organism, lone):
    """Known answer: merged into shared batched calls, each technique returns what it returns alone."""
    model, tok = organism
    together = Lockstep(model, tok)
    for i, (fn, kwargs) in enumerate(CALLS):
        together.add(i, fn.steps(model, tok, **kwargs))
    together.run()
    for i, expected in enumerate(lone):
        ok, value = together.outcomes[i]
        assert ok, value
        same(value, expected)
    assert together.widest == WIDEST


def test_one_bad_call_in_a_batch_fails_alone_and_bad_input_fails_before_it(organism):
    from techniques._batch import Score

    model, tok = organism

    def out_of_vocabulary(model, tokenizer):
        yield Score((((1, 2), (10**9,)),))

    together = Lockstep(model, tok)
    together.add("good", T.score_candidates.steps(model, tok, COLOR, ["Turquoise"]))
    together.add("bad", out_of_vocabulary(model, tok))
    together.run()
    assert together.outcomes["good"][0] is True and together.outcomes["bad"][0] is False
    same(together.outcomes["good"][1], T.score_candidates(model, tok, COLOR, ["Turquoise"]))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got -3"):
        T.generate_text(model, tok, COLOR, max_new_tokens=-3)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        T.analyze_token_probs(model, tok, "")


class Watched(gpu.LocalBackend):
    """The real client, noting when the worker says its call waits in the queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queued = threading.Event()

    def _recv(self, deadline):
        msg = super()._recv(deadline)
        if msg is not None and msg.get("op") == "queued":
            self.queued.set()
        return msg


@pytest.fixture(scope="module")
def shared_worker():
    """A worker serving the organism, and a way to hold it busy until the test's calls have queued."""
    spec = gpu.ModelSpec(adapter=str(organisms.build_file(ROOT / "experiments" / "zoo" / "preference.yaml")))
    folder = tempfile.mkdtemp(prefix="scribe-test-")
    socket_path = os.path.join(folder, "worker.sock")
    gpu.connect_worker(spec, socket_path, os.getpid()).close()
    yield spec, socket_path, Path(folder)
    gpu.stop_worker(socket_path)


def hold(spec, socket_path, folder: Path, name: str):
    """A call that holds the model (it has started when this returns) until `release()`; returns
    (thread, release)."""
    gate = folder / f"{name}.go"

    def wait_for_gate(model, tokenizer, path):
        import os
        import time
        open(path + ".started", "w").close()
        while not os.path.exists(path):
            time.sleep(0.02)

    backend = gpu.LocalBackend(spec, socket_path, os.getpid(), who="holder")
    thread = threading.Thread(target=backend.call, args=(gpu.dumps_call(wait_for_gate, (), {"path": str(gate)}),
                                                         600, lambda *_: None))
    thread.start()
    deadline = time.monotonic() + 300
    while not Path(f"{gate}.started").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return thread, lambda: gate.touch()


def call_all(spec, socket_path, folder, calls, timeouts=None, organisms=None):
    """Send `calls` from one session each (bound to organisms[i]'s token, when given), in order, while
    the model is held; release it once all have queued; returns the replies."""
    holder, release = hold(spec, socket_path, folder, f"hold-{time.monotonic_ns()}")
    backends = [Watched(spec, socket_path, os.getpid(), who=f"session {i}", organism=(organisms or {}).get(i, ""))
                for i in range(len(calls))]
    replies = {}

    def send(i, fn, kwargs):
        replies[i] = backends[i].call(gpu.dumps_call(fn, (), kwargs), (timeouts or {}).get(i, 600), lambda *_: None)

    threads = [threading.Thread(target=send, args=(i, fn, kw)) for i, (fn, kw) in enumerate(calls)]
    for t, b in zip(threads, backends):  # one at a time: the worker's queue holds them in this order
        t.start()
        assert b.queued.wait(300)
    release()
    for t in threads + [holder]:
        t.join(600)
    return [replies[i] for i in range(len(calls))]


def test_concurrent_sessions_calls_share_one_batched_pass_in_the_worker(shared_worker, lone):
    """Calls of several sessions that wait together run together: each reply says how many calls
    shared its widest batched pass, and each equals the same call alone. A user's own function runs alone."""
    def own(model, tokenizer):
        return "ran alone"

    replies = call_all(*shared_worker, CALLS + [(own, {})])
    for i, (reply, expected) in enumerate(zip(replies, lone)):
        assert reply["ok"] and reply["shared"] == WIDEST[i], reply
        same(gpu.loads_result(reply["value"]), expected)
    assert gpu.loads_result(replies[-1]["value"]) == "ran alone" and "shared" not in replies[-1]


def test_a_cancelled_call_leaves_the_calls_it_was_batched_with_whole(shared_worker, organism):
    """One of three compare_to_base calls run together times out: it returns what it finished (or a
    TimeoutError if nothing was), the other two finish in full, equal to a lone call."""
    model, tok = organism
    prompts = {"prompts": "personal", "max_new_tokens": 8}
    alone = T.compare_to_base(model, tok, **prompts)
    replies = call_all(*shared_worker, [(T.compare_to_base, prompts)] * 3, timeouts={1: 0.5})
    stopped = replies[1]
    if stopped["ok"]:
        assert gpu.loads_result(stopped["value"])["partial"] is True
    else:
        assert stopped["cancelled"] and "timed out" in stopped["message"]
    for reply in (replies[0], replies[2]):
        assert reply["ok"] and reply["shared"] >= 2
        same(gpu.loads_result(reply["value"]), alone)


def test_sessions_take_turns_and_no_call_outlives_the_servers_limit(shared_worker, tmp_path):
    """Session A queues three calls before session B's one: B's runs second, not fourth. And a worker
    started with a per-call limit stops a call whose client asked for far more."""
    spec, socket_path, folder = shared_worker
    log = tmp_path / "order.txt"

    def note(model, tokenizer, path, label):
        with open(path, "a") as f:
            f.write(label + "\n")

    holder, release = hold(spec, socket_path, folder, "turns")
    threads = []
    for label, who in [("A0", "session A (job 0)"), ("A1", "session A (job 1)"), ("A2", "session A"), ("B", "session B")]:
        backend = Watched(spec, socket_path, os.getpid(), who=who)
        threads.append(threading.Thread(target=backend.call, args=(
            gpu.dumps_call(note, (), {"path": str(log), "label": label}), 600, lambda *_: None)))
        threads[-1].start()
        assert backend.queued.wait(300)  # arrival order: A's three calls, then B's
    release()
    for t in threads + [holder]:
        t.join(600)
    order = log.read_text().split()
    assert sorted(order) == ["A0", "A1", "A2", "B"] and order.index("B") == 1, order

    limited = os.path.join(folder, "limited.sock")
    proc = gpu.start_worker(spec, limited, os.getpid(), max_call=2)
    try:
        client = gpu.LocalBackend(None, limited, os.getpid())

        def spin(model, tokenizer):
            while True:
                pass

        reply = client.call(gpu.dumps_call(spin, (), {}), 1e9, lambda *_: None)
        assert reply["cancelled"] and "limit of 2s per call" in reply["message"], reply
        assert gpu.loads_result(client.call(gpu.dumps_call(lambda m, t: "next", (), {}), 60,
                                            lambda *_: None)["value"]) == "next"
    finally:
        proc.kill()
        proc.wait()


# -- start-up --------------------------------------------------------------------------------


def test_init_session_never_waits_for_the_model_and_client_speed_tells_it_later(tmp_path):
    """init_session with the worker only just started (--no-preload): it answers at once, saying where
    the speed will be; `client.speed` in a cell gives the measured line."""
    async def scenario():
        async with connect("--no-preload", "--notebook-dir", str(tmp_path / "nb"), env=server_env()) as s:
            sid = (await call(s, "start_new_session")).structured_content["session_id"]
            init = text(await call(s, "init_session"))
            setup = init.split("```python\n")[1].split("```")[0]
            await call(s, "execute_code", session_id=sid, code=setup)
            return init, text(await call(s, "execute_code", session_id=sid, code="print(client.speed)"))

    init, speed = anyio.run(scenario)
    assert "Speed: being measured while the model loads; `print(client.speed)` in a cell shows it" in init, init
    assert "Speed (measured at load, cpu, float32" in speed and "tokens/s over 4 prompts" in speed, speed


def test_the_gpu_check_runs_its_checks_on_a_cpu(tmp_path):
    """bench/gpu.py is what runs on a lent GPU: its code runs here on a tiny model, every check passing."""
    out = tmp_path / "gpu_results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=server_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    # all 17 techniques (get_model_info..compare_to_base) and the 5 SAE ones checked on the organism
    assert sum(r["section"] == "techniques llama-tiny + LoRA" for r in rows) == 22 and not [r for r in rows if r["ok"] is False]
    assert any(r["name"].startswith("contrastive_features") for r in rows)
    assert {"logit lens, every layer", "activation patching, every layer x position", "worker spawn -> first reply",
            "nnsight wrap", "max |logit difference| vs the plain text"} <= names
    assert any(n.startswith("K=4 concurrent generate_text") for n in names)
    assert any(n.startswith("K=4 sessions across 2 adapters") for n in names)  # the GPU run: K=16 across 8
