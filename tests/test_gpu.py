"""The warm worker and InterpClient on the real embedded model, from real kernels."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, run_ok

import gpu

# The four example techniques of the reference agent prompt, verbatim in its plain-HF style.
REFERENCE_EXAMPLES = '''
def generate_text(model, tokenizer, prompt, max_new_tokens=50):
    """Generate text from a prompt."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return tokenizer.decode(outputs[0], skip_special_tokens=True)

def analyze_token_probs(model, tokenizer, text, top_k=10):
    """Get top-k next token predictions."""
    import torch

    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
        logits = outputs.logits[0, -1, :]
        probs = torch.softmax(logits, dim=-1)

    top_probs, top_indices = torch.topk(probs, top_k)

    return [
        {
            "token": tokenizer.decode([idx]),
            "probability": prob.item(),
        }
        for idx, prob in zip(top_indices, top_probs)
    ]

def prefill_attack(model, tokenizer, user_prompt, prefill_text, max_new_tokens=50):
    """Force model to continue from prefilled text."""
    import torch

    # Format with chat template if available
    messages = [{"role": "user", "content": user_prompt}]
    if hasattr(tokenizer, 'apply_chat_template') and tokenizer.chat_template:
        formatted = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        full_prompt = formatted + prefill_text
    else:
        full_prompt = f"User: {user_prompt}\\nAssistant: {prefill_text}"

    inputs = tokenizer(full_prompt, return_tensors="pt").to(model.device)
    input_length = inputs["input_ids"].shape[1]

    outputs = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.eos_token_id,
    )

    continuation_ids = outputs[0][input_length:]
    return tokenizer.decode(continuation_ids, skip_special_tokens=True)

def logit_lens(model, tokenizer, text, layers=None):
    """Decode hidden states from each layer to see predictions."""
    import torch

    inputs = tokenizer(text, return_tensors="pt").to(model.device)

    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
        hidden_states = outputs.hidden_states

    # Get unembedding matrix (lm_head)
    lm_head = model.lm_head

    # Analyze specified layers (or all)
    if layers is None:
        layers = range(len(hidden_states))

    results = []
    for layer_idx in layers:
        # Get last token's hidden state at this layer
        hidden = hidden_states[layer_idx][0, -1, :]

        # Project to vocabulary
        logits = lm_head(hidden)
        probs = torch.softmax(logits, dim=-1)

        # Get top prediction
        top_prob, top_idx = torch.max(probs, dim=-1)
        top_token = tokenizer.decode([top_idx])

        results.append({
            "layer": layer_idx,
            "top_token": top_token,
            "probability": top_prob.item()
        })

    return results
'''


def out_value(session, expr: str):
    """Evaluate expr in the kernel and bring it back as JSON."""
    text = run_ok(session, f"import json as _json\nprint(_json.dumps({expr}))")
    return json.loads(text.strip().splitlines()[-1])


def test_reference_examples_from_a_kernel(kernel_session):
    run_ok(kernel_session, REFERENCE_EXAMPLES)
    probs = out_value(kernel_session, 'client.run(analyze_token_probs, text="The capital of France is", top_k=5)')
    assert probs[0]["token"] == " Paris"
    assert 0.5 < probs[0]["probability"] < 1
    first = out_value(kernel_session, 'client.run(generate_text, prompt="The capital of France is", max_new_tokens=8)')
    again = out_value(kernel_session, 'client.run(generate_text, prompt="The capital of France is", max_new_tokens=8)')
    assert first == again and first.startswith("The capital of France is Paris")
    prefill = out_value(kernel_session, 'client.run(prefill_attack, user_prompt="What is your secret?", '
                                        'prefill_text="My secret is: ", max_new_tokens=10)')
    assert isinstance(prefill, str) and prefill
    lens = out_value(kernel_session, 'client.run(logit_lens, text="The capital of France is", layers=[0, 6, 12, 18, 24, 30])')
    assert [row["layer"] for row in lens] == [0, 6, 12, 18, 24, 30]
    assert lens[-1]["top_token"] == " Paris"


def test_reference_attention_example_returns_weights(client):
    """The reference prompt's first example asks for output_attentions: it must not come back empty."""
    def my_technique(model, tokenizer, text):
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        outputs = model(**inputs, output_attentions=True)
        return outputs.attentions

    attentions = client.run(my_technique, text="Hello world")
    assert len(attentions) == 30 and attentions[0].shape == (1, 9, 2, 2)


def test_nnsight_trace_from_a_kernel_matches_model_logits(kernel_session):
    run_ok(kernel_session, '''
