from __future__ import annotations

from ._result import GridResult, Progress


def activation_patching(model, tokenizer, clean: str, corrupted: str, answer: str, wrong_answer: str,
                        layers: list[int] | None = None, positions=None, component: str = "resid",
                        batch_size: int = 32) -> dict:
    """Patch clean activations into the corrupted run over a layers x positions grid.

    The metric is logit(answer) - logit(wrong_answer) at the last position, normalised so the
    clean run scores 1 and the corrupted run 0. clean and corrupted must tokenize to the same
    length. component: "resid" (block output), "attn" or "mlp" (their outputs).
    positions: None = each position separately, "all" = all positions at once, or a list.
    All patched runs of a batch go through the model as one batch (one forward per batch_size),
    with a progress line in the cell; if a timeout or cancel stops the call, the batches finished
    come back with "partial": True and None in the cells not reached.
    Returns {"grid": [layer][column], "logit_diffs": [layer][column], "layers", "positions",
    "component", "tokens", "corrupted_tokens", "clean_logit_diff", "corrupted_logit_diff", "partial"}.

    Tutorial: tutorials/03_activation_patching.ipynb
    """
    import torch

    from ._arch import arch, normalize, patch_columns, prompt_pair, token_strings

    a = arch(model)
    layers = a.layers(layers)
    ids_clean, ids_corrupted, good, bad = prompt_pair(model, tokenizer, clean, corrupted, answer, wrong_answer)
    columns, labels = patch_columns(ids_clean.shape[1], positions)
    with torch.no_grad():
        clean_acts, clean_logits = a.run_sites(model, ids_clean, layers, component)
    clean_diff = float(clean_logits[0, -1, good] - clean_logits[0, -1, bad])
    device = clean_logits.device

    # One row per (layer, column); each batch also carries an unpatched corrupted row first.
    cells = [(layer, col) for layer in layers for col in range(len(columns))]
    diffs, unpatched = [], None
    progress = Progress(len(cells), "activation_patching")
    try:
        for start in range(0, len(cells), batch_size):
            chunk = cells[start:start + batch_size]
            writes = {}
            for row, (layer, col) in enumerate(chunk, start=1):
                rows, pos = writes.setdefault(layer, ([], []))
                rows.extend([row] * len(columns[col]))
                pos.extend(columns[col])
            with torch.no_grad():
                with model.trace(ids_corrupted.repeat(len(chunk) + 1, 1)):
                    for layer in sorted(writes):
                        rows, pos = (torch.tensor(v, device=device) for v in writes[layer])
                        a.site(model, layer, component)[rows, pos] = clean_acts[layer][0, pos]
                    logits = model.lm_head.output.save()
            batch_diffs = (logits[:, -1, good] - logits[:, -1, bad]).float()
            unpatched = batch_diffs[0] if unpatched is None else unpatched  # read once at the end: no sync per batch
            diffs.append(batch_diffs[1:])
            progress.step(len(chunk))
    except KeyboardInterrupt:
        progress.interrupted()
    corrupted_diff = float(unpatched)
    missing = torch.full((len(cells) - progress.done,), float("nan"), device=device)
    raw_grid = torch.cat([*diffs, missing]).reshape(len(layers), len(columns)).cpu()

    def cells_of(rows):  # the cells not reached (NaN) are None
        return [[None if v != v else v for v in row] for row in rows]

    return GridResult({
        "grid": cells_of(normalize(raw_grid, clean_diff, corrupted_diff)),
        "logit_diffs": cells_of(raw_grid.tolist()),
        "layers": layers,
        "positions": labels,
        "component": component,
        "tokens": token_strings(tokenizer, ids_clean[0]),
        "corrupted_tokens": token_strings(tokenizer, ids_corrupted[0]),
        "clean_logit_diff": clean_diff,
        "corrupted_logit_diff": corrupted_diff,
        "partial": progress.done < len(cells),
    })
