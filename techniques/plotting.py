"""Pictures of technique results, drawn in the notebook (matplotlib; imported on first use).

Each helper returns the matplotlib Axes (its figure is `ax.figure`); in a notebook the figure
shows once, by itself.
"""

from __future__ import annotations


def plot_logit_lens(result: dict, position: int = 0, target: str | None = None):
    """Top token and its probability per layer (logit_lens result), or one target's probability."""
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if target is not None:
        ax.plot(layers, [row[position] for row in result["target_probs"][target]], marker="o")
        ax.set_ylabel(f"p({target!r})")
    else:
        probs = [result["top"][i][position][0]["prob"] for i in range(len(layers))]
        ax.bar(layers, probs)
        for x, i in zip(layers, range(len(layers))):
            ax.text(x, probs[i], result["top"][i][position][0]["token"], rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("top-1 probability")
    ax.set_xlabel("layer")
    ax.set_title(f"logit lens at position {result['positions'][position]}")
    fig.tight_layout()
    return ax


def plot_patching(result: dict, title: str | None = None):
    """Heat map of an activation_patching / attribution_patching grid (layers x positions)."""
    import matplotlib.pyplot as plt

    grid = result["grid"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(grid[0]) + 2), max(3, 0.18 * len(grid) + 1.5)))
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
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return ax


def plot_attention(result: dict, layer_index: int = 0, head_index: int = 0):
    """One head's attention pattern from attention_patterns (query rows, key columns)."""
    import matplotlib.pyplot as plt

    pattern = result["patterns"][layer_index][head_index]
    tokens = result["tokens"]
    fig, ax = plt.subplots(figsize=(0.35 * len(tokens) + 2, 0.35 * len(tokens) + 1.5))
    ax.imshow(pattern, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([repr(t) for t in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)))
    ax.set_yticklabels([repr(t) for t in tokens], fontsize=8)
    ax.set_title(f"layer {result['layers'][layer_index]}, head {result['heads'][head_index]}")
    fig.tight_layout()
    return ax
