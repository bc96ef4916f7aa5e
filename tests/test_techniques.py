"""Known-answer tests for techniques/, on the embedded SmolLM2 (through the worker) and a tiny GPT-2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_ok

import techniques as T
from techniques._arch import chat_prompt

FRANCE = "The capital of France is"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


@pytest.fixture(scope="module")
def patching(client):
    """The Eiffel Tower / Colosseum grid over every layer and position (one batched run)."""
    return client.run(T.activation_patching, clean=CLEAN, corrupted=CORRUPTED, answer=" Paris", wrong_answer=" Rome")


@pytest.fixture(scope="module")
def tiny_gpt2():
    """A randomly initialised 3-layer GPT-2 built from a config, wrapped in nnsight, in this process."""
    import torch
    from nnsight import TransformersModel
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import gpu

    tokenizer = AutoTokenizer.from_pretrained(gpu.resolve_model_path(gpu.ModelSpec()))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return TransformersModel(GPT2LMHeadModel(config).eval(), tokenizer=tokenizer), tokenizer


def test_model_info(client):
    info = client.run(T.get_model_info)
    assert info["architecture"] == "LlamaForCausalLM" and info["family"] == "llama"
    assert (info["n_layers"], info["d_model"], info["n_heads"], info["vocab_size"]) == (30, 576, 9, 49152)
    assert info["n_params"] == pytest.approx(134.5e6, rel=0.01) and info["dtype"] == "float32"
    assert info["device"] == "cpu" and info["chat_template"] is True


def test_token_probs_and_generation(client):
    probs = client.run(T.analyze_token_probs, text=FRANCE, top_k=3, targets=[" Paris", " Rome"])
    assert probs["top"][0]["token"] == " Paris" and probs["targets"][" Paris"] == pytest.approx(probs["top"][0]["prob"])
    assert probs["targets"][" Rome"] < 0.05
    plain = client.run(T.generate_text, prompt=FRANCE, max_new_tokens=5, chat=False)
    assert plain.startswith(" Paris")
    question = "What is the capital of France?"
    batch = client.run(T.generate_text, prompt=[question, "What is 2+2?"], max_new_tokens=12)
    assert len(batch) == 2 and "Paris" in batch[0] and "4" in batch[1]
    assert client.run(T.generate_text, prompt=question, max_new_tokens=12) == batch[0]  # greedy, unpadded
    prefill = client.run(T.prefill_attack, user_prompt="What is the capital of France?",
                         prefill_text="The capital of France is", max_new_tokens=5)
    assert "<|im_start|>assistant" in prefill["prompt"] and prefill["prompt"].endswith("The capital of France is")
    assert "Paris" in prefill["continuation"] and prefill["response"].startswith("The capital of France is")


def test_logit_lens_last_layer_is_the_model_distribution(client):
    lens = client.run(T.logit_lens, text=FRANCE, top_k=5, targets=[" Paris"])
    assert lens["layers"] == list(range(30)) and lens["positions"] == [4] and lens["tokens"][-1] == " is"
    final = lens["top"][-1][0]
    model = client.run(T.analyze_token_probs, text=FRANCE, top_k=5)["top"]
    assert [t["token"] for t in final] == [t["token"] for t in model]
    np.testing.assert_allclose([t["prob"] for t in final], [t["prob"] for t in model], atol=1e-5)
    assert final[0]["token"] == " Paris"
    paris = [row[0] for row in lens["target_probs"][" Paris"]]
    assert paris[-1] == pytest.approx(model[0]["prob"], abs=1e-5) and paris[-1] > 10 * paris[5]
    # chat=True: the text is a user turn, read where the assistant's answer starts
    asked = "What is the capital of France?"
    templated = client.run(lambda m, t: chat_prompt(t, asked))
    in_chat = client.run(T.logit_lens, text=asked, top_k=3, layers=[29], chat=True)
    assert "".join(in_chat["tokens"][-4:]) == "<|im_start|>assistant\n", in_chat["tokens"][-4:]
    own = client.run(T.analyze_token_probs, text=asked, top_k=3, chat=True)["top"]
    assert own == client.run(T.analyze_token_probs, text=templated, top_k=3)["top"]
    assert [t["token"] for t in in_chat["top"][0][0]] == [t["token"] for t in own]


def test_activation_patching_known_answers(client, patching):
    everything = client.run(T.activation_patching, clean=CLEAN, corrupted=CORRUPTED, answer=" Paris",
                            wrong_answer=" Rome", layers=[0], positions="all")
    assert everything["grid"] == [[pytest.approx(1.0, abs=1e-4)]]
    assert patching["clean_logit_diff"] > 3 and patching["corrupted_logit_diff"] < -5
    grid = np.array(patching["grid"])
    assert grid.shape == (30, 10)
    # The first token ("The") is the same in both prompts and sees only itself: patching it is a no-op.
    assert np.abs(grid[:, 0]).max() < 1e-4
    subject = [1, 2, 3]  # " E", "iffel", " Tower" vs " Col", "osse", "um"
    assert grid[:8, subject].max() > 0.6  # early: the information sits on the subject tokens
    assert grid[-1, -1] == pytest.approx(1.0, abs=1e-4)  # late: it has moved to the last position
    assert grid[-1, subject].max() < 0.1
    mlp = client.run(T.activation_patching, clean=CLEAN, corrupted=CORRUPTED, answer=" Paris", wrong_answer=" Rome",
                     layers=[2, 20], positions=[3, -1], component="mlp")
    assert np.array(mlp["grid"]).shape == (2, 2) and mlp["positions"] == [3, 9]


def test_patching_nothing_gives_zero(client):
    nothing = client.run(T.activation_patching, clean=CLEAN, corrupted=CORRUPTED, answer=" Paris",
                         wrong_answer=" Rome", layers=[5], positions=[0])
    # Position 0 ("The") is identical in both prompts: patching it is patching nothing.
    assert nothing["grid"] == [[pytest.approx(0.0, abs=1e-4)]]


def test_patching_rejects_prompts_of_different_lengths(client):
    with pytest.raises(ValueError, match="same number of tokens"):
        client.run(T.activation_patching, clean="The Eiffel Tower is in", corrupted="Rome is in",
                   answer=" Paris", wrong_answer=" Rome")


def test_attribution_patching_correlates_with_activation_patching(client, patching):
    attribution = client.run(T.attribution_patching, clean=CLEAN, corrupted=CORRUPTED, answer=" Paris",
                             wrong_answer=" Rome")
    a, b = np.array(patching["grid"]).ravel(), np.array(attribution["grid"]).ravel()
    r = float(np.corrcoef(a, b)[0, 1])
    print(f"attribution vs activation patching correlation: r = {r:.3f}")
    assert r > 0.5
    assert attribution["corrupted_logit_diff"] == pytest.approx(patching["corrupted_logit_diff"], abs=1e-3)


def test_steering(client):
    vector = client.run(T.steering_vector, positive=["I love this, it is wonderful!", "What a great day"],
                        negative=["I hate this, it is awful.", "What a terrible day"], layer=10)
    assert len(vector) == 576
    zero = client.run(T.steering, prompt="Tell me about your day.", vector=vector, layers=[10], alpha=0.0,
                      max_new_tokens=15)
    assert zero["steered"] == zero["baseline"]
    strong = client.run(T.steering, prompt="Tell me about your day.", vector=vector, layers=[10], alpha=20.0,
                        max_new_tokens=15)
    assert strong["steered"] != strong["baseline"] and strong["baseline"] == zero["baseline"]
    with pytest.raises(ValueError, match="d_model is 576"):
        client.run(T.steering, prompt="x", vector=[1.0, 2.0], layers=[3])


def test_attention_patterns_are_causal_distributions(client):
    result = client.run(T.attention_patterns, text=FRANCE, layers=[0, 15, 29], heads=[0, 8])
    patterns = np.array(result["patterns"])
    assert patterns.shape == (3, 2, 5, 5) and result["tokens"][-1] == " is"
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.triu(patterns, k=1)).max() == 0
    # Whatever the worker was loaded with is back in place after the call.
    assert client.run(lambda model, tokenizer: model._module.config._attn_implementation) == "eager"
    with pytest.raises(ValueError, match="9 heads"):
        client.run(T.attention_patterns, text=FRANCE, heads=[9])


def test_direct_logit_attribution_sums_to_the_logit_difference(client):
    dla = client.run(T.direct_logit_attribution, text=CLEAN, answer=" Paris", wrong_answer=" Rome")
    assert len(dla["attn"]) == len(dla["mlp"]) == 30
    assert dla["total"] == pytest.approx(dla["logit_diff"], abs=1e-3)
    assert dla["logit_diff"] == pytest.approx(4.81, abs=0.05)


def test_ablation(client):
    nothing = client.run(T.ablation, text=FRANCE, answer=" Paris", wrong_answer=" Rome", components=[])
    assert nothing["change"] == pytest.approx(0.0, abs=1e-4)
    zeroed = client.run(T.ablation, text=FRANCE, answer=" Paris", components=["L0.mlp", "L1.mlp", "L2.mlp"])
    assert zeroed["metric_before"] == pytest.approx(np.log(0.77), abs=0.1) and zeroed["change"] < -1
    head = client.run(T.ablation, text=FRANCE, answer=" Paris", wrong_answer=" Rome", components=["L3.H2"],
                      kind="mean", reference_texts=["Hello there", "A quick brown fox jumps"])
    assert head["change"] != 0.0 and abs(head["change"]) < 5
    with pytest.raises(ValueError, match="bad component 'mlp3'"):
        client.run(T.ablation, text=FRANCE, answer=" Paris", components=["mlp3"])


def test_ablation_one_component_at_a_time_matches_separate_calls(client):
    """Known answer: each row of the batched per-component scan equals that component ablated alone."""
    comps = ["L3.H2", "L3.H5", "L0.mlp", "L7.attn"]
    scan = client.run(T.ablation, text=FRANCE, answer=" Paris", wrong_answer=" Rome", components=comps,
                      separately=True)
    assert [e["component"] for e in scan["effects"]] == comps
    for effect in scan["effects"]:
        alone = client.run(T.ablation, text=FRANCE, answer=" Paris", wrong_answer=" Rome",
                           components=[effect["component"]])
        assert effect["change"] == pytest.approx(alone["change"], abs=1e-3)
    joint = client.run(T.ablation, text=FRANCE, answer=" Paris", wrong_answer=" Rome", components=comps)
    assert joint["metric_before"] == pytest.approx(scan["metric_before"], abs=1e-4)
    shown = repr(scan)
    assert shown.startswith("ablation") and "largest changes:" in shown and "L0.mlp" in shown


def test_results_display_compactly_in_the_notebook(kernel_session):
    """Results stay dicts with every documented key, but a notebook shows a short summary."""
    out = run_ok(kernel_session, "from techniques import logit_lens, activation_patching\n"
                                 "lens = client.run(logit_lens, text='The capital of France is', targets=[' Paris'])\n"
                                 "lens")
    assert len(out) <= 1600 and "logit_lens" in out and "L29" in out and "Paris" in out, out
    out = run_ok(kernel_session, "import json\nprint(type(lens).__name__, sorted(lens), len(json.dumps(lens)) > 5000)")
    assert out == "LensResult ['layers', 'positions', 'target_probs', 'tokens', 'top'] True\n"
    out = run_ok(kernel_session, "grid = client.run(activation_patching, clean='The Eiffel Tower is located in the city of', "
                                 "corrupted='The Colosseum is located in the city of', answer=' Paris', wrong_answer=' Rome')\n"
                                 "grid")
    assert len(out) <= 1600 and "strongest cells:" in out and "iffel" in out, out
    assert "torch" not in run_ok(kernel_session, "import sys\nprint([m for m in sys.modules if m == 'torch'])")


def test_patchscope(client):
    prompt = "The capital of France is"
    same = client.run(T.patchscope, source_text=prompt, source_layer=12, target_prompt=prompt, max_new_tokens=4)
    plain = client.run(T.generate_text, prompt=prompt, max_new_tokens=4, chat=False)
    assert same["decoded"] == plain  # patching a state into its own place changes nothing
    identity = client.run(T.patchscope, source_text="The Eiffel Tower", source_layer=3, max_new_tokens=6)
    assert identity["source_token"] == " Tower" and isinstance(identity["decoded"], str)
    assert len(identity["top"]) == 5


def test_probe_separates_two_prompt_sets(client):
    animals = ["The cat sat on the mat", "A dog barked loudly", "The horse ran fast", "A bird sang sweetly",
               "The cow ate grass", "A mouse hid quietly", "The lion roared", "A fish swam away",
               "The sheep grazed", "A duck quacked", "The tiger hunted", "A frog jumped"]
    numbers = ["Add 3 and 4 to get", "Twelve divided by four", "The sum of 10 and 20", "Multiply 6 by 7",
               "Subtract 5 from 9", "Half of 100 is", "Square root of 81", "Ten plus eleven",
               "Two times three", "Fifty minus eight", "Seven squared is", "One hundred and one"]
    texts, labels = animals + numbers, ["animal"] * 12 + ["number"] * 12
    acts = client.run(T.extract_activations, texts=texts[:3], layers=[5, 10])
    assert np.array(acts["activations"]).shape == (3, 2, 576)
    probe = client.run(T.train_probe, texts=texts, labels=labels, layers=[2, 10, 20], test_fraction=0.33)
    print("probe held-out accuracy per layer:", probe["test_accuracy"])
    assert probe["n_test"] == 8 and max(probe["test_accuracy"]) >= 0.85 > probe["chance"]


def test_techniques_work_on_a_tiny_gpt2(tiny_gpt2):
    model, tok = tiny_gpt2
    info = T.get_model_info(model, tok)
    assert info["family"] == "gpt2" and info["n_layers"] == 3 and info["head_dim"] == 16
    lens = T.logit_lens(model, tok, FRANCE, top_k=3)
    own = T.analyze_token_probs(model, tok, FRANCE, top_k=3)["top"]
    np.testing.assert_allclose([t["prob"] for t in lens["top"][-1][0]], [t["prob"] for t in own], atol=1e-5)
    grid = T.activation_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome", layers=[0], positions="all")["grid"]
    assert grid[0][0] == pytest.approx(1.0, abs=1e-3)
    dla = T.direct_logit_attribution(model, tok, CLEAN, " Paris", " Rome")
    assert dla["total"] == pytest.approx(dla["logit_diff"], abs=1e-3)  # LayerNorm with bias: norm_bias term
    patterns = np.array(T.attention_patterns(model, tok, FRANCE)["patterns"])
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=1e-5)
    assert T.ablation(model, tok, FRANCE, " Paris", components=[])["change"] == pytest.approx(0.0, abs=1e-4)
    assert T.ablation(model, tok, FRANCE, " Paris", components=["L1.H3", "L2.attn"])["change"] != 0.0
    steered = T.steering(model, tok, "Hi", vector=[0.0] * 64, layers=1, alpha=1.0, max_new_tokens=5, chat=False)
    assert steered["steered"] == steered["baseline"]
    attribution = T.attribution_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome")
    assert np.array(attribution["grid"]).shape == (3, 10)


def test_techniques_from_a_kernel_without_torch(kernel_session):
    run_ok(kernel_session, "from techniques import logit_lens, plot_logit_lens\nimport sys\n"
                           "lens = client.run(logit_lens, text='The capital of France is', targets=[' Paris'])")
    assert "False" in run_ok(kernel_session, "print('torch' in sys.modules)")
    result = kernel_session.execute("plot_logit_lens(lens, target=' Paris')")
    assert result.status == "ok" and len(result.images) == 1


def test_importing_techniques_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, techniques; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_plot_helpers_take_model_numbers_and_axes_and_fail_with_a_sentence(kernel_session):
    run_ok(kernel_session, "from techniques import attention_patterns, logit_lens, plot_attention, plot_logit_lens\n"
                           "import matplotlib.pyplot as plt\n"
                           "att = client.run(attention_patterns, text='The capital of France is', layers=[23], heads=[4])\n"
                           "lens = client.run(logit_lens, text='The capital of France is', targets=[' Paris'])")
    result = kernel_session.execute("plot_attention(att, 23, 4)")  # the README's call, with the model's numbers
    assert result.status == "ok" and len(result.images) == 1
    result = kernel_session.execute("fig, axes = plt.subplots(1, 2)\nplot_attention(att, 23, 4, ax=axes[0])\n"
                                    "plot_logit_lens(lens, ax=axes[1])\nplt.show()")
    assert result.status == "ok" and len(result.images) == 1, result.text
    bad = kernel_session.execute("plot_attention(att, 5, 4)")
    assert bad.status == "error" and "layer 5 is not in this result (it has layers [23])" in bad.text
    bad = kernel_session.execute("plot_logit_lens(lens, target=' Rome')")
    assert "target ' Rome' was not tracked" in bad.text


def test_catalog_lists_returns_and_survives_a_technique_without_docstring():
    entries = {e["name"]: e for e in T.catalog()}
    assert entries["logit_lens"]["returns"].startswith('{"tokens", "layers", "positions"')
    assert entries["steering"]["returns"].startswith('{"prompt", "baseline"')
    assert all(e["returns"] for e in entries.values()), [n for n, e in entries.items() if not e["returns"]]

    def bare(model, tokenizer, x=1):
        return x

    (entry,) = T.catalog([bare])
    assert entry == {"name": "bare", "signature": "bare(x = 1)", "summary": "(no description)", "returns": ""}


def test_activation_patching_shows_progress_and_keeps_finished_batches_when_stopped(tiny_gpt2, capsys, monkeypatch):
    """A timeout or cancel (a KeyboardInterrupt in the worker) after two batches: those cells come
    back, the rest are None, the result says PARTIAL; the finished cells equal a full run's."""
    import techniques._result as R

    model, tok = tiny_gpt2
    full = T.activation_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome", batch_size=4)
    assert full["partial"] is False and "activation_patching: " in capsys.readouterr().out
    step = R.Progress.step

    def stop_after_two_batches(self, n=1):
        step(self, n)
        if self.done == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(R.Progress, "step", stop_after_two_batches)
    part = T.activation_patching(model, tok, CLEAN, CORRUPTED, " Paris", " Rome", batch_size=4)
    printed = capsys.readouterr().out
    cells = [v for row in part["grid"] for v in row]
    assert part["partial"] is True and "returning the 8 of" in printed and "about" in printed
    assert cells[8:] == [None] * (len(cells) - 8) and None not in cells[:8]
    np.testing.assert_allclose(cells[:8], [v for row in full["grid"] for v in row][:8], atol=1e-5)
    assert "PARTIAL: 8 cells finished" in repr(part)
