from __future__ import annotations

import re

from ._result import AblationResult

_SPEC = re.compile(r"^L(\d+)\.(attn|mlp|resid|H(\d+))$")


def ablation(model, tokenizer, text: str, answer: str, wrong_answer: str | None = None,
             components: list[str] = (), kind: str = "zero", reference_texts: list[str] | None = None,
             separately: bool = False) -> dict:
    """Zero- or mean-ablate layers, attention heads or MLPs and measure the change in a metric.

    components: strings "L5.attn", "L3.mlp", "L7.resid" (the whole block output) or "L5.H2"
        (head 2 of layer 5). An empty list ablates nothing.
    separately: False ablates all components together; True ablates each one on its own (all
        in one batched forward pass) and reports each one's effect, e.g. to scan every head.
    kind: "zero", or "mean" (the mean activation over reference_texts, default [text]).
    Metric at the last position: logit(answer) - logit(wrong_answer), or log p(answer) without
    wrong_answer. The clean and the ablated runs go through the model as one batch.
    Returns {"metric_before", "metric_after", "change", "components", "kind"}; with separately,
    "effects": [{"component", "metric_after", "change"}] per component instead of the last two.
    """
    import torch

    from ._arch import arch, encode, token_id

    a = arch(model)
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")
    if isinstance(components, str):
        components = [components]
    # (layer, site kind) -> [(batch row, head or None)]: each site is read once, in layer order.
    sites: dict[tuple[int, str], list] = {}
    for index, spec in enumerate(components):
        match = _SPEC.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(f"bad component {spec!r}: use 'L5.attn', 'L3.mlp', 'L7.resid' or 'L5.H2'")
        (layer,) = a.layers(int(match[1]))
        head = int(match[3]) if match[3] is not None else None
        if head is not None and head >= a.n_heads:
            raise ValueError(f"head {head} is out of range: the model has {a.n_heads} heads")
        row = 1 + index if separately else 1
        sites.setdefault((layer, "head" if head is not None else match[2]), []).append((row, head))
    # Modules are reached in layer order, attention before MLP within a layer.
    order = sorted(sites, key=lambda t: (t[0], {"head": 0, "attn": 0, "mlp": 1, "resid": 2}[t[1]]))

    def site(layer, what):
        return a.out_proj(model, layer).input if what == "head" else a.site(model, layer, what)

    means = {}
    if kind == "mean" and sites:
        ref = encode(model, tokenizer, reference_texts or [text])
        mask = ref["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            with model.trace(ref["input_ids"], attention_mask=ref["attention_mask"]):
                for key in order:
                    means[key] = site(*key).save()
        means = {k: (v * mask).sum((0, 1)) / mask.sum() for k, v in means.items()}

    ids = encode(model, tokenizer, text)["input_ids"]
    rows = 1 + (len(components) if separately else 1)
    with torch.no_grad():
        with model.trace(ids.repeat(rows, 1)):  # row 0 untouched, the others ablated
            for key in order:
                acts = site(*key)
                for row, head in sites[key]:
                    cols = slice(head * a.head_dim, (head + 1) * a.head_dim) if head is not None else slice(None)
                    acts[row, :, cols] = means[key][cols] if kind == "mean" else 0.0
            logits = model.lm_head.output.save()
    last = logits[:, -1].float()
    good = token_id(tokenizer, answer)
    if wrong_answer is None:
        metric = last.log_softmax(-1)[:, good]
    else:
        metric = last[:, good] - last[:, token_id(tokenizer, wrong_answer)]
    before = float(metric[0])
    result = {"metric_before": before, "components": list(components), "kind": kind}
    if separately:
        result["effects"] = [{"component": spec, "metric_after": float(metric[1 + i]),
                              "change": float(metric[1 + i]) - before} for i, spec in enumerate(components)]
    else:
        result.update(metric_after=float(metric[1]), change=float(metric[1]) - before)
    return AblationResult(result)
