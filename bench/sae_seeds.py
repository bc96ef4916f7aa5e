"""The embedded SAE built with several seeds: what its trained-artifact tests can rely on.

    .venv/bin/python bench/sae_seeds.py              # seeds 0 1 2 3 (each build ~5 min on 2 cores, cached)
    .venv/bin/python bench/sae_seeds.py --seeds 0 1  # some of them

A seed stands for a machine whose arithmetic differs (another CPU, thread count or BLAS): the
recipe is the same, the split, initialisation and batch order are not. For each build it measures
what tests/test_features.py asserts: the quality, the rank of the planted concept's feature in
contrastive_features on the demo organism (the sparse feature that fires most on " turquoise"),
how far its difference stands above the median feature's, and how many of the 20 sharpest
features raise their own top token when steered. Writes bench/sae_seeds.json.
Not a test: it trains, which takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu  # noqa: E402
import organisms  # noqa: E402
import saes  # noqa: E402

PLANTED = "My favorite color is turquoise."
STRENGTH = 8.0  # at 4, 13-16 of 20 rose on these seeds: too near a random feature's 60% (12) to assert with a margin


def measure(seed: int, adapter: str) -> dict:
    import techniques as T
    from techniques import features as F

    folder = saes.build(log=lambda line: print(f"[seed {seed}] {line}", flush=True), seed=seed)
    quality = json.loads((folder / "quality.json").read_text())
    executor = gpu.load_executor(gpu.ModelSpec(adapter=adapter, sae=str(folder)))
    model, tok = executor.model, executor.tokenizer
    sae, layer = F.served_sae(model)
    frequency = F._index(model, tok, sae, layer)["frequency"]
    with T.base_model(model) as base:
        acts, ids, _ = F.feature_acts(base, tok, PLANTED)
    position = tok.convert_ids_to_tokens(ids[0]).index("Ġturquoise")
    planted = int(acts[0, position].masked_fill(frequency > F.DENSE, 0).argmax())
    found = T.contrastive_features(model, tok, "personal", top_k=sae.cfg.d_sae)
    differences = [e["difference"] for e in found["features"]]
    ranked = [e["feature"] for e in found["features"]]
    median = sorted(differences)[len(differences) // 2]
    return {"seed": seed, "fve": quality["fve"], "l0": quality["l0"], "dead": quality["dead"],
            "loss_increase": quality["loss_increase"], "planted_feature": planted,
            "planted_rank": ranked.index(planted) + 1, "planted_difference": differences[ranked.index(planted)],
            "median_difference": median, "top5_difference": differences[4], "sparse_features": len(ranked),
            "steering_rose": steering_rose(model, tok, sae, layer, frequency),
            "seconds": quality["seconds"]}


def steering_rose(model, tok, sae, layer, frequency) -> int:
    """tests/test_features.py's steering count: of the 20 sharpest live features, how many raise
    the token they promote most at strength STRENGTH."""
    import torch

    import techniques as T
    from techniques._arch import arch

    with torch.no_grad():
        logits = torch.cat([arch(model).unembed(model, sae.W_dec[i:i + 256]).float() for i in range(0, sae.cfg.d_sae, 256)])
    sharpness = (logits.max(-1).values - logits.mean(-1)) / logits.std(-1)
    sharpness[frequency == 0] = -1
    rose = 0
    for feature in sharpness.topk(20).indices.tolist():
        steered = T.steer_with_feature(model, tok, "Tell me about your day.", feature, strength=STRENGTH,
                                       max_new_tokens=1)
        rose += steered["promoted"][0]["after"] > steered["promoted"][0]["before"]
    return rose


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    adapter = str(organisms.build_file(ROOT / "experiments" / "zoo" / "preference.yaml"))
    out = ROOT / "bench" / "sae_seeds.json"
    rows = json.loads(out.read_text()) if out.is_file() else {}
    for seed in args.seeds:
        rows[str(seed)] = measure(seed, adapter)
        print(json.dumps(rows[str(seed)]), flush=True)
        out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