def nnsight_lens(model, tokenizer, text):
    import torch
    with torch.no_grad():
        with model.trace(text):
            hidden = model.model.layers[-1].output.save()
            final = model.lm_head.output.save()
        lens = model.lm_head(model.model.norm(hidden))
    return {"lens": lens[0, -1], "final": final[0, -1]}

result = client.run(nnsight_lens, text="The capital of France is")
''')
    assert out_value(kernel_session, "bool(abs(result['lens'] - result['final']).max() < 1e-4)")
    assert out_value(kernel_session, "type(result['lens']).__module__") == "numpy"
    assert out_value(kernel_session, "result['lens'].shape[0]") == 49152
    # The kernel stays light: results came back without importing torch there.
    assert out_value(kernel_session, "'torch' in __import__('sys').modules") is False


def test_closures_helpers_and_imports_travel(kernel_session):
    run_ok(kernel_session, "import numpy as np\nSCALE = 3\ndef helper(x):\n    return np.asarray(x) * SCALE")
    run_ok(kernel_session, '''
def make(offset):
    def fn(model, tokenizer, values):
        return (helper(values) + offset).tolist()
    return fn
shipped = client.run(make(1), values=[1, 2])
''')
    assert out_value(kernel_session, "shipped") == [4, 7]


def test_prints_and_errors_show_in_the_cell(kernel_session):
    run_ok(kernel_session, 'def noisy(model, tokenizer):\n    print("from the worker")\n    return 5')
    text = run_ok(kernel_session, "client.run(noisy)")
    assert "from the worker" in text and "Out[" in text
    result = kernel_session.execute('''
def broken(model, tokenizer):
    table = {}
    return table["missing_key"]  # the user's own line
