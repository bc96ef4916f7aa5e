from __future__ import annotations

from ._result import Result


def _collect(model, tokenizer, texts, layers, position):
    """Activations [n_texts, n_layers, d_model], from one batched trace."""
    import torch

    from ._arch import arch, encode

    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' (each text's last token) or 'mean', got {position!r}")
    if not texts:
        raise ValueError("texts is empty")
    a = arch(model)
    inputs = encode(model, tokenizer, list(texts))
    saved = {}
    with torch.no_grad():
        with model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"]) as tracer:
            for layer in sorted(set(layers)):
                saved[layer] = a.layer(model, layer).output.save()
            tracer.stop()  # nothing past the last layer we read is needed
    stacked = torch.stack([saved[layer] for layer in layers], 1).float()  # [N, L, T, D]
    if position == "mean":
        mask = inputs["attention_mask"][:, None, :, None].float()
        return (stacked * mask).sum(2) / mask.sum(2)
    return stacked[:, :, -1]  # left padding: -1 is every text's last token


def extract_activations(model, tokenizer, texts: list[str], layers: list[int] | None = None,
                        position="last") -> dict:
    """Residual-stream activations of many prompts at chosen layers (one batched forward).

    position: "last" (each prompt's last token) or "mean" (average over its tokens).
    Returns {"layers", "activations": [text][layer][d_model]}.

    Tutorial: tutorials/06_probes.ipynb
    """
    from ._arch import arch

    layers = arch(model).layers(layers)
    acts = _collect(model, tokenizer, texts, layers, position)
    return Result({"layers": layers, "activations": acts.tolist()}, "extract_activations")


def train_probe(model, tokenizer, texts: list[str], labels: list, layers: list[int] | None = None,
                position="last", test_fraction: float = 0.3, seed: int = 0, steps: int = 200) -> dict:
    """A linear (logistic-regression) probe per layer, with accuracy on held-out prompts.

    labels: one class label per text (any hashable values). The split is random with `seed`.
    Returns {"layers", "train_accuracy", "test_accuracy" (per layer), "best_layer", "chance",
    "n_train", "n_test", "classes"}.

    Tutorial: tutorials/06_probes.ipynb
    """
    import torch

    from ._arch import arch

    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    classes = sorted(set(labels), key=str)
    if len(classes) < 2:
        raise ValueError("train_probe needs at least two different labels")
    layers = arch(model).layers(layers)
    x = _collect(model, tokenizer, texts, layers, position)
    device = x.device  # the probe trains where the activations are
    y = torch.tensor([classes.index(label) for label in labels], device=device)
    # host: the split is drawn on the CPU's generator, so a seed gives the same split on every device
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).to(device)
    n_test = max(1, round(len(texts) * test_fraction))
    if len(texts) - n_test < len(classes):
        raise ValueError(f"too few texts ({len(texts)}) to hold out {n_test} and still train on every class")
    test, train = order[:n_test], order[n_test:]
    train_acc, test_acc = [], []
    for i in range(len(layers)):
        feats = x[:, i]
        mean, std = feats[train].mean(0), feats[train].std(0) + 1e-6
        feats = (feats - mean) / std
        probe = torch.nn.Linear(feats.shape[1], len(classes), device=device)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(probe(feats[train]), y[train]).backward()
                opt.step()
        with torch.no_grad():
            predicted = probe(feats).argmax(-1)
        train_acc.append(float((predicted[train] == y[train]).float().mean()))
        test_acc.append(float((predicted[test] == y[test]).float().mean()))
    counts = torch.bincount(y[test], minlength=len(classes))
    return Result({"layers": layers, "train_accuracy": train_acc, "test_accuracy": test_acc,
                   "best_layer": layers[max(range(len(layers)), key=test_acc.__getitem__)],
                   "chance": float(counts.max()) / n_test, "n_train": len(train), "n_test": n_test,
                   "classes": [str(c) for c in classes]}, "train_probe")
