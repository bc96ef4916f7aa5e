"""Sparse-autoencoder (SAE) features of the served model: which fire on a text, where each fires
most in a corpus, which match a word, which an organism has more of than its base, and steering
with one. They need an SAE served with the model (an experiment's `sae:`, the server's --sae;
the embedded model's own is built by `saes.py build`); `raw(model).scribe_sae.get()` is it.

A feature is named by its index. Its label says what it fires on (the tokens of its strongest
activations in the corpus), how often (its share of the corpus's tokens) and what it promotes
(the tokens its decoder direction raises through the model's final norm and unembedding).
Positions whose residual stream is massive (MASSIVE times the text's median norm: the first
token's, in most models, often hundreds of times the rest) are left out, as when the SAE was
trained: they carry the model's attention sink, not the text.
"""

from __future__ import annotations

import re

from ._result import Result

CONTEXT = 128  # tokens per corpus text
EXAMPLES = 8  # strongest activations kept per feature in the index
PARAGRAPHS = 300  # of pydoc's documentation topics, for an SAE whose folder has no corpus
MASSIVE = 5.0
DENSE = 0.1  # contrastive_features leaves out features firing on more of the corpus's tokens than this
HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def paragraphs(count: int = PARAGRAPHS, seed: int = 0) -> list[str]:
    """English prose that every Python installation ships: its documentation's topics, shuffled."""
    import random

    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        for part in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(part.split())
            if len(text) > 200 and not text.startswith(("*", ">>>", "|")) and text.count("(") < 6:
                found.append(text)
    random.Random(seed).shuffle(found)
    return found[:count]


def served_sae(model):
    """(sae, layer): the served SAE and the block whose output it reads; ValueError if none."""
    from ._arch import raw

    slot = getattr(raw(model), "scribe_sae", None)
    if slot is None:
        raise ValueError("this model is served without a sparse autoencoder: give the experiment an `sae:` (a SAELens "
                         "folder, RELEASE:SAE_ID, or `embedded` for the embedded model's) or start the server with --sae")
    sae = slot.get()
    hook = sae.cfg.metadata.hook_name or ""
    match = HOOK.fullmatch(hook)
    if not match or (match.group(2) == "pre" and match.group(1) == "0"):
        raise ValueError(f"the SAE reads {hook!r}: these techniques know residual-stream SAEs "
                         "(blocks.L.hook_resid_post, blocks.L.hook_resid_pre with L > 0)")
    layer = int(match.group(1)) - (match.group(2) == "pre")
    return sae, layer


def _check_feature(sae, feature) -> int:
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature!r}: the SAE has features 0..{sae.cfg.d_sae - 1}")
    return feature


def ordinary(hidden, mask):
    """Which positions an SAE reads ([batch, positions] bool): real tokens whose residual norm is
    under MASSIVE times the median of their text's."""
    import torch

    norms = hidden.float().norm(dim=-1)
    real = mask.bool().to(norms.device)
    median = norms.masked_fill(~real, float("nan")).nanmedian(dim=1).values
    return real & (norms <= MASSIVE * median[:, None])


def led(tokenizer, text: str) -> str:
    """`text` after the tokenizer's BOS token where the tokenizer does not put it there itself:
    the massive first position is then the BOS, and the text's own first token is read too."""
    bos = tokenizer.bos_token
    if not bos or text.startswith(bos) or tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text
    return bos + text


def feature_acts(model, tokenizer, texts, sae=None, layer=None):
    """(acts [batch, positions, d_sae], input_ids, kept [batch, positions]) of one text or a list,
    each `led`: the SAE's encoder on the traced output of its layer (left-padded rows); padding and
    massive positions are zeroed."""
    import torch

    from ._arch import arch, encode

    if sae is None:
        sae, layer = served_sae(model)
    a = arch(model)
    inputs = encode(model, tokenizer, [led(tokenizer, t) for t in ([texts] if isinstance(texts, str) else texts)])
    with torch.no_grad():
        with model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"]) as tracer:
            hidden = a.layer(model, layer).output.save()
            tracer.stop()  # nothing past this layer is needed
        hidden = hidden.to(sae.W_enc.device, sae.W_enc.dtype)
        keep = ordinary(hidden, inputs["attention_mask"])
        acts = sae.encode(hidden) * keep[..., None]
    return acts, inputs["input_ids"], keep


