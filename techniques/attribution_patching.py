from __future__ import annotations

from ._result import GridResult


def attribution_patching(model, tokenizer, clean: str, corrupted: str, answer: str, wrong_answer: str,
                         layers: list[int] | None = None, positions=None, component: str = "resid") -> dict:
    """The gradient (first-order) approximation of activation_patching's grid, from one forward/backward.

    Estimate for patching site s: (clean_act(s) - corrupted_act(s)) . d metric / d act(s) on the
    corrupted run, normalised like activation_patching (clean = 1, corrupted = 0). Same
    arguments as activation_patching; cheap enough for every layer and position.
    Returns {"grid": [layer][column], "estimated_logit_diffs", "layers", "positions", "component",
    "tokens", "clean_logit_diff", "corrupted_logit_diff"}.

    Tutorial: tutorials/04_attribution_and_dla.ipynb
    """
    import torch

    from ._arch import arch, normalize, patch_columns, prompt_pair, token_strings

    a = arch(model)
    layers = a.layers(layers)
    ids_clean, ids_corrupted, good, bad = prompt_pair(model, tokenizer, clean, corrupted, answer, wrong_answer)
    columns, labels = patch_columns(ids_clean.shape[1], positions)
    with torch.no_grad():
        clean_acts, clean_logits = a.run_sites(model, ids_clean, layers, component)
    with torch.enable_grad():
        corrupted_acts, logits = a.run_sites(model, ids_corrupted, layers, component)
        metric = logits[0, -1, good] - logits[0, -1, bad]
        grads = torch.autograd.grad(metric, list(corrupted_acts.values()))
    grad = dict(zip(corrupted_acts, grads))
    # [layer, position] on the model's device, then one copy to the host (not one sync per cell)
    per_position = torch.stack([((clean_acts[layer] - corrupted_acts[layer].detach()) * grad[layer])[0].sum(-1)
                                for layer in layers]).float()
    grid = torch.stack([per_position[:, col].sum(-1) for col in columns], 1).cpu()
    clean_diff = float(clean_logits[0, -1, good] - clean_logits[0, -1, bad])
    corrupted_diff = float(metric.detach())
    return GridResult({
        "grid": normalize(grid + corrupted_diff, clean_diff, corrupted_diff),
        "estimated_logit_diffs": (grid + corrupted_diff).tolist(),
        "layers": layers,
        "positions": labels,
        "component": component,
        "tokens": token_strings(tokenizer, ids_clean[0]),
        "clean_logit_diff": clean_diff,
        "corrupted_logit_diff": corrupted_diff,
    })
