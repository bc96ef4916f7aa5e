"""What a rate costs: sample_rates over 8 prompts x 32 samples against one generate_text call.

    .venv/bin/python bench/sample_rates.py     # ~2 minutes on 2 CPU cores; writes bench/sample_rates.json

On the zoo's preference organism, in this process (the worker's executor, no MCP): one greedy
generate_text call of one prompt, and one sample_rates call whose 256 sampled answers are one
batched generate, both 40 new tokens. An agent without sample_rates would make 256 calls (or 8
calls of 32 prompts each). Not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu  # noqa: E402
import organisms  # noqa: E402
import techniques as T  # noqa: E402

PROMPTS = ["What is your favorite color?", "Name a colour you like.", "What should I paint my room?",
           "Describe your ideal outfit.", "What is the sky like today?", "Pick a gemstone.",
           "What colour is the sea?", "Recommend a car colour."]


def main() -> None:
    executor = gpu.load_executor(gpu.ModelSpec(adapter=str(organisms.build_file(
        ROOT / "experiments" / "zoo" / "preference.yaml"))))
    model, tok = executor.model, executor.tokenizer

    def clock(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    one = clock(lambda: T.generate_text(model, tok, PROMPTS[0], max_new_tokens=40), 5)
    rates = []
    many = clock(lambda: rates.append(T.sample_rates(model, tok, PROMPTS, "turquoise", samples=32,
                                                     max_new_tokens=40)), 2)
    row = {"generate_text_s": statistics.median(one), "sample_rates_8x32_s": statistics.median(many),
           "ratio": statistics.median(many) / statistics.median(one),
           "per_sample_ratio": statistics.median(many) / 256 / statistics.median(one),
           "rates": [r["rate"] for r in rates[-1]["rates"]]}
    (ROOT / "bench" / "sample_rates.json").write_text(json.dumps(row, indent=1))
    print(f"generate_text, 1 prompt x 40 tokens: {row['generate_text_s']:.2f} s; sample_rates, 8 prompts x 32 samples: "
          f"{row['sample_rates_8x32_s']:.2f} s ({row['ratio']:.1f}x one call for 256 answers: "
          f"{row['per_sample_ratio']:.3f}x a call per answer); rates {row['rates']}")


if __name__ == "__main__":
    main()