def feature_index(d_sae: int, encoded) -> dict:
    """Each feature's EXAMPLES strongest activations over a corpus and how often it fires.
    `encoded` yields per text its feature activations [positions, d_sae] (zero where left out);
    `where` is [feature, example, (text, position)]."""
    import torch

    values = torch.zeros(d_sae, EXAMPLES, device="cpu")  # the index is kept on the CPU, whatever the model's device
    where = torch.zeros(d_sae, EXAMPLES, 2, dtype=torch.int32, device="cpu")
    fired, total = torch.zeros(d_sae, device="cpu"), 0
    with torch.no_grad():
        for text, acts in enumerate(encoded):
            f = acts.T.float().cpu()  # features x positions
            fired += (f > 0).sum(1)
            total += f.shape[1]
            pos = torch.arange(f.shape[1], dtype=torch.int32, device="cpu").expand(f.shape[0], -1)
            places = torch.cat([where, torch.stack([torch.full_like(pos, text), pos], -1)], 1)
            values, best = torch.cat([values, f], 1).topk(EXAMPLES, dim=1)
            where = places.gather(1, best[..., None].expand(-1, -1, 2))
    return {"values": values, "where": where, "frequency": fired / max(total, 1)}


def _index(model, tokenizer, sae, layer) -> dict:
    """The SAE's feature index and corpus: saved in its folder (saes.py), else made once over
    `paragraphs()` and kept with the loaded SAE."""
    import json

    import torch

    if getattr(sae, "scribe_index", None) is None:
        folder = getattr(sae, "scribe_folder", None)
        if folder is not None and (folder / "index.pt").is_file() and (folder / "corpus.json").is_file():
            index = torch.load(folder / "index.pt")
            index["tokens"] = json.loads((folder / "corpus.json").read_text())["tokens"]
        else:
            texts = [tokenizer.decode(tokenizer(t, truncation=True, max_length=CONTEXT)["input_ids"])
                     for t in paragraphs()]
            tokens = []
            index = feature_index(sae.cfg.d_sae, _encoded(model, tokenizer, texts, sae, layer, tokens))
            index["tokens"] = tokens
        sae.scribe_index = index
    return sae.scribe_index


def _encoded(model, tokenizer, texts: list[str], sae, layer, tokens: list):
    """Per text, its feature activations at every position, 16 texts at a time; each text's
    token ids are appended to `tokens`."""
    for i in range(0, len(texts), 16):
        acts, ids, _ = feature_acts(model, tokenizer, texts[i:i + 16], sae, layer)
        mask = tokenizer([led(tokenizer, t) for t in texts[i:i + 16]], padding=True, padding_side="left",
                         return_tensors="pt")["attention_mask"]
        for row, row_ids, row_mask in zip(acts, ids, mask.bool()):
            tokens.append(row_ids[row_mask.to(row_ids.device)].tolist())
            yield row[row_mask.to(row.device)]


def _promoted(model, tokenizer, sae, features: list[int], ids: bool = False) -> dict[int, list]:
    """The 5 tokens (or their ids) each feature's decoder direction raises most (final norm +
    unembedding), worked out for every feature once and kept with the loaded SAE."""
    import torch

    from ._arch import arch, raw

    if getattr(sae, "scribe_promoted", None) is None:
        a, param = arch(model), next(raw(model).parameters())
        top = []
        with torch.no_grad():
            for i in range(0, sae.cfg.d_sae, 256):
                direction = sae.W_dec[i:i + 256].to(param.device, param.dtype)
                top += a.unembed(model, direction).float().topk(5, dim=-1).indices.tolist()
        sae.scribe_promoted = top, [tokenizer.batch_decode([[t] for t in row]) for row in top]
    return {f: sae.scribe_promoted[0 if ids else 1][f] for f in features}


