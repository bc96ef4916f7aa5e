"""What auditors of a model organism asked for beyond one greedy answer: how often a behaviour
shows over many samples, what an organism's adapter writes into the residual stream, and the
adapter turned up, down or off on chosen layers."""

from __future__ import annotations

import math
import re

from ._batch import Generate, batchable

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson(successes: int, n: int) -> list[float]:
    """The Wilson score 95% interval of successes/n (tests check it against statsmodels')."""
    if n == 0:
        return [0.0, 1.0]
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@batchable
def sample_rates(model, tokenizer, prompts, pattern: str, samples: int = 32, temperature: float = 1.0,
                 max_new_tokens: int = 40, seed: int | None = 0, chat: bool | None = None,
                 system_prompt: str | None = None):
    """How often a behaviour shows: `samples` sampled answers per prompt, the share matching a regex.

    prompts: a string or a list; every prompt's samples are one batched generate (calls other
        sessions make at the same time with the same temperature and seed share it).
    pattern: a regular expression, matched case-insensitively anywhere in an answer (a keyword
        is a regex too). seed: sampling reproduces for a call alone (None: unseeded).
    Returns {"pattern", "samples", "temperature", "rates": [{"prompt", "matches", "samples",
    "rate", "ci95", "matching", "other"}]}: ci95 the Wilson 95% interval, a few answers of each kind.
    """
    from ._arch import chat_prompt

    asked = [prompts] if isinstance(prompts, str) else list(prompts)
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except (re.error, TypeError) as exc:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature!r} (0 would repeat one greedy answer)")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [chat_prompt(tokenizer, p, system_prompt) if chat else p for p in asked]
    answers = yield Generate(tuple(t for t in texts for _ in range(samples)), max_new_tokens, temperature, seed=seed)
    rates = []
    for i, prompt in enumerate(asked):
        mine = answers[i * samples:(i + 1) * samples]
        hits, misses = [], []
        for answer in mine:
            (hits if regex.search(answer) else misses).append(answer)
        rates.append({"prompt": prompt, "matches": len(hits), "samples": samples, "rate": len(hits) / samples,
                      "ci95": wilson(len(hits), samples), "matching": hits[:3], "other": misses[:3]})
    return {"pattern": pattern, "samples": samples, "temperature": temperature, "rates": rates}


def _lora_layers(model):
    """(layer index, module path, module, adapter name) of each LoRA layer whose adapter is active:
    the session's own organism, under its opaque name."""
    from ._arch import raw

    found = []
    for path, module in raw(model).named_modules():
        if not hasattr(module, "lora_A") or module.disable_adapters:  # off: `with base_model(model)`
            continue
        names = [a for a in module.active_adapters if a in module.lora_A]
        numbers = re.findall(r"\.(\d+)\.", f".{path}.")
        if names and numbers:
            found.append((int(numbers[0]), path, module, names[0]))
    if not found:
        raise ValueError("this model has no adapter (LoRA) active: these techniques read or scale an organism's "
                         "adapter (an experiment with `adapter`, or an organism served by `audit`)")
    return found