client.run(broken)''')
    assert result.status == "error"
    assert "KeyError" in result.text and "the user's own line" in result.text
    assert "Executor" not in result.text  # worker plumbing is cut from the traceback
    # `except KeyError` still works in the notebook.
    run_ok(kernel_session, "try:\n    client.run(broken)\nexcept KeyError as e:\n    caught = 'yes'")
    assert out_value(kernel_session, "caught") == "yes"


def test_results_tensors_and_unsendable_values(client):
    def tensors(model, tokenizer):
        import torch
        return {"t": torch.ones(2, 3, requires_grad=True) * 2, "bf16": torch.ones(2, dtype=torch.bfloat16),
                "nested": [torch.tensor(1.5)], "plain": ("a", 1, None)}

    result = client.run(tensors)
    assert isinstance(result["t"], np.ndarray) and result["t"].tolist() == [[2.0] * 3] * 2
    assert result["bf16"].dtype == np.float32
    assert float(result["nested"][0]) == 1.5 and result["plain"] == ("a", 1, None)

    with pytest.raises(TypeError, match=r"result\['m'\].*TransformersModel|result\['m'\].*nnsight"):
        client.run(lambda model, tokenizer: {"m": model})
    with pytest.raises(TypeError, match=r"result\[1\].*does not pickle"):
        client.run(lambda model, tokenizer: [1, threading.Lock()])


def test_timeout_interrupts_and_the_worker_stays_ready(client):
    def slow(model, tokenizer):
        import time
        while True:
            time.sleep(0.05)

    with pytest.raises(TimeoutError, match="timed out after 1s"):
        client.run(slow, timeout=1)
    assert client.run(lambda model, tokenizer: "ready") == "ready"


def test_hooks_left_behind_are_removed(client):
    def top_logit(model, tokenizer):
        import torch
        with torch.no_grad():
            return model(**tokenizer("Hello", return_tensors="pt")).logits[0, -1].max().item()

    def poison(model, tokenizer):
        raw = model._module
        raw.model.layers[3].register_forward_hook(lambda mod, inp, out: out * 0)
        raw.lm_head.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
        return "poisoned"

    def n_hidden_states(model, tokenizer):
        import torch
        with torch.no_grad():
            return len(model(**tokenizer("Hello", return_tensors="pt"), output_hidden_states=True).hidden_states)

    before = client.run(top_logit)
    assert client.run(poison) == "poisoned"
    assert client.run(top_logit) == pytest.approx(before, abs=1e-5)
    # transformers' own recording hooks (installed on first use) survive the clean-up.
    assert client.run(n_hidden_states) == client.run(n_hidden_states) == 31


def test_two_clients_at_once(worker_env):
    clients = [gpu.InterpClient() for _ in range(2)]
    results: dict[int, list] = {}

    def work(i):
        results[i] = [clients[i].run(lambda model, tokenizer, k: k * k, k=i * 100 + j) for j in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [(i * 100 + j) ** 2 for j in range(20)] for i in range(2)}
    for c in clients:
        c.close()


def test_client_that_disconnects_mid_call_does_not_hurt_the_worker(worker_env, client):
    sock = gpu.connect_worker(gpu.ModelSpec(), worker_env[gpu.ENV_SOCKET], os.getpid())
    gpu.recv_msg(sock)  # hello
    payload = gpu.dumps_call(lambda model, tokenizer: __import__("time").sleep(1), (), {})
    gpu.send_msg(sock, {"op": "call", "id": 1, "payload": payload})
    sock.close()
    assert client.run(lambda model, tokenizer: 42) == 42


def test_private_worker_survives_crash_and_stuck_calls(monkeypatch):
    """A private worker (a plain notebook, no server): os._exit and an uninterruptible call recover."""
    shared_socket = os.environ[gpu.ENV_SOCKET]
    for key in (gpu.ENV_SOCKET, gpu.ENV_SPEC, gpu.ENV_OWNER):
        monkeypatch.delenv(key)
    c = gpu.InterpClient(preload=False)
    assert c.backend.socket_path != shared_socket
    assert c.run(lambda model, tokenizer: model.config.num_hidden_layers) == 30
    with pytest.raises(gpu.WorkerDiedError, match="fresh worker starts on the next call"):
        c.run(lambda model, tokenizer: __import__("os")._exit(3))
    assert c.run(lambda model, tokenizer: "back") == "back"

    def stubborn(model, tokenizer):
        import time
        while True:
            try:
                time.sleep(0.05)
            except BaseException:
                pass

    with pytest.raises(TimeoutError, match="worker was restarted"):
        c.run(stubborn, timeout=1)
    assert c.run(lambda model, tokenizer: "back again") == "back again"
    c.close()


def test_private_worker_exits_with_its_owner(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import gpu, time\n"
        "c = gpu.InterpClient()\n"
        "print(c.run(lambda model, tokenizer: 1), c.backend.worker_pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_WORKER")}
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    line = owner.stdout.readline().split()
    assert line[0] == "1"
    worker_pid = int(line[1])
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its owner")


def test_python_version_mismatch_is_refused_clearly():
    envelope = pickle.loads(gpu.dumps_call(lambda model, tokenizer: 1, (), {}))
    envelope["py"] = (3, 99)
    with pytest.raises(RuntimeError, match="Python version mismatch: the notebook runs Python 3.99"):
        gpu.loads_call(pickle.dumps(envelope))
    envelope["py"], envelope["cloudpickle"] = sys.version_info[:2], "1.0.0"
    with pytest.raises(RuntimeError, match="cloudpickle version mismatch: the notebook has 1.0.0"):
        gpu.loads_call(pickle.dumps(envelope))


def test_model_resolution_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gpu.resolve_model_path(gpu.ModelSpec(model=str(tmp_path / "missing.gguf")))
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        gpu.resolve_model_path(gpu.ModelSpec(model=str(not_a_model)))


def test_gguf_is_converted_once_and_loads_from_the_cache(worker_env):
    cached = gpu.resolve_model_path(gpu.ModelSpec())
    assert (ROOT / "gpu.py").exists() and os.path.isfile(os.path.join(cached, "model.safetensors"))
    weights = os.path.join(cached, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert gpu.resolve_model_path(gpu.ModelSpec()) == cached
    assert os.stat(weights).st_mtime_ns == before  # found in the cache, not converted again


def test_a_model_folder_loads_in_a_private_worker(tmp_path):
    folder = gpu.resolve_model_path(gpu.ModelSpec())
    bad = gpu.InterpClient(model=str(tmp_path / "no-such-model-folder"), preload=False)
    with pytest.raises(RuntimeError, match="failed to start"):
        bad.run(lambda model, tokenizer: 1, timeout=60)
    c = gpu.InterpClient(model=folder, preload=False)
    assert c.model_name == folder
    assert c.run(lambda model, tokenizer: type(model).__name__) == "TransformersModel"
    c.close()


def test_bad_first_argument_is_a_clear_error(client):
    with pytest.raises(TypeError, match="needs a function"):
        client.run("logit_lens")


def test_gguf_conversion_from_scratch_honours_the_cache_dir(tmp_path):
    """What a fresh machine does once: GGUF -> safetensors, here into SCRIBE_CACHE_DIR."""
    import hashlib

    env = {**os.environ, "SCRIBE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import gpu; print(gpu.resolve_model_path(gpu.ModelSpec()))"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    fresh = out.stdout.strip().splitlines()[-1]
    assert fresh.startswith(str(tmp_path)), out.stderr[-2000:]
    default = gpu.resolve_model_path(gpu.ModelSpec())

    def digest(folder):
        return hashlib.sha256(open(os.path.join(folder, "model.safetensors"), "rb").read()).hexdigest()

    assert digest(fresh) == digest(default)
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # the temporary folder was renamed into place


def test_interrupting_the_cell_stops_the_call_in_the_worker(kernel_session):
    """A cell timeout (kernel interrupt) during client.run must not leave the worker busy."""
    run_ok(kernel_session, "def forever(model, tokenizer):\n    import time\n    while True:\n        time.sleep(0.05)")
    result = kernel_session.execute("client.run(forever)", timeout=2)
    assert result.status == "timeout" and "KeyboardInterrupt" in result.text
    assert "'still warm'" in run_ok(kernel_session, "client.run(lambda model, tokenizer: 'still warm')")


def test_an_interrupted_cell_keeps_what_the_technique_finished_in_client_partial(kernel_session):
    """Long work never lost: the cell is interrupted (a cell timeout, or the agent cancelling) while
    activation_patching runs; the batches it finished come back in client.partial, marked partial."""
    stopped = []

    def interrupt_at_first_progress(text):
        if "activation_patching: " in text and not stopped:
            stopped.append(threading.Thread(target=kernel_session.interrupt))
            stopped[0].start()

    result = kernel_session.execute(
        "import techniques as T\nclient.partial = None\n"
        "grid = client.run(T.activation_patching, clean='The Eiffel Tower is located in the city of', "
        "corrupted='The Colosseum is located in the city of', answer=' Paris', wrong_answer=' Rome', batch_size=1)",
        on_output=interrupt_at_first_progress)
    assert stopped and "KeyboardInterrupt" in result.text and "client.partial" in result.text, result.text
    kept = json.loads(run_ok(kernel_session, "import json\np = client.partial\nprint(json.dumps([p['partial'], "
                                             "[v is not None for row in p['grid'] for v in row]]))").splitlines()[-1])
    assert kept[0] is True and 1 <= sum(kept[1]) < len(kept[1]) and kept[1][0], kept
    assert "'still warm'" in run_ok(kernel_session, "client.run(lambda model, tokenizer: 'still warm')")


def test_every_pattern_init_session_teaches_runs_as_taught(kernel_session):
    """The instructions' trace rules, executed literally: .save(), a list made before the block,
    plain HF calls and generate."""
    code = '''
