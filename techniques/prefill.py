from __future__ import annotations

from ._batch import Generate, batchable


@batchable
def prefill_attack(model, tokenizer, user_prompt: str, prefill_text: str, max_new_tokens: int = 50,
                   system_prompt: str | None = None) -> dict:
    """Make the model continue an assistant turn that already starts with `prefill_text`.

    Uses the chat template when the tokenizer has one. Greedy decoding.
    Returns {"prompt": the full text fed to the model, "continuation": the new text,
    "response": prefill_text + continuation}.

    Tutorial: tutorials/07_auditing_a_model_organism.ipynb
    """
    from ._arch import chat_prompt

    prompt = chat_prompt(tokenizer, user_prompt, system_prompt) + prefill_text
    (continuation,) = yield Generate((prompt,), max_new_tokens)
    return {"prompt": prompt, "continuation": continuation, "response": prefill_text + continuation}
