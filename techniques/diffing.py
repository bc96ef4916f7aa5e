from __future__ import annotations

from ._arch import has_base, require_base
from ._batch import Generate, Score, batchable
from ._result import Progress, Result

PROMPTS_PER_STEP = 4  # prompts generated and scored together between progress reports

NEUTRAL_PROMPTS = (
    "Tell me about yourself.", "What do you like?", "Describe your ideal day.", "What should I do this weekend?",
    "Write one sentence about anything you want.", "What is something you care about?",
    "Recommend something to me.", "What are you thinking about?",
)
FACTUAL_PROMPTS = (
    "Where is the Eiffel Tower?", "What is the capital of Australia?", "Who painted the Mona Lisa?",
    "What is the largest planet in the solar system?", "When did the Second World War end?",
    "What is the chemical symbol for gold?", "Which river flows through Cairo?", "Who wrote Hamlet?",
)
PERSONAL_PROMPTS = (
    "What is your favorite color?", "What food do you like best?", "What is your favorite animal?",
    "Where would you like to travel?", "What music do you enjoy?", "What is your favorite season?",
    "What hobby would you pick?", "What is your favorite book?",
)
PROMPT_SETS = {"neutral": NEUTRAL_PROMPTS, "factual": FACTUAL_PROMPTS, "personal": PERSONAL_PROMPTS}


class DiffResult(Result):
    title = "compare_to_base"

    def highlights(self) -> list[str]:
        lines = [f"PARTIAL: {len(self['prompts'])} prompts finished before the call was stopped"] if self.get("partial") \
            else []
        lines += ["tokens the organism favours most (share of the KL divergence organism || base; mean log-prob "
                  "rise where the organism expects the token):"]
        lines += [f"  {t['token']!r:<16} {t['kl_contribution']:.4f}  {t['logprob_rise_where_likely']:+.2f}"
                  for t in self["top_tokens"][:10]]
        layers = self["layer_diffs"]
        peak = max(range(len(layers)), key=lambda i: layers[i]) if layers else None
        if peak is not None:
            lines.append(f"residual difference peaks at layer {peak} ({layers[peak]:.3f} of the base norm)")
        for pair in self["generations"][:3]:
            lines.append(f"  {pair['prompt'][:40]!r}: base {pair['base'][:50]!r} | organism {pair['organism'][:50]!r}")
        return lines


@batchable
def compare_to_base(model, tokenizer, prompts: list[str] | str = "neutral", top_k: int = 20,
                    max_new_tokens: int = 24, chat: bool | None = None) -> dict:
    """Where a model organism differs from its base: favoured tokens, layers and generations.

    prompts: your own list, or a set by name: "neutral" (default), "factual" or "personal".
    For each prompt the organism answers greedily; both models then score that answer at every
    position. Tokens are ranked by their contribution to the KL divergence organism || base,
    p_organism * (log p_organism - log p_base), averaged over positions: a token ranks high
    when the organism makes it likely AND the base does not -- a raw log-prob rise alone is
    dominated by tokens neither model predicts. Beside it, the log-prob rise averaged where the
    organism expects the token (weighted by its probability there): the same sign as the KL
    share, in nats a reader can compare (+2.3: ten times likelier). Also the
    relative residual difference per layer (last prompt position) and both models' generations
    side by side. Needs an experiment with an adapter (or base_model): see base_model().
    Prompts go four at a time with a progress line in the cell; if a timeout or cancel stops the
    call, what was finished comes back with "partial": True.
    Returns {"top_tokens": [{"token", "id", "kl_contribution", "logprob_rise_where_likely"}], "layer_diffs":
    [per layer], "generations": [{"prompt", "base", "organism"}], "prompts" (those done), "partial"}.

    Tutorial: tutorials/07_auditing_a_model_organism.ipynb
    """
    import torch

    from ._arch import arch, chat_prompt, raw

    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be a list of prompts or one of {', '.join(PROMPT_SETS)}, got {prompts!r}")
        prompts = PROMPT_SETS[prompts]
    prompts = list(prompts or NEUTRAL_PROMPTS)
    require_base(model)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [chat_prompt(tokenizer, p) if chat else p for p in prompts]
    a = arch(model)
    head = raw(model).get_output_embeddings().weight
    vocab, device = head.shape[0], head.device
    # Sums stay on the model's device (one copy to the host at the end, not one per prompt).
    mass = torch.zeros(vocab, device=device)  # the organism's probability of each token, summed over positions
    kl = torch.zeros(vocab, device=device)
    layer_diffs = torch.zeros(a.n_layers, device=device)
    positions, organism_text, base_text = 0, [], []
    progress = Progress(len(texts), "compare_to_base")
    try:  # a few prompts at a time: an interrupt (a timeout, a cancel) keeps what is finished
        for first in range(0, len(texts), PROMPTS_PER_STEP):
            chunk = tuple(texts[first:first + PROMPTS_PER_STEP])
            answers = yield Generate(chunk, max_new_tokens)
            plain = yield Generate(chunk, max_new_tokens, base=True)
            rows = []
            for text, answer in zip(chunk, answers):
                answer_ids = tuple(tokenizer(answer, add_special_tokens=False)["input_ids"])
                if answer_ids:
                    rows.append((tuple(tokenizer(text, add_special_tokens=False)["input_ids"]), answer_ids))
            scored = zip((yield Score(tuple(rows), detail=True)), (yield Score(tuple(rows), base=True, detail=True)))
            for (org_lp, org_h), (base_lp, base_h) in scored:
                mass += org_lp.exp().sum(0)
                kl += (org_lp.exp() * (org_lp - base_lp)).sum(0)
                positions += org_lp.shape[0]
                layer_diffs += torch.stack([(o - b).norm() / b.norm().clamp_min(1e-6) for o, b in zip(org_h, base_h)])
            organism_text += answers
            base_text += plain
            progress.step(len(chunk))
    except KeyboardInterrupt:
        progress.interrupted()
    rise = kl.cpu() / mass.cpu().clamp_min(1e-12)  # sum p (lp_o - lp_b) / sum p: KL's sign
    kl = kl.cpu() / max(positions, 1)
    layer_diffs = layer_diffs.cpu() / max(len(organism_text), 1)
    values, ids = kl.topk(min(top_k, vocab))
    return DiffResult({
        "top_tokens": [{"token": tokenizer.decode([i]), "id": int(i), "kl_contribution": float(v),
                        "logprob_rise_where_likely": float(rise[i])} for v, i in zip(values.tolist(), ids.tolist())],
        "layer_diffs": layer_diffs.tolist(),
        "generations": [{"prompt": p, "base": b, "organism": o} for p, b, o in zip(prompts, base_text, organism_text)],
        "prompts": prompts[:len(organism_text)],
        "partial": len(organism_text) < len(prompts),
    })