def _fires_on(tokenizer, index: dict, features: list[int]) -> dict[int, list[str]]:
    """Up to four distinct tokens of each feature's strongest activations in the corpus, worked
    out for every feature once and kept in the index."""
    if "fires_on" not in index:
        index["fires_on"] = []
        for values, places in zip(index["values"].tolist(), index["where"].tolist()):
            words = []
            for value, (text, pos) in zip(values, places):
                word = tokenizer.decode([index["tokens"][text][pos]]) if value > 0 else None
                if word is not None and word not in words:
                    words.append(word)
            index["fires_on"].append(words[:4])
    return {f: index["fires_on"][f] for f in features}


def _labels(model, tokenizer, sae, layer, features: list[int]) -> dict[int, str]:
    index = _index(model, tokenizer, sae, layer)
    fires, promotes = _fires_on(tokenizer, index, features), _promoted(model, tokenizer, sae, features)
    # How often it fires, because a dense feature (on most tokens, like a bias) can top any ranking by size alone.
    return {f: f"fires on {', '.join(map(repr, fires[f])) or '(never in the corpus)'} "
               f"({float(index['frequency'][f]):.1%} of tokens); promotes {', '.join(map(repr, promotes[f]))}"
            for f in features}


class FeaturesResult(Result):
    title = "sae_features"

    def highlights(self) -> list[str]:
        lines = []
        for token, found in list(zip(self["tokens"], self["features"]))[:24]:
            if found:
                top = found[0]
                lines.append(f"  {token!r:<14} #{top['feature']:<6} {top['activation']:.2f}  {top['label'][:70]}"
                             + (f"  (+{len(found) - 1} more)" if len(found) > 1 else ""))
        return lines


def sae_features(model, tokenizer, text: str, top_k: int = 5) -> dict:
    """The SAE features that fire most on each token of `text`, each with a readable label.

    Returns {"tokens" (after the BOS token, where the tokenizer does not add it itself),
    "features": per token a list of {"feature", "activation", "label"} (empty where left out: see
    the module's note), "layer", "d_sae"}.
    """
    sae, layer = served_sae(model)
    acts, ids, _ = feature_acts(model, tokenizer, text, sae, layer)
    values, features = acts[0].float().topk(min(top_k, sae.cfg.d_sae), dim=-1)
    rows = [[(f, v) for f, v in zip(fs, vs) if v > 0] for fs, vs in zip(features.tolist(), values.tolist())]
    labels = _labels(model, tokenizer, sae, layer, sorted({f for row in rows for f, _ in row}))
    return FeaturesResult({
        "tokens": tokenizer.batch_decode([[i] for i in ids[0].tolist()]),
        "features": [[{"feature": f, "activation": v, "label": labels[f]} for f, v in row] for row in rows],
        "layer": layer, "d_sae": sae.cfg.d_sae,
    })


class ExamplesResult(Result):
    title = "feature_examples"

    def highlights(self) -> list[str]:
        return [f"feature #{self['feature']}: {self['label']}  (fires on {self['frequency']:.2%} of corpus tokens)",
                *(f"  {e['activation']:6.2f}  {e['context']!r}" for e in self["examples"][:8])]


def feature_examples(model, tokenizer, feature: int, n: int = EXAMPLES, window: int = 12) -> dict:
    """Where a feature fires most in the SAE's corpus: its strongest activations in context.

    window: tokens of context shown before the token (which is marked «like this»).
    Returns {"feature", "label", "frequency": share of corpus tokens it fires on, "examples": list
    of {"activation", "token", "context"}}.
    """
    sae, layer = served_sae(model)
    feature = _check_feature(sae, feature)
    index = _index(model, tokenizer, sae, layer)
    examples = []
    for value, (text, pos) in zip(index["values"][feature].tolist()[:n], index["where"][feature].tolist()[:n]):
        if value <= 0:
            break
        tokens = index["tokens"][text]
        before, token = tokenizer.decode(tokens[max(0, pos - window):pos]), tokenizer.decode([tokens[pos]])
        after = tokenizer.decode(tokens[pos + 1:pos + 4])
        examples.append({"activation": value, "token": token, "context": f"{before}«{token}»{after}"})
    return ExamplesResult({"feature": feature, "label": _labels(model, tokenizer, sae, layer, [feature])[feature],
                           "frequency": float(index["frequency"][feature]), "examples": examples})


