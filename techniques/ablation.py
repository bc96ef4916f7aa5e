from __future__ import annotations

import re

_SPEC = re.compile(r"^L(\d+)\.(attn|mlp|resid|H(\d+))$")


def ablation(model, tokenizer, text: str, answer: str, wrong_answer: str | None = None,
             components: list[str] = (), kind: str = "zero", reference_texts: list[str] | None = None) -> dict:
    """Zero- or mean-ablate layers, attention heads or MLPs and measure the change in a metric.

    components: strings "L5.attn", "L3.mlp", "L7.resid" (the whole block output) or "L5.H2"
        (head 2 of layer 5); all are ablated together. An empty list ablates nothing.
    kind: "zero", or "mean" (the mean activation over reference_texts, default [text]).
    Metric at the last position: logit(answer) - logit(wrong_answer), or log p(answer) without
    wrong_answer. The clean and the ablated run go through the model as one batch.
    Returns {"metric_before", "metric_after", "change", "components", "kind"}.
    """
    import torch

    from ._arch import arch, encode, token_id

    a = arch(model)
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")
    targets = []
    for spec in components:
        match = _SPEC.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(f"bad component {spec!r}: use 'L5.attn', 'L3.mlp', 'L7.resid' or 'L5.H2'")
        (layer,) = a.layers(int(match[1]))
        head = int(match[3]) if match[3] is not None else None
        if head is not None and head >= a.n_heads:
            raise ValueError(f"head {head} is out of range: the model has {a.n_heads} heads")
        targets.append((layer, "head" if head is not None else match[2], head))
    # Modules are reached in layer order, attention before MLP within a layer.
    targets.sort(key=lambda t: (t[0], {"head": 0, "attn": 0, "mlp": 1, "resid": 2}[t[1]]))

    def site(layer, what):
        return a.out_proj(model, layer).input if what == "head" else a.site(model, layer, what)

    means = {}
    if kind == "mean" and targets:
        ref = encode(model, tokenizer, reference_texts or [text])
        mask = ref["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            with model.trace(ref["input_ids"], attention_mask=ref["attention_mask"]):
                for layer, what, _ in targets:
                    means[(layer, what)] = site(layer, what).save()
        means = {k: (v * mask).sum((0, 1)) / mask.sum() for k, v in means.items()}

    ids = encode(model, tokenizer, text)["input_ids"]
    with torch.no_grad():
        with model.trace(ids.repeat(2, 1)):  # row 0 untouched, row 1 ablated
            for layer, what, head in targets:
                cols = slice(head * a.head_dim, (head + 1) * a.head_dim) if what == "head" else slice(None)
                value = means[(layer, what)][cols] if kind == "mean" else 0.0
                site(layer, what)[1, :, cols] = value
            logits = model.lm_head.output.save()
    last = logits[:, -1].float()
    good = token_id(tokenizer, answer)
    if wrong_answer is None:
        metric = last.log_softmax(-1)[:, good]
    else:
        metric = last[:, good] - last[:, token_id(tokenizer, wrong_answer)]
    return {"metric_before": float(metric[0]), "metric_after": float(metric[1]),
            "change": float(metric[1] - metric[0]), "components": list(components), "kind": kind}