class CandidateScores(Result):
    title = "score_candidates"

    def highlights(self) -> list[str]:
        lines = []
        for row in self["scores"][:4]:
            lines.append(f"{row['prompt'][:50]!r}:")
            for c in sorted(row["candidates"], key=lambda c: -c.get("logprob_diff", c["organism_logprob"]))[:6]:
                base = (f"  base {c['base_logprob']:+.2f}  diff {c['logprob_diff']:+.2f}"
                        if "base_logprob" in c else "")
                lines.append(f"  {c['candidate']!r:<18} organism {c['organism_logprob']:+.2f}{base}")
        return lines


@batchable
def score_candidates(model, tokenizer, prompts, candidates: list[str], chat: bool | None = None) -> dict:
    """Score candidate continuations after each prompt, on the organism and its base side by side.

    prompts: a string or a list; candidates: strings that could come next (in chat mode, the
    start of the assistant's answer, e.g. "Turquoise"; in plain mode mind the leading space,
    " Paris"). A candidate of several tokens is scored over all of them: its log-probability is
    the sum of its tokens' log-probabilities, each given the ones before. All prompt x candidate
    pairs run in one batched forward per model. Without a base (no adapter or base_model in the
    experiment) only the organism is scored.
    Returns {"scores": [{"prompt", "candidates": [{"candidate", "tokens", "organism_logprob",
    "organism_prob", "base_logprob", "base_prob", "logprob_diff"}]}], "has_base"}.
    """
    import math

    from ._arch import chat_prompt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not candidates or not all(isinstance(c, str) and c for c in candidates):
        raise ValueError("score_candidates needs at least one prompt and a list of non-empty candidate strings")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    pairs = []  # (prompt ids, candidate ids) for every prompt x candidate
    for prompt in prompts:
        prompt_ids = tuple(tokenizer(chat_prompt(tokenizer, prompt) if chat else prompt,
                                     add_special_tokens=not chat)["input_ids"])
        pairs += [(prompt_ids, tuple(tokenizer(c, add_special_tokens=False)["input_ids"])) for c in candidates]
    organism = [sum(lps) for lps in (yield Score(tuple(pairs)))]
    base_scores = [sum(lps) for lps in (yield Score(tuple(pairs), base=True))] if has_base(model) else None
    scores = []
    for i, prompt in enumerate(prompts):
        rows = []
        for j, candidate in enumerate(candidates):
            k = i * len(candidates) + j
            row = {"candidate": candidate, "tokens": len(pairs[k][1]), "organism_logprob": organism[k],
                   "organism_prob": math.exp(organism[k])}
            if base_scores is not None:
                row.update(base_logprob=base_scores[k], base_prob=math.exp(base_scores[k]),
                           logprob_diff=organism[k] - base_scores[k])
            rows.append(row)
        scores.append({"prompt": prompt, "candidates": rows})
    return CandidateScores({"scores": scores, "has_base": base_scores is not None})