class SearchResult(Result):
    title = "search_features"

    def highlights(self) -> list[str]:
        lines = [f"labels matching {self['query']!r}:"]
        lines += [f"  #{e['feature']:<6} {e['label'][:90]}" for e in self["by_label"][:8]] or ["  (none)"]
        lines.append(f"most active on the text {self['query']!r}:")
        lines += [f"  #{e['feature']:<6} {e['activation']:.2f}  {e['label'][:80]}" for e in self["by_activation"][:8]]
        return lines


def search_features(model, tokenizer, query: str, n: int = 10) -> dict:
    """Features by what they respond to: those whose label (tokens they fire on or promote) holds
    `query`, and those that fire most on `query` read as a text.

    Returns {"query", "by_label": list of {"feature", "label"}, strongest first, "by_activation":
    list of {"feature", "activation" (mean over the text's tokens), "label"}}.
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError("search_features needs a non-empty query string")
    sae, layer = served_sae(model)
    index = _index(model, tokenizer, sae, layer)
    every = list(range(sae.cfg.d_sae))
    fires, promotes = _fires_on(tokenizer, index, every), _promoted(model, tokenizer, sae, every)
    wanted = query.strip().lower()
    matched = [f for f in every if any(wanted in w.strip().lower() for w in fires[f] + promotes[f])]
    matched.sort(key=lambda f: -float(index["values"][f, 0]))
    acts, _, keep = feature_acts(model, tokenizer, query, sae, layer)
    mean = acts[0].float().sum(0) / keep.sum().clamp(min=1)
    values, top = mean.topk(min(n, sae.cfg.d_sae))
    active = [(f, v) for f, v in zip(top.tolist(), values.tolist()) if v > 0]
    labels = _labels(model, tokenizer, sae, layer, sorted(set(matched[:n]) | {f for f, _ in active}))
    return SearchResult({"query": query, "by_label": [{"feature": f, "label": labels[f]} for f in matched[:n]],
                         "by_activation": [{"feature": f, "activation": v, "label": labels[f]} for f, v in active]})


class ContrastResult(Result):
    title = "contrastive_features"

    def highlights(self) -> list[str]:
        lines = ["features the organism's answers have more of than its base's (mean activation over answer tokens;"
                 f" {self['dense_left_out']} dense features left out):"]
        lines += [f"  #{e['feature']:<6} {e['organism']:.3f} vs {e['base']:.3f}  {e['label'][:70]}"
                  for e in self["features"][:10]]
        for pair in self["generations"][:2]:
            lines.append(f"  {pair['prompt'][:30]!r}: base {pair['base'][:40]!r} | organism {pair['organism'][:40]!r}")
        return lines


def contrastive_features(model, tokenizer, prompts: list[str] | str = "personal", top_k: int = 20,
                         max_new_tokens: int = 24, chat: bool | None = None, dense: float = DENSE) -> dict:
    """Features ranked by how much more they fire in the organism than in its base (the adapter
    switched off, or the experiment's base model): each model reads every prompt followed by its
    own greedy answer (max_new_tokens), and a feature's activation is averaged over the answer's
    tokens, as that model reads them.

    prompts: your own list, or a set by name: "personal" (default), "neutral" or "factual".
    chat: wrap each prompt in the chat template (default: when there is one).
    dense: features firing on more than this share of the SAE corpus's tokens are left out of the
    ranking (1.0 keeps them): they fire on nearly any text, often ten times as strongly as a sparse
    feature does, so a mere change of wording moves them more than a planted concept moves its own.
    Returns {"prompts", "features": list of {"feature", "difference", "organism", "base", "label"},
    largest difference first, "dense_left_out": how many features `dense` left out, "generations":
    list of {"prompt", "organism", "base"}}.
    """
    import torch

    from ._arch import base_model, chat_prompt
    from .diffing import PROMPT_SETS
    from .generation import generate_text

    sae, layer = served_sae(model)
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"prompts={prompts!r}: name a set ({', '.join(PROMPT_SETS)}) or pass a list of prompts")
        prompts = list(PROMPT_SETS[prompts])
    if not prompts:
        raise ValueError("contrastive_features needs at least one prompt")
    if isinstance(dense, bool) or not isinstance(dense, (int, float)) or not 0 < dense <= 1:
        raise ValueError(f"dense={dense!r}: the share of corpus tokens above which a feature is left out, in (0, 1] "
                         "(1.0 keeps every feature)")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [chat_prompt(tokenizer, p) if chat else p for p in prompts]
    prompt_lengths = [len(tokenizer(led(tokenizer, t))["input_ids"]) for t in texts]

    def read(of):
        answers = generate_text(of, tokenizer, texts, max_new_tokens=max_new_tokens, chat=False)
        acts, _, keep = feature_acts(of, tokenizer, [t + a for t, a in zip(texts, answers)], sae, layer)
        # Only the answers count: the prompts are the same text for both models, and their share of a
        # mean would shift with the answers' lengths. Rows are left-padded: an answer ends its row.
        length = [len(tokenizer(led(tokenizer, t + a))["input_ids"]) - n
                  for t, a, n in zip(texts, answers, prompt_lengths)]
        start = keep.shape[1] - torch.tensor(length, device=keep.device)[:, None]
        answer = keep & (torch.arange(keep.shape[1], device=keep.device) >= start)
        return (acts.float() * answer[..., None]).sum((0, 1)) / answer.sum().clamp(min=1), answers

    organism, said = read(model)
    with base_model(model) as base:
        base_mean, base_said = read(base)
    left_out = _index(model, tokenizer, sae, layer)["frequency"].to(organism.device) > dense
    difference = (organism - base_mean).masked_fill(left_out, float("-inf"))
    values, top = difference.topk(min(top_k, int((~left_out).sum())))
    labels = _labels(model, tokenizer, sae, layer, top.tolist())
    return ContrastResult({"prompts": prompts, "features": [
        {"feature": f, "difference": v, "organism": float(organism[f]), "base": float(base_mean[f]), "label": labels[f]}
        for f, v in zip(top.tolist(), values.tolist())], "dense_left_out": int(left_out.sum()),
        "generations": [{"prompt": p, "organism": o, "base": b} for p, o, b in zip(prompts, said, base_said)]})


def steer_with_feature(model, tokenizer, prompt: str, feature: int, strength: float = 4.0, max_new_tokens: int = 30,
                       chat: bool | None = None) -> dict:
    """Generate with a feature turned up: its decoder direction, times `strength` times its
    strongest activation in the corpus, added to its layer's output at every position and step.

    Returns {"prompt", "baseline", "steered" (greedy texts), "feature", "label", "promoted": the
    tokens the feature promotes with their next-token probabilities {"before", "after"} on the
    prompt}.
    """
    import torch

    from ._arch import arch, chat_prompt, encode, raw
    from .steering import steering

    sae, layer = served_sae(model)
    feature = _check_feature(sae, feature)
    index = _index(model, tokenizer, sae, layer)
    scale = float(index["values"][feature, 0]) or 1.0
    vector = (sae.W_dec[feature] * scale).float().cpu()
    result = steering(model, tokenizer, prompt, vector, [layer], alpha=strength, max_new_tokens=max_new_tokens,
                      chat=chat)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    inputs = encode(model, tokenizer, chat_prompt(tokenizer, prompt) if chat else prompt)
    promoted = _promoted(model, tokenizer, sae, [feature])[feature]
    ids = _promoted(model, tokenizer, sae, [feature], ids=True)[feature]
    a, param = arch(model), next(raw(model).parameters())
    probs = []
    with torch.no_grad():
        for alpha in (0.0, strength):
            delta = alpha * vector.to(param.device, param.dtype)
            with model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"]):
                a.layer(model, layer).output[:] += delta
                logits = model.output.logits[0, -1].save()
            probs.append(logits.float().softmax(-1)[ids].tolist())
    return Result({**result, "feature": feature, "label": _labels(model, tokenizer, sae, layer, [feature])[feature],
                   "promoted": [{"token": w, "before": b, "after": s} for w, b, s in zip(promoted, *probs)]},
                  title="steer_with_feature")