def adapter_directions(model, tokenizer, directions: int = 2, top_k: int = 20,
                       modules: tuple[str, ...] = ("o_proj", "down_proj")):
    """What an organism's adapter writes: its weight delta's top singular directions read as tokens.

    For each LoRA layer whose output joins the residual stream (`modules`), the delta
    B·A·scaling is decomposed; each of its top `directions` output directions (both signs: a
    singular vector's sign is arbitrary) goes through the final norm's gain and the unembedding,
    as the logit lens reads a residual. Across all of them, tokens are ranked by how many
    readings have them in their top_k: a planted word recurs layer after layer.
    Returns {"tokens": [{"token", "readings"}], "layers": [{"layer", "module", "singular_values",
    "directions": [{"positive", "negative"}]}], "readings"}.
    """
    import torch

    from ._arch import raw

    if not isinstance(directions, int) or directions < 1 or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"directions and top_k must be positive integers, got {directions!r} and {top_k!r}")
    hf = raw(model)
    unembed = hf.get_output_embeddings().weight.detach().float()
    norm = getattr(getattr(hf, "model", None), "norm", None) or getattr(getattr(hf, "transformer", None), "ln_f", None)
    gain = norm.weight.detach().float() if norm is not None else torch.ones(unembed.shape[1], device=unembed.device)
    counts: dict[int, int] = {}
    layers, readings = [], 0
    with torch.no_grad():
        for layer, path, module, name in _lora_layers(model):
            if not path.endswith(tuple(modules)):
                continue
            # B·A has rank r: its SVD from B's QR and an r-row SVD, not one of the full matrix
            q, r = torch.linalg.qr(module.lora_B[name].weight.detach().float().cpu())
            small, s, _ = torch.linalg.svd(r @ module.lora_A[name].weight.detach().float().cpu() * module.scaling[name],
                                           full_matrices=False)
            top = (q @ small)[:, :directions].to(unembed.device)
            logits = unembed @ (top * gain[:, None])  # [vocab, directions], where the unembedding lives
            read = []
            for i in range(top.shape[1]):
                pos, neg = logits[:, i].topk(top_k).indices.tolist(), (-logits[:, i]).topk(top_k).indices.tolist()
                for ids in (pos, neg):
                    readings += 1
                    for token in ids:
                        counts[token] = counts.get(token, 0) + 1
                read.append({"positive": tokenizer.convert_ids_to_tokens(pos)[:10],
                             "negative": tokenizer.convert_ids_to_tokens(neg)[:10]})
            layers.append({"layer": layer, "module": ".".join(path.split(".")[-2:]),
                           "singular_values": [round(float(v), 4) for v in s[:directions]], "directions": read})
    if not layers:
        raise ValueError(f"the adapter has no LoRA layer in {list(modules)}: pass modules= the projections it adapts")
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top_k]
    return {"tokens": [{"token": tokenizer.decode([t]), "readings": c} for t, c in ranked], "layers": layers,
            "readings": readings}


def amplify_adapter(model, tokenizer, prompt: str, alpha: float = 2.0, layers=None, max_new_tokens: int = 40,
                    chat: bool | None = None, system_prompt: str | None = None):
    """Generate with the organism's adapter scaled by alpha, on every layer or only on `layers`.

    alpha 1 is the organism as served, 0 switches the adapter off on those layers (the base
    there), above 1 amplifies what fine-tuning changed (model-diffing amplification) so a weak
    behaviour shows. Scales peft's own per-adapter `scaling` and puts it back after, whatever
    happens. Greedy.
    Returns {"prompt", "alpha", "layers", "organism", "scaled"}: the organism's answer and the scaled one.
    """
    import torch

    from ._arch import chat_prompt, encode, raw

    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    lora = _lora_layers(model)
    present = sorted({layer for layer, *_ in lora})
    chosen = present if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    missing = [n for n in chosen if n not in present]
    if missing:
        raise ValueError(f"layers {missing} have no adapter: it adapts layers {present[0]}..{present[-1]}")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    inputs = encode(model, tokenizer, [chat_prompt(tokenizer, prompt, system_prompt) if chat else prompt])
    width = inputs["input_ids"].shape[1]

    def answer() -> str:
        with torch.no_grad():
            out = raw(model).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, width:], skip_special_tokens=True)

    organism = answer()
    scaled = [(module, name, module.scaling[name]) for layer, _, module, name in lora if layer in chosen]
    try:
        for module, name, scale in scaled:
            module.scaling[name] = scale * alpha
        text = answer()
    finally:
        for module, name, scale in scaled:
            module.scaling[name] = scale
    return {"prompt": prompt, "alpha": alpha, "layers": chosen, "organism": organism, "scaled": text}
