from __future__ import annotations

from ._result import Result


def attention_patterns(model, tokenizer, text: str, layers: list[int] | None = None,
                       heads: list[int] | None = None) -> dict:
    """Attention weights per layer and head: how much each token attends to each earlier token.

    Returns {"tokens", "layers", "heads", "patterns": [layer][head][query][key]}; every row sums
    to 1 and is causal (zero above the diagonal).
    """
    import torch

    from ._arch import arch, encode, raw, token_strings

    a = arch(model)
    layers = a.layers(layers)
    heads = list(range(a.n_heads)) if heads is None else heads
    for h in heads:
        if not isinstance(h, int) or not 0 <= h < a.n_heads:
            raise ValueError(f"head {h!r} is out of range: the model has {a.n_heads} heads (0..{a.n_heads - 1})")
    hf = raw(model)
    inputs = encode(model, tokenizer, text)
    # Fused attention kernels never materialise the weights: switch to eager for this call only.
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = hf(**inputs, output_attentions=True).attentions
    finally:
        hf.set_attn_implementation(previous)
    return Result({
        "tokens": token_strings(tokenizer, inputs["input_ids"][0]),
        "layers": layers,
        "heads": heads,
        "patterns": [attentions[layer][0, heads].float().tolist() for layer in layers],
    }, "attention_patterns")
