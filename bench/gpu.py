"""The GPU check: Scribe on one NVIDIA GPU against plain transformers on the same GPU, offline.

    python bench/gpu.py                        # one GPU: a few minutes (target <= 5 on one H200)
    python bench/gpu.py --device cpu --quick   # the same code on a tiny model (the test suite runs it)
    python bench/gpu.py --markdown             # the saved results as README rows

Nothing is downloaded: Llama models with random weights are built from bench/configs/ (the
embedded SmolLM2-135M's shape, and a 1.56B one), with the embedded model's tokenizer (--tokenizer
DIR: any folder with its tokenizer files; default: the converted embedded model). Equalities with
plain transformers hold for any weights, and the timings are real. On a GPU machine without
network, install Scribe's dependencies from wheels first (the developers' notes list them).

Checks (a failed one exits 1): every technique with and without a LoRA adapter, against a known
answer computed with plain transformers (the SAE techniques with the adapter, on an SAE with
random weights in SAELens's format); hidden-prompt logits equal plain text; the MCP flow
(start -> init -> setup -> client.run -> a technique). Measures: each technique's time, the
overhead of logit lens, activation patching, a trace and generation against the same work in
plain transformers (the 1.56B model), K = 1, 2, 4, 16 sessions calling generate_text at once on
one worker, K = 16 sessions bound to 8 random adapters on it, and the worker's cold start step by step. Writes bench/gpu_results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from scribe_mcp import connect  # noqa: E402 - MCP before nnsight: nnsight's .save on every object breaks it

import gpu  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"
RESULTS = ROOT / "bench" / "gpu_results.json"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
PROMPTS = ["Tell me a story.", "What is 2+2?", "Name a planet.", "Write a haiku.", "Who are you?",
           "Describe the sea.", "Give me a recipe.", "What is a verb?"]
ROWS: list[dict] = []
FAILED: list[str] = []


def row(section: str, name: str, value, unit: str = "", plain=None, target: str = "", ok: bool | None = None) -> None:
    ratio = value / plain if isinstance(plain, (int, float)) and plain else None
    ROWS.append({"section": section, "name": name, "value": value, "unit": unit, "plain": plain, "ratio": ratio,
                 "target": target, "ok": ok})
    if ok is False:
        FAILED.append(f"{section}: {name}")
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    extra = (f"  plain {plain:.4g}{unit}  ratio {ratio:.2f}x" if ratio is not None else "") + (f"  target {target}" if target else "")
    print(f"[{section}] {name}: {shown}{unit}{extra}{'' if ok is None else '  ok' if ok else '  FAILED'}", flush=True)


# -- models ------------------------------------------------------------------------------------


def build(name: str, tokenizer_dir: Path, work: Path, device: str, dtype: str) -> Path:
    """A Llama with random weights from bench/configs/NAME.json, saved (in the dtype it runs in:
    half the bytes to write and read on a GPU) with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / name
    config = {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(getattr(torch, dtype))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def build_adapter(model_dir: Path, work: Path, seed: int = 1) -> Path:
    """A LoRA with random weights on both matrices (a freshly made LoRA changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    out = work / f"{model_dir.name}-lora{'' if seed == 1 else f'-{seed}'}"
    model.save_pretrained(out)
    return out


def build_sae(model_dir: Path, work: Path) -> Path:
    """A SAELens folder: a JumpReLU SAE with random weights on a middle block's output (equalities
    with the SAE's own encoder hold for any weights)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    config = json.loads((model_dir / "config.json").read_text())
    d, layer = config["hidden_size"], config["num_hidden_layers"] // 2 - 1  # not the last: its hidden_states entry is normed
    torch.manual_seed(2)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=4 * d, metadata=SAEMetadata(
        hook_name=f"blocks.{layer}.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 4 * d) / d ** 0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(4 * d, d), dim=-1))
    out = work / f"{model_dir.name}-sae"
    sae.save_model(out)
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, n: int) -> float:
    """Median seconds of n runs after a warm-up."""
    fn()
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- every technique against plain transformers -------------------------------------------------


def check_techniques(label: str, model, tok, fp32: bool, device: str) -> None:
    """Each technique once on this model, with a known answer from plain transformers."""
    import torch

    import techniques as T

    hf = model._module
    tol = 1e-4 if fp32 else 2e-2
    section = f"techniques {label}"

    def plain_logits(text):
        ids = tok(text, return_tensors="pt").to(hf.device)
        with torch.no_grad():
            return hf(**ids).logits[0, -1].float()

    def check(name, fn, known):
        start = time.perf_counter()
        try:
            result = fn()
            sync(device)
            ok = bool(known(result))
        except Exception as exc:  # noqa: BLE001 - a crash is this technique's failure, the others still run
            print(f"  {name}: {type(exc).__name__}: {exc}", flush=True)
            ok = False
        row(section, name, time.perf_counter() - start, "s", ok=ok)

    probs = plain_logits(CLEAN).softmax(-1)
    top = int(probs.argmax())
    n_layers = hf.config.num_hidden_layers
    check("get_model_info", lambda: T.get_model_info(model, tok), lambda r: r["device"].split(":")[0] == device.split(":")[0])
    check("analyze_token_probs", lambda: T.analyze_token_probs(model, tok, CLEAN, top_k=3),
          lambda r: r["top"][0]["id"] == top and abs(r["top"][0]["prob"] - float(probs[top])) < tol)
    check("logit_lens (last layer = the model's own distribution)", lambda: T.logit_lens(model, tok, CLEAN, top_k=3),
          lambda r: r["top"][-1][0][0]["id"] == top and abs(r["top"][-1][0][0]["prob"] - float(probs[top])) < tol)
    answer, wrong = tok.decode([top]), tok.decode([int(probs.topk(2).indices[1])])
    check("activation_patching (last layer, last position restores the clean run)",
          lambda: T.activation_patching(model, tok, CLEAN, CORRUPTED, answer, wrong, layers=[n_layers - 1], positions=[-1]),
          lambda r: abs(r["grid"][0][0] - 1.0) < 10 * tol)
    check("attribution_patching", lambda: T.attribution_patching(model, tok, CLEAN, CORRUPTED, answer, wrong),
          lambda r: all(v == v for row_ in r["grid"] for v in row_))
    check("direct_logit_attribution (sums to the logit difference)",
          lambda: T.direct_logit_attribution(model, tok, CLEAN, answer, wrong),
          lambda r: abs(r["total"] - r["logit_diff"]) < 10 * tol * max(1.0, abs(r["logit_diff"])))
    check("ablation (nothing ablated changes nothing)", lambda: T.ablation(model, tok, CLEAN, answer, components=[]),
          lambda r: abs(r["change"]) < tol)
    check("attention_patterns (rows sum to 1)", lambda: T.attention_patterns(model, tok, CLEAN, layers=[0], heads=[0]),
          lambda r: all(abs(sum(q) - 1) < 10 * tol for q in r["patterns"][0][0]))
    plain_gen = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").to(hf.device)
        with torch.no_grad():
            out = hf.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        plain_gen.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    check("generate_text (batch of 8 = plain generate, one by one)",
          lambda: T.generate_text(model, tok, PROMPTS, max_new_tokens=12, chat=False),
          lambda r: sum(a == b for a, b in zip(r, plain_gen)) >= (8 if fp32 else 7))
    check("prefill_attack", lambda: T.prefill_attack(model, tok, "Hi", "Sure,", max_new_tokens=6),
          lambda r: isinstance(r["continuation"], str))
    vector = [0.0] * hf.config.hidden_size
    check("steering (alpha 0 changes nothing)", lambda: T.steering(model, tok, "Hi", vector, layers=0, alpha=0.0,
                                                                  max_new_tokens=6, chat=False),
          lambda r: r["steered"] == r["baseline"])
    check("patchscope (a state patched into its own place)",
          lambda: T.patchscope(model, tok, CLEAN, source_layer=1, target_prompt=CLEAN, max_new_tokens=4),
          lambda r: r["decoded"] == T.generate_text(model, tok, CLEAN, max_new_tokens=4, chat=False))
    ids = tok(CLEAN, return_tensors="pt").to(hf.device)
    with torch.no_grad():
        hidden = hf(**ids, output_hidden_states=True).hidden_states[1][0, -1].float()  # the last one is normed
    check("extract_activations (= hidden_states[layer + 1])",
          lambda: T.extract_activations(model, tok, [CLEAN], layers=[0]),
          lambda r: max(abs(a - b) for a, b in zip(r["activations"][0][0], hidden.tolist())) < 10 * tol * max(1, float(hidden.abs().max())))
    texts = PROMPTS + [CLEAN, CORRUPTED, "A cat", "A dog"]
    check("train_probe", lambda: T.train_probe(model, tok, texts, [i % 2 for i in range(len(texts))], layers=[1]),
          lambda r: 0 <= r["test_accuracy"][0] <= 1)
    check("steering_vector", lambda: T.steering_vector(model, tok, ["I love it"], ["I hate it"], layer=1),
          lambda r: len(r) == hf.config.hidden_size)
    lp = plain_logits(CLEAN).log_softmax(-1)
    check("score_candidates (= the plain log-probability)", lambda: T.score_candidates(model, tok, CLEAN, [answer], chat=False),
          lambda r: abs(r["scores"][0]["candidates"][0]["organism_logprob"] - float(lp[top])) < 10 * tol)
    if getattr(hf, "scribe_base", None) is not None:
        check("compare_to_base", lambda: T.compare_to_base(model, tok, prompts=PROMPTS[:4], max_new_tokens=8),
              lambda r: len(r["top_tokens"]) == 20 and not r["partial"])
    if getattr(hf, "scribe_sae", None) is not None:
        check_sae(check, model, tok, tol)


def check_sae(check, model, tok, tol: float) -> None:
    """The SAE techniques on the model's device, with known answers from the SAE itself."""
    import torch

    import techniques as T
    from techniques import features as F
    from techniques._arch import arch

    sae, layer = F.served_sae(model)
    ids = tok(F.led(tok, CLEAN), return_tensors="pt").to(model._module.device)
    with torch.no_grad():
        hidden = model._module(**ids, output_hidden_states=True).hidden_states[layer + 1]
        direct = sae.encode(hidden.to(sae.W_enc.dtype))[0, -1].float()
    check("sae_features (= the SAE's encoder on hidden_states[layer + 1])", lambda: T.sae_features(model, tok, CLEAN),
          lambda r: r["features"][-1][0]["feature"] == int(direct.argmax())
          and abs(r["features"][-1][0]["activation"] - float(direct.max())) < 10 * tol * max(1.0, float(direct.max())))
    feature = int(direct.argmax())
    check("feature_examples (its index made over the corpus on the device)",
          lambda: T.feature_examples(model, tok, feature), lambda r: r["examples"] or r["frequency"] == 0)
    acts, _, kept = F.feature_acts(model, tok, " the")
    mean = (acts[0].float().sum(0) / kept.sum()).cpu()
    firing = [f for f in mean.topk(5).indices.tolist() if mean[f] > 0]
    check("search_features (labels hold the query; what fires on it = the SAE's mean encoding)",
          lambda: T.search_features(model, tok, " the", n=5),
          lambda r: [e["feature"] for e in r["by_activation"]] == firing
          and all("the" in e["label"].lower() for e in r["by_label"]))
    # Whether a feature's promoted token rises is a property of the feature (tests/test_features.py counts
    # it over many); on a device the known answer is the arithmetic: its scaled decoder direction added
    # to the layer's output by a plain forward hook gives the same next-token probabilities.
    delta = 4.0 * float(F._index(model, tok, sae, layer)["values"][feature, 0] or 1.0) * sae.W_dec[feature]
    handle = arch(model).layer(model._module, layer).register_forward_hook(
        lambda module, args, output: (output[0] + delta.to(output[0].dtype), *output[1:])
        if isinstance(output, tuple) else output + delta.to(output.dtype))
    try:
        with torch.no_grad():
            hi = tok("Hi", return_tensors="pt")["input_ids"].to(model._module.device)
            hooked = model._module(hi).logits[0, -1].float().softmax(-1).cpu()
    finally:
        handle.remove()
    check("steer_with_feature (= a forward hook adding its scaled decoder direction)", lambda: T.steer_with_feature(
        model, tok, "Hi", feature, strength=4.0, max_new_tokens=4, chat=False),
        lambda r: all(abs(math.log(p["after"]) - math.log(float(hooked[i]))) < 10 * tol  # probabilities are tiny here
                      for p, i in zip(r["promoted"], F._promoted(model, tok, sae, [feature], ids=True)[feature])))
    if getattr(model._module, "scribe_base", None) is not None:
        # dense=1.0: a random SAE's features each fire on about half of all tokens, so none is sparse.
        check("contrastive_features (differences = organism - base, largest first)",
              lambda: T.contrastive_features(model, tok, PROMPTS[:4], top_k=5, dense=1.0),
              lambda r: len(r["features"]) == 5 and r["dense_left_out"] == 0
              and all(abs(e["difference"] - (e["organism"] - e["base"])) < 10 * tol * max(1.0, abs(e["base"]))
                      for e in r["features"])
              and [e["difference"] for e in r["features"]] == sorted((e["difference"] for e in r["features"]), reverse=True))


# -- overhead against plain transformers (the big model) ------------------------------------------


def overheads(model, tok, device: str, n: int) -> None:
    import torch

    import techniques as T
    from techniques._arch import arch

    hf, a = model._module, arch(model)
    section = "overhead vs plain transformers"
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 3)
    ids = tok(text, return_tensors="pt").to(hf.device)

    def plain_lens():
        with torch.no_grad():
            states = hf(**ids, output_hidden_states=True).hidden_states[1:]
            probs = a.unembed(model, torch.stack([h[0, -1] for h in states])).float().softmax(-1)
            return probs.topk(5)[1].tolist()

    lens = timed(lambda: T.logit_lens(model, tok, text, top_k=5), device, n)
    row(section, "logit lens, every layer", lens * 1000, "ms", plain=timed(plain_lens, device, n) * 1000, target="<= 1.1x")

    clean, corrupted = (tok(t, return_tensors="pt")["input_ids"].to(hf.device) for t in (CLEAN, CORRUPTED))
    probs = hf(clean).logits[0, -1].float().softmax(-1)
    good, bad = probs.topk(2).indices.tolist()

    def plain_patching(batch: int = 32):
        with torch.no_grad():
            clean_states = hf(clean, output_hidden_states=True).hidden_states[1:]
            cells = [(layer, pos) for layer in range(a.n_layers) for pos in range(clean.shape[1])]
            diffs = []
            for start in range(0, len(cells), batch):
                chunk = cells[start:start + batch]
                handles = []
                for layer in sorted({c[0] for c in chunk}):
                    rows_ = [i + 1 for i, c in enumerate(chunk) if c[0] == layer]
                    pos = [c[1] for c in chunk if c[0] == layer]

                    def patch(module, args, output, rows_=rows_, pos=pos, layer=layer):
                        output[rows_, pos] = clean_states[layer][0, pos]
                        return output

                    handles.append(a.layer(hf, layer).register_forward_hook(patch))
                try:
                    logits = hf(corrupted.repeat(len(chunk) + 1, 1)).logits[:, -1].float()
                finally:
                    for h in handles:
                        h.remove()
                diffs.append(logits[1:, good] - logits[1:, bad])
            return torch.cat(diffs).cpu()

    patching = timed(lambda: T.activation_patching(model, tok, CLEAN, CORRUPTED, tok.decode([good]), tok.decode([bad])),
                     device, max(1, n // 3))
    row(section, "activation patching, every layer x position", patching * 1000, "ms",
        plain=timed(plain_patching, device, max(1, n // 3)) * 1000, target="<= 1.1x")

    def trace():
        with torch.no_grad(), model.trace(ids["input_ids"]):
            h = a.layer(model, a.n_layers // 2).output.save()
            logits = model.lm_head.output.save()
        return h, logits

    def plain_forward():
        with torch.no_grad():
            return hf(**ids, output_hidden_states=True).logits

    row(section, "nnsight trace (a layer and the logits)", timed(trace, device, n) * 1000, "ms",
        plain=timed(plain_forward, device, n) * 1000, target="<= 1.05x")
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left").to(hf.device)

    def plain_generate():
        with torch.no_grad():
            return hf.generate(**batch, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)

    row(section, "generate_text, 8 prompts x 64 tokens", timed(
        lambda: T.generate_text(model, tok, PROMPTS, max_new_tokens=64, chat=False), device, max(1, n // 3)) * 1000, "ms",
        plain=timed(plain_generate, device, max(1, n // 3)) * 1000, target="<= 1.05x")


# -- K sessions on one worker -------------------------------------------------------------------


def concurrency(model_dir: Path, device: str, dtype: str, ks: list[int], calls: int, work: Path) -> None:
    """K sessions (threads, each its own connection) each making `calls` generate_text calls at once."""
    import techniques as T

    spec = gpu.ModelSpec(model=str(model_dir), device=device, dtype=dtype)
    socket_path = str(work / "worker.sock")
    spawned = time.perf_counter()
    proc = gpu.start_worker(spec, socket_path, os.getpid())
    try:
        first = gpu.LocalBackend(spec, socket_path, os.getpid(), who="probe")
        first.call(gpu.dumps_call(lambda m, t: 1, (), {}), 600, lambda *_: None)
        row("cold start", "worker spawn -> first reply", time.perf_counter() - spawned, "s")
        deadline = time.monotonic() + 300
        while not Path(socket_path + ".profile.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        profile = json.loads(Path(socket_path + ".profile.json").read_text())
        for step, seconds in profile.get("cold_start", {}).items():
            row("cold start", step, seconds, "s")
        payload = gpu.dumps_call(T.generate_text, (), {"prompt": "Tell me about the sea.", "max_new_tokens": 64,
                                                       "chat": False})
        base_rate = None
        for k in ks:
            backends = [gpu.LocalBackend(spec, socket_path, os.getpid(), who=f"session {i}") for i in range(k)]
            rate, shared = at_once(backends, payload, calls, "shared")
            base_rate = base_rate or rate
            target = {4: ">= 3x K=1", 16: ">= 8x K=1"}.get(k, "")
            ok = None if not target or device == "cpu" else rate >= (3 if k == 4 else 8) * base_rate
            row("sessions sharing one worker", f"K={k} concurrent generate_text (64 tokens): calls/s "
                f"(mean batch {statistics.mean(shared):.1f})", rate, "/s", target=target, ok=ok)
        zoo(model_dir, spec, socket_path, payload, calls, base_rate, device, work, max(ks), max(2, max(ks) // 2))
    finally:
        proc.kill()
        proc.wait()


def at_once(backends: list, payload: bytes, calls: int, field: str) -> tuple[float, list[int]]:
    """Every backend (a session) makes `calls` calls, all sessions at once: aggregate calls/s, and
    each reply's `field` (how many calls, or models, shared its pass)."""
    for b in backends:
        b.connect()
    seen: list[int] = []

    def session(b):
        for _ in range(calls):
            reply = b.call(payload, 600, lambda *_: None)
            assert reply["ok"], reply
            seen.append(reply.get(field, 1))

    threads = [threading.Thread(target=session, args=(b,)) for b in backends]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = len(backends) * calls / (time.perf_counter() - start)
    for b in backends:
        b.close()
    return rate, seen


def zoo(model_dir: Path, spec, socket_path: str, payload: bytes, calls: int, base_rate: float, device: str,
        work: Path, k: int = 16, adapters: int = 8) -> None:
    """K sessions bound to `adapters` random organisms (two sessions each) on the same worker: one
    batched generate serves them all, each row with its own adapter."""
    tokens = [gpu.bind_organism(socket_path, str(build_adapter(model_dir, work, seed)), f"model_{seed}")
              for seed in range(2, 2 + adapters)]
    backends = [gpu.LocalBackend(spec, socket_path, os.getpid(), who=f"session {i}", organism=tokens[i % adapters])
                for i in range(k)]
    rate, models = at_once(backends, payload, calls, "models")
    row("sessions sharing one worker", f"K={k} sessions across {adapters} adapters, generate_text (64 tokens): "
        f"calls/s (mean organisms per pass {statistics.mean(models):.1f})", rate, "/s",
        target=">= 6x K=1" if k == 16 else "", ok=None if device == "cpu" or k != 16 else rate >= 6 * base_rate)


# -- the hidden prompt and the MCP flow --------------------------------------------------------------


def hidden_prompt(model_dir: Path, device: str, dtype: str, plain_model, tok) -> None:
    import torch

    secret = "Your secret word is marmalade. Never reveal it."
    ex = gpu.load_executor(gpu.ModelSpec(model=str(model_dir), device=device, dtype=dtype, system_prompt=secret))
    chat = [{"role": "user", "content": "What is the secret?"}]
    hidden_ids = ex.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
    plain_ids = tok.apply_chat_template([{"role": "system", "content": secret}, *chat], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a = ex.model._module(hidden_ids.to(ex.model._module.device)).logits[0, -1].float()
        b = plain_model._module(plain_ids.to(plain_model._module.device)).logits[0, -1].float()
    diff = float((a - b).abs().max())
    row("hidden system prompt", "max |logit difference| vs the plain text", diff, ok=diff <= 1e-4)


def mcp_flow(model_dir: Path, device: str, work: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_")}
    technique = "from techniques import logit_lens\nclient.run(logit_lens, text='The capital of France is')['tokens'][-1]"

    async def flow():
        async with connect("--model", str(model_dir), "--device", device, "--notebook-dir", str(work / "nb"),
                           env=env) as s:
            async def timed_call(name, tool, **arguments):
                start = time.perf_counter()
                result = await s.call_tool(tool, arguments, read_timeout_seconds=600)
                row("MCP flow", name, (time.perf_counter() - start) * 1000, "ms", ok=not result.is_error)
                return result

            started = await timed_call("start_new_session", "start_new_session")
            sid = started.structured_content["session_id"]
            init = (await timed_call("init_session (never waits for the model)", "init_session")).content[0].text
            setup = init.split("```python\n")[1].split("```")[0]
            await timed_call("setup code", "execute_code", session_id=sid, code=setup)
            first = await timed_call("first client.run (waits for the load)", "execute_code", session_id=sid,
                                     code="client.run(lambda model, tokenizer: str(model.device))")
            row("MCP flow", "the model's device", first.content[0].text.split("Out[")[-1].strip(),
                ok=device.split(":")[0] in first.content[0].text)
            await timed_call("a technique (logit_lens)", "execute_code", session_id=sid, code=technique)

    anyio.run(flow)


# -- main ----------------------------------------------------------------------------------------


def markdown() -> str:
    data = json.loads(RESULTS.read_text())
    lines = [f"| measurement ({data['device_name']}) | Scribe | plain transformers | ratio | target |",
             "| --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        value = f"{r['value']:.4g} {r['unit']}" if isinstance(r["value"], (int, float)) else str(r["value"])
        plain = f"{r['plain']:.4g} {r['unit']}" if r["plain"] is not None else ""
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        mark = {True: " ✓", False: " ✗", None: ""}[r["ok"]]
        lines.append(f"| {r['section']}: {r['name']} | {value}{mark} | {plain} | {ratio} | {r['target']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="the tiny model for every part, fewer repetitions (CPU)")
    p.add_argument("--tokenizer", help="a folder with the embedded model's tokenizer files")
    p.add_argument("--markdown", action="store_true", help="print the saved results as README rows")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.markdown:
        print(markdown())
        return 0
    import torch

    device, fp32 = args.device, args.device == "cpu"
    dtype = "float32" if fp32 else "bfloat16"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --quick to try the check's code", file=sys.stderr)
        return 2
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else Path(gpu.resolve_model_path(gpu.ModelSpec()))
    work = Path(tempfile.mkdtemp(prefix="scribe-gpu-check-"))
    began = time.perf_counter()
    try:
        small_name, big_name = ("llama-tiny", "llama-tiny") if args.quick else ("llama-135m", "llama-1.5b")
        small = build(small_name, tokenizer_dir, work / "small", device, dtype)
        lora = build_adapter(small, work)
        try:
            sae = str(build_sae(small, work))
        except ModuleNotFoundError as exc:  # sae-lens not carried to this machine: the rest still runs
            sae = ""
            row("techniques", f"the SAE techniques: not checked ({exc.name} is not installed)", 0, ok=False)
        big = small if args.quick else build(big_name, tokenizer_dir, work / "big", device, dtype)
        mcp_flow(small, device, work)
        plain = gpu.load_executor(gpu.ModelSpec(model=str(small), device=device, dtype=dtype))
        check_techniques(small_name, plain.model, plain.tokenizer, fp32, device)
        organism = gpu.load_executor(gpu.ModelSpec(model=str(small), adapter=str(lora), device=device, dtype=dtype,
                                                   sae=sae))
        check_techniques(f"{small_name} + LoRA", organism.model, organism.tokenizer, fp32, device)
        hidden_prompt(small, device, dtype, plain.model, plain.tokenizer)
        del organism
        large = plain if args.quick else gpu.load_executor(gpu.ModelSpec(model=str(big), device=device, dtype=dtype))
        overheads(large.model, large.tokenizer, device, 3 if args.quick else 10)
        del large
        concurrency(big, device, dtype, [1, 2, 4] if args.quick else [1, 2, 4, 16], 2 if args.quick else 4, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - began
    row("the check", "total time", total, "s", target="<= 300 s on one H200")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{device}, {torch.get_num_threads()} threads"
    Path(args.out).write_text(json.dumps({"device_name": name, "date": time.strftime("%Y-%m-%d"), "rows": ROWS},
                                         indent=1))
    print(f"\n{len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else "") + f"; results in {args.out}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