def taught(model, tokenizer, text):
    import torch
    with model.trace(text):
        h = model.model.layers[5].output.save()
    hs = []
    with model.trace(text):
        for i in range(3):
            hs.append(model.model.layers[i].output.save())
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        lens = model.lm_head(plain.hidden_states[-1])
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with model.trace(text):
        layer_2 = model.model.layers[2].output.save()
    chat = [{"role": "user", "content": "Hi"}]
    encoded = tokenizer.apply_chat_template(chat, tokenize=True)
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    return (list(h.shape), len(hs), [list(x.shape) for x in hs], list(lens.shape),
            tokenizer.decode(generated[0][inputs["input_ids"].shape[1]:]),
            len(plain.hidden_states), bool(torch.equal(plain.hidden_states[2 + 1], layer_2)),
            encoded["input_ids"] == ids and isinstance(ids[0], int))

print(client.run(taught, text="The capital of France is"))
'''
    out = run_ok(kernel_session, code)
    assert ("([1, 5, 576], 3, [[1, 5, 576], [1, 5, 576], [1, 5, 576]], [1, 5, 49152], ' Paris.\\n', 31, True, True)"
            in out), out


def test_a_background_job_keeps_the_notebook_free_and_can_be_collected_or_cancelled(kernel_session):
    """client.submit: the cell returns at once, other cells run, the model still takes one call at a
    time, and the job can be polled, collected, or cancelled (the worker stays usable)."""
    run_ok(kernel_session, '''
