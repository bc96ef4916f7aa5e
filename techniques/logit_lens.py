from __future__ import annotations

from ._result import LensResult


def logit_lens(model, tokenizer, text: str, layers: list[int] | None = None, positions=(-1,),
               top_k: int = 5, targets: list[str] | None = None, chat: bool = False) -> dict:
    """Decode each layer's residual stream through the final norm and unembedding.

    layers: block indices (default all); layer i is the output of block i, so the last layer
        gives exactly the model's own next-token distribution. (Writing your own lens on HF's
        `output_hidden_states`: entry i + 1 is block i's output, and the LAST entry has the final
        norm applied already; norm it again and the lens reads wrong.)
    positions: token positions to decode (default the last).
    targets: strings whose (first-token) probability is tracked per layer and position.
    chat: `text` is a user turn: decode where the assistant's answer starts (in the chat template).
    Returns {"tokens", "layers", "positions", "top": [layer][position] -> top-k list,
    "target_probs": {target: [layer][position] -> prob}}.

    Tutorial: tutorials/02_logit_lens.ipynb
    """
    import torch

    from ._arch import arch, chat_prompt, encode, positions as check_positions, token_id, token_strings, top_tokens

    a = arch(model)
    layers = a.layers(layers)
    ids = encode(model, tokenizer, chat_prompt(tokenizer, text) if chat else text)["input_ids"]
    pos = check_positions(ids.shape[1], positions)
    saved = {}
    with torch.no_grad():
        with model.trace(ids) as tracer:
            for layer in sorted(set(layers)):  # modules must be read in execution order
                saved[layer] = a.layer(model, layer).output.save()
            tracer.stop()  # the model's own head would unembed every position: skip it
        hidden = torch.stack([saved[layer][0, pos] for layer in layers])  # [L, P, D]
        probs = a.unembed(model, hidden).float().softmax(-1)
    target_ids = {t: token_id(tokenizer, t) for t in targets or []}
    return LensResult({
        "tokens": token_strings(tokenizer, ids[0]),
        "layers": layers,
        "positions": pos,
        "top": top_tokens(tokenizer, probs, top_k),
        "target_probs": {t: probs[:, :, tid].tolist() for t, tid in target_ids.items()},
    })
