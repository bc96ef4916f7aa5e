from __future__ import annotations

from ._batch import Generate, batchable


@batchable
def generate_text(model, tokenizer, prompt, max_new_tokens: int = 50, chat: bool | None = None,
                  system_prompt: str | None = None, temperature: float = 0.0):
    """Generate a continuation for one prompt or a batch; returns only the new text.

    prompt: a string or a list of strings (one batched generation).
    chat: wrap each prompt as a user turn in the chat template (default: when the tokenizer
        has one). Greedy decoding unless temperature > 0. Calls other sessions make at the same
        time share one batched generation.
    Returns a string, or a list of strings for a list of prompts.
    """
    from ._arch import chat_prompt

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        prompts = [chat_prompt(tokenizer, p, system_prompt) for p in prompts]
    texts = yield Generate(tuple(prompts), max_new_tokens, temperature)
    return texts[0] if isinstance(prompt, str) else texts