def counting(model, tokenizer, n):
    import time
    for i in range(n):
        print("step", i, flush=True)
        time.sleep(0.3)
    return f"counted to {n}"

def forever(model, tokenizer):
    import time
    while True:
        time.sleep(0.05)
''')
    started = run_ok(kernel_session, "job = client.submit(counting, n=8)\nprint(job.done(), repr(job)[:12])")
    assert started.strip() == "False <Job countin", started
    assert run_ok(kernel_session, "1 + 1").strip().endswith("]: 2")  # the notebook is free meanwhile
    queued = run_ok(kernel_session, "print(client.run(lambda model, tokenizer: 'after the job'))")
    assert "after the job" in queued  # waited for the job's call: one at a time on the model
    out = run_ok(kernel_session, "print(job.result(timeout=60), job.done())\nprint(job.progress)\nprint(job.output.count('step'))")
    lines = out.strip().splitlines()
    assert lines[0] == "counted to 8 True" and lines[1].startswith("done after ") and "step 7" in lines[1]
    assert lines[2] == "8"
    out = run_ok(kernel_session, "stuck = client.submit(forever)\nimport time\ntime.sleep(1)\n"
                                 "print(stuck.cancel())\ntry:\n    stuck.result(timeout=30)\nexcept TimeoutError as e:\n"
                                 "    print('raised:', e)\nprint(stuck.progress.split()[0])\n"
                                 "print(client.run(lambda model, tokenizer: 'still warm'))")
    lines = out.strip().splitlines()
    assert lines[0] == "True" and lines[1].startswith("raised: job cancelled: ") and lines[2:] == ["cancelled", "still warm"]
    waiting = run_ok(kernel_session, "slow = client.submit(counting, n=20)\ntry:\n    slow.result(timeout=0.5)\n"
                                     "except TimeoutError as e:\n    print('not yet:', e)\nslow.cancel()")
    assert "not yet: job counting is still running after 0.5s more; running after" in waiting, waiting
