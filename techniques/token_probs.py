from __future__ import annotations

from ._batch import NextToken, batchable
from ._result import Result


@batchable
def analyze_token_probs(model, tokenizer, text: str, top_k: int = 10, targets: list[str] | None = None,
                        chat: bool = False) -> dict:
    """Next-token distribution after `text`: the top-k tokens and the probability of chosen targets.

    targets: strings such as [" Paris", " Rome"]; each is scored by its first token.
    chat: `text` is a user turn: read the distribution where the assistant's answer starts (in the
        chat template), not after the raw text.
    Returns {"top": [{"token", "id", "prob"}...], "targets": {target: prob}, "entropy": nats}.

    Tutorial: tutorials/02_logit_lens.ipynb
    """
    from ._arch import chat_prompt, token_id, top_tokens

    (logits,) = yield NextToken((chat_prompt(tokenizer, text) if chat else text,))
    probs = logits.softmax(-1)
    return Result({
        "top": top_tokens(tokenizer, probs, top_k),
        "targets": {t: float(probs[token_id(tokenizer, t)]) for t in targets or []},
        "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum()),
    }, "analyze_token_probs")
