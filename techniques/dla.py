from __future__ import annotations

from ._result import ContributionResult


def direct_logit_attribution(model, tokenizer, text: str, answer: str, wrong_answer: str,
                             position: int = -1) -> dict:
    """Each layer's attention and MLP output, projected on the answer-vs-wrong unembedding direction.

    The final norm's scale is frozen at its value on the real residual stream, so the terms are
    linear and add up: embedding + sum(attn) + sum(mlp) + norm_bias == the logit difference.
    Returns {"embedding", "attn": [per layer], "mlp": [per layer], "norm_bias", "total", "logit_diff"}.

    Tutorial: tutorials/04_attribution_and_dla.ipynb
    """
    import torch

    from ._arch import _get, arch, encode, positions, raw, token_id

    a = arch(model)
    ids = encode(model, tokenizer, text)["input_ids"]
    (pos,) = positions(ids.shape[1], position)
    good, bad = token_id(tokenizer, answer), token_id(tokenizer, wrong_answer)
    attn, mlp = [], []
    with torch.no_grad():
        with model.trace(ids):
            embedding = a.layer(model, 0).input.save()
            for layer in range(a.n_layers):
                attn.append(a.attn(model, layer).output[0].save())
                mlp.append(a.mlp(model, layer).output.save())
            final = a.norm(model).input.save()
            logits = model.lm_head.output.save()
        hf = raw(model)
        norm = _get(hf, a.paths[4])
        direction = (_get(hf, "lm_head").weight[good] - _get(hf, "lm_head").weight[bad]).float()
        x = final[0, pos].float()
        layer_norm = isinstance(norm, torch.nn.LayerNorm)
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        weight = norm.weight.float() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
        center = (lambda v: v - v.mean()) if layer_norm else (lambda v: v)
        scale = 1.0 / torch.sqrt(center(x).pow(2).mean() + eps)

        def project(v):
            return float(direction @ (weight * center(v[0, pos].float()) * scale))

        bias = float(direction @ norm.bias.float()) if layer_norm and norm.bias is not None else 0.0
        terms = {"embedding": project(embedding), "attn": [project(v) for v in attn], "mlp": [project(v) for v in mlp]}
    total = terms["embedding"] + sum(terms["attn"]) + sum(terms["mlp"]) + bias
    return ContributionResult({**terms, "norm_bias": bias, "total": total,
                               "logit_diff": float(logits[0, pos, good] - logits[0, pos, bad])})
