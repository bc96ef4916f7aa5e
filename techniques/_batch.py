"""Black-box techniques as steps, so that calls made at the same time share one batched pass.

A technique decorated with `@batchable` is written as a generator: it yields requests for model
work (`Generate` these prompts, `NextToken` after these texts, `Score` these continuations) and
gets each result back. Called as a plain function it runs its own requests one by one. The model
worker runs the techniques that several sessions call at the same time in lockstep (`Lockstep`)
and merges their requests of one kind into one batched generate or forward: on a GPU, K calls
cost about what one does. Each row is computed as it would be alone (left-padded generation,
right-padded scoring), so results equal a lone call's up to floating-point rounding, and greedy
text is the same.

Light at import (no torch), like the rest of techniques/.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

SCORE_ROWS = 16  # rows per scoring forward: bounds the [rows, tokens, vocab] log-probs held at once


@dataclass(frozen=True)
class Generate:
    """New text after each prompt (greedy unless temperature > 0)."""

    prompts: tuple[str, ...]
    max_new_tokens: int
    temperature: float = 0.0
    base: bool = False
    seed: int | None = None  # sampling from this seed (on a private RNG): reproduces for a call alone

    def __post_init__(self):  # checked in the caller's step: a bad call fails alone, never its batch
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    def key(self):
        return ("generate", self.temperature, self.seed if self.temperature > 0 else None)


@dataclass(frozen=True)
class NextToken:
    """The next-token logits after each text (float32, on the model's device)."""

    texts: tuple[str, ...]
    base: bool = False

    def __post_init__(self):
        if not all(isinstance(t, str) and t for t in self.texts):
            raise ValueError("text must be a non-empty string")

    def key(self):
        return ("next",)


@dataclass(frozen=True)
class Score:
    """Each row is (prompt ids, continuation ids). Per row: the continuation's token log-probs
    (a list of floats), or with `detail` the full log-softmax at those positions [n, vocab] and
    each layer's residual at the last prompt position."""

    rows: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    base: bool = False
    detail: bool = False

    def key(self):
        return ("score",)


def batchable(steps):
    """The plain function of a technique written as steps; `fn.steps` is the generator function."""

    @functools.wraps(steps)
    def technique(model, tokenizer, *args, **kwargs):
        return alone(model, tokenizer, steps(model, tokenizer, *args, **kwargs))

    technique.steps = steps
    return technique


def alone(model, tokenizer, gen):
    """Run one technique's steps (an interrupt reaches the technique, which may return what it finished)."""
    run = Lockstep(model, tokenizer)
    run.add(0, gen)
    run.run()
    ok, value = run.outcomes[0]
    if not ok:
        raise value
    return value


class Lockstep:
    """Runs several techniques' steps together. Each round, the pending requests of one kind
    (and model: organism or base) are merged into one batched call and the results handed back.
    Where the model runs each row with its own organism (`mixes`: a worker serving several
    organisms of one base, see the worker's adapters module), organism and base rows of every
    caller share one call, each caller's rows with its own organism (`organism_of(key)`).

    Hooks for the worker: `stepping(key)` the context a technique's own code runs in (its prints,
    its interrupts), `guard()` the context a batched call runs in, `finished(key, ok, value)` as
    soon as one is done, `stopped_by(members)` which of the techniques in a batched call an
    interrupt was meant for, `interrupt_for(key)` a cancel to throw in instead of a result,
    `refill()` between rounds (more techniques may join)."""

    mixes = False

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.pending: dict = {}  # key -> (generator, its request)
        self.outcomes: dict = {}
        self.widest: dict = {}  # key -> the most techniques one of its batched calls served (1: alone)
        self.models: dict = {}  # key -> the most models (organisms, the base) one of its batched calls ran

    # -- hooks --------------------------------------------------------------------------------
    def stepping(self, key):
        return contextlib.nullcontext()

    def finished(self, key, ok: bool, value) -> None:
        self.outcomes[key] = (ok, value)

    def stopped_by(self, members: list) -> list:
        return members  # alone: an interrupt (Ctrl-C) is meant for everyone

    def interrupt_for(self, key):
        """An exception to throw into this technique instead of its next result (a cancel), or None."""
        return None

    def guard(self):
        return contextlib.nullcontext()

    def refill(self) -> None:
        pass

    def organism_of(self, key):
        """What the model's scribe_rows takes for this technique's rows (its session's organism)."""
        return None

    # -- the loop -------------------------------------------------------------------------------
    def add(self, key, gen) -> None:
        self._step(key, gen, "send", None)

    def _step(self, key, gen, how: str, value) -> None:
        if how == "send" and (stop := self.interrupt_for(key)) is not None:
            how, value = "throw", stop
        try:
            with self.stepping(key):
                request = gen.send(value) if how == "send" else gen.throw(value)
        except StopIteration as stop:
            self.finished(key, True, stop.value)
        except BaseException as exc:  # noqa: BLE001 - the technique's own error, or the interrupt it did not catch
            self.finished(key, False, exc)
        else:
            self.pending[key] = (gen, request)

    def run(self) -> None:
        while self.pending:
            self.refill()
            groups: dict = {}
            for key, (_, request) in self.pending.items():
                groups.setdefault(request.key() if self.mixes else (request.key(), request.base), []).append(key)
            for members in groups.values():
                self._serve([m for m in members if m in self.pending])

    def _serve(self, members: list) -> None:
        if not members:
            return
        requests = [self.pending[m][1] for m in members]
        try:
            with self.guard():
                organisms = [self.organism_of(m) for m in members] if self.mixes else None
                results = execute(self.model, self.tokenizer, requests, organisms)
        except KeyboardInterrupt as exc:
            for m in self.stopped_by(members):  # they may still return what they finished
                self._step(m, self.pending.pop(m)[0], "throw", exc)
            return  # the others' request is served again next round
        except Exception as exc:
            if len(members) > 1:  # one member's bad input must not fail the others: each alone, so only it fails
                for m in members:
                    self._serve([m])
                return
            self._step(members[0], self.pending.pop(members[0])[0], "throw", exc)
            return
        models = len({None if r.base else o for r, o in zip(requests, organisms)}) if organisms else 1
        for m, result in zip(members, results):
            self.widest[m] = max(self.widest.get(m, 1), len(members))
            self.models[m] = max(self.models.get(m, 1), models)
            self._step(m, self.pending.pop(m)[0], "send", result)


# ---------------------------------------------------------------------------
# The batched model calls
# ---------------------------------------------------------------------------


def execute(model, tokenizer, requests: list, organisms: list | None = None) -> list:
    """Serve requests of one kind with one batched call; a result per request. With `organisms`
    (one per request: what the model's scribe_rows takes), each row runs with its request's
    organism, or the base where the request asks for it, all in the same call."""
    from ._arch import base_model, raw

    first = requests[0]
    if organisms is None:
        context, rows = (base_model(model) if first.base else contextlib.nullcontext(model)), None
    else:
        context = contextlib.nullcontext(model)
        rows = [None if r.base else o for r, o in zip(requests, organisms) for _ in _items(r)]

    def mixed(start: int = 0, end: int | None = None):  # rows start..end run with their own organisms
        return contextlib.nullcontext() if rows is None else raw(model).scribe_rows(rows[start:end])

    with context as m:
        if isinstance(first, Generate):
            with mixed():
                return _generate(m, tokenizer, requests)
        if isinstance(first, NextToken):
            with mixed():
                found = _next_token(m, tokenizer, [t for r in requests for t in r.texts])
            return _split(requests, found)
        if isinstance(first, Score):
            flat = [(row, r.detail) for r in requests for row in r.rows]
            scored = []
            for start in range(0, len(flat), SCORE_ROWS):
                with mixed(start, start + SCORE_ROWS):
                    scored += _score(m, tokenizer, flat[start:start + SCORE_ROWS])
            return _split(requests, scored)
    raise TypeError(f"unknown request {type(first).__name__}")


def _items(request) -> tuple:
    """The rows a request adds to a batched call."""
    return request.prompts if isinstance(request, Generate) else request.texts if isinstance(request, NextToken) \
        else request.rows


def _split(requests: list, flat: list) -> list:
    """A batched call's results, one list per request."""
    out, start = [], 0
    for request in requests:
        out.append(flat[start:start + len(_items(request))])
        start += len(_items(request))
    return out


def _generate(model, tokenizer, requests: list[Generate]) -> list[list[str]]:
    """One generate over every request's prompts, to the longest max_new_tokens; each row is cut
    to its own request's length (greedy tokens do not depend on how far generation goes)."""
    import torch

    from ._arch import encode, raw

    prompts = [p for r in requests for p in r.prompts]
    limits = [r.max_new_tokens for r in requests for _ in r.prompts]
    inputs = encode(model, tokenizer, prompts)
    temperature, seed = requests[0].temperature, requests[0].seed
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = inputs["input_ids"].device
    seeded = temperature > 0 and seed is not None
    # a private RNG: a seeded call neither depends on nor moves the RNG every other call draws from
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                                enabled=seeded):
        if seeded:
            torch.manual_seed(seed)
        out = raw(model).generate(**inputs, max_new_tokens=max(limits), pad_token_id=tokenizer.pad_token_id,
                                  **sampling)
    width = inputs["input_ids"].shape[1]
    texts = tokenizer.batch_decode([row[width:width + n] for row, n in zip(out.tolist(), limits)],
                                   skip_special_tokens=True)
    return _split(requests, texts)


def _next_token(model, tokenizer, texts: list[str]) -> list:
    import torch

    from ._arch import encode, raw

    inputs = encode(model, tokenizer, texts)
    with torch.no_grad():
        logits = raw(model)(**inputs).logits[:, -1].float()
    return list(logits)


def _score(model, tokenizer, rows) -> list:
    """Right-padded forward over ((prompt, continuation), detail) rows: padding sits after every
    real token, so no real position attends to it."""
    import torch

    from ._arch import raw

    hf = raw(model)
    device = hf.get_output_embeddings().weight.device
    width = max(len(p) + len(c) for (p, c), _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[*p, *c] + [pad] * (width - len(p) - len(c)) for (p, c), _ in rows], device=device)
    mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for (p, c), _ in rows],
                        device=device)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=any(detail for _, detail in rows))
    results = []
    for i, ((p, c), detail) in enumerate(rows):
        start = len(p) - 1  # the logits at position t predict token t + 1
        lp = out.logits[i, start:start + len(c)].float().log_softmax(-1)
        if detail:
            results.append((lp, [h[i, start].float() for h in out.hidden_states[1:]]))
        else:
            taken = lp.gather(-1, torch.tensor(c, device=device)[:, None])[:, 0]
            results.append(taken.tolist())
    return results
