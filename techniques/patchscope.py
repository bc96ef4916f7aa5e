from __future__ import annotations

from ._result import Result

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n? ->"


def patchscope(model, tokenizer, source_text: str, source_layer: int, source_position: int = -1,
               target_prompt: str = IDENTITY_PROMPT, target_layer: int | None = None,
               target_position: int | None = None, max_new_tokens: int = 10, top_k: int = 5) -> dict:
    """Decode a hidden state by patching it into a target prompt and letting the model talk.

    The residual stream of source_text at (source_layer, source_position) replaces the target
    prompt's at (target_layer, default source_layer; target_position, default the "?" of the
    identity prompt, else the last token) on the first forward pass; generation is greedy.
    Returns {"source_token", "decoded": generated text, "top": next-token top-k}.
    """
    import torch

    from ._arch import arch, encode, positions, token_strings, top_tokens

    a = arch(model)
    (source_layer,) = a.layers(source_layer)
    (target_layer,) = a.layers(source_layer if target_layer is None else target_layer)
    source = encode(model, tokenizer, source_text)["input_ids"]
    (src_pos,) = positions(source.shape[1], source_position)
    target = encode(model, tokenizer, target_prompt)
    tokens = token_strings(tokenizer, target["input_ids"][0])
    if target_position is None:
        marks = [i for i, t in enumerate(tokens) if t.strip() == "?"]
        target_position = marks[-1] if marks else -1
    (tgt_pos,) = positions(len(tokens), target_position)
    with torch.no_grad():
        with model.trace(source):
            hidden = a.layer(model, source_layer).output.save()
        with model.generate(max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id) as tracer:
            with tracer.invoke(target["input_ids"], attention_mask=target["attention_mask"]):
                a.layer(model, target_layer).output[0, tgt_pos] = hidden[0, src_pos]
                logits = model.lm_head.output.save()
            with tracer.invoke():
                out = tracer.result.save()
    return Result({
        "source_token": tokenizer.decode([source[0, src_pos].item()]),
        "decoded": tokenizer.decode(out[0, target["input_ids"].shape[1]:], skip_special_tokens=True),
        "top": top_tokens(tokenizer, logits[0, -1].float().softmax(-1), top_k),
    }, "patchscope")
