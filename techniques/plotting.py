"""Pictures of technique results, drawn in the notebook (matplotlib; imported on first use).

Each helper returns the matplotlib Axes (its figure is `ax.figure`); in a notebook the figure
shows once, by itself. Pass `ax=` to draw into a subplot of your own figure.
"""

from __future__ import annotations


def _axes(ax, size):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    return plt.subplots(figsize=size)[1]


def _index(values: list, wanted, what: str, technique: str) -> int:
    if wanted not in values:
        raise ValueError(f"{what} {wanted!r} is not in this result (it has {what}s {values}); "
                         f"run {technique} with {what}s=[{wanted!r}] to get it")
    return values.index(wanted)


def plot_logit_lens(result: dict, position: int | None = None, target: str | None = None, ax=None):
    """Top token and its probability per layer (logit_lens result), or one target's probability.

    position: a token position the lens decoded (default: the first one in the result).
    """
    col = 0 if position is None else _index(result["positions"], position, "position", "logit_lens")
    layers = result["layers"]
    ax = _axes(ax, (8, 3.5))
    if target is not None:
        if target not in result["target_probs"]:
            raise ValueError(f"target {target!r} was not tracked: run logit_lens with targets=[{target!r}]")
        ax.plot(layers, [row[col] for row in result["target_probs"][target]], marker="o")
        ax.set_ylabel(f"p({target!r})")
    else:
        probs = [result["top"][i][col][0]["prob"] for i in range(len(layers))]
        ax.bar(layers, probs)
        for x, i in zip(layers, range(len(layers))):
            ax.text(x, probs[i], result["top"][i][col][0]["token"], rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("top-1 probability")
    ax.set_xlabel("layer")
    ax.set_title(f"logit lens at position {result['positions'][col]}")
    ax.figure.tight_layout()
    return ax


def plot_patching(result: dict, title: str | None = None, ax=None):
    """Heat map of an activation_patching / attribution_patching grid (layers x positions)."""
    grid = result["grid"]
    ax = _axes(ax, (max(4, 0.6 * len(grid[0]) + 2), max(3, 0.18 * len(grid) + 1.5)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", origin="lower")
    labels = result["positions"]
    tokens = result.get("tokens")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{tokens[p]!r}" if tokens and isinstance(p, int) else str(p) for p in labels],
                       rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(result["layers"])))
    ax.set_yticklabels(result["layers"], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title or f"{result.get('component', 'resid')} patching (1 = clean, 0 = corrupted)")
    ax.figure.colorbar(image, ax=ax)
    ax.figure.tight_layout()
    return ax


def plot_attention(result: dict, layer: int, head: int, ax=None):
    """One head's attention pattern (attention_patterns result) by the model's layer and head numbers.

    E.g. plot_attention(att, 23, 4) for layer 23, head 4; query rows, key columns.
    """
    pattern = result["patterns"][_index(result["layers"], layer, "layer", "attention_patterns")][
        _index(result["heads"], head, "head", "attention_patterns")]
    tokens = result["tokens"]
    ax = _axes(ax, (0.35 * len(tokens) + 2, 0.35 * len(tokens) + 1.5))
    ax.imshow(pattern, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([repr(t) for t in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)))
    ax.set_yticklabels([repr(t) for t in tokens], fontsize=8)
    ax.set_title(f"layer {layer}, head {head}")
    ax.figure.tight_layout()
    return ax
