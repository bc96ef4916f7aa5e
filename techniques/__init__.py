"""Reusable interpretability techniques: plain functions `fn(model, tokenizer, ...)`.

Run them in the model worker with `client.run(logit_lens, text="...")`, or call them
directly on a model you loaded yourself and wrapped in nnsight. Every one returns plain,
JSON-serializable values. Importing this package is light (no torch): each technique imports
what it needs inside its own body. Plotting helpers (`techniques.plotting`) draw results.
"""

from __future__ import annotations

import inspect

from .ablation import ablation
from .activation_patching import activation_patching
from .attention import attention_patterns
from .attribution_patching import attribution_patching
from .dla import direct_logit_attribution
from .generation import generate_text
from .logit_lens import logit_lens
from .model_info import get_model_info
from .patchscope import patchscope
from .plotting import plot_attention, plot_logit_lens, plot_patching
from .prefill import prefill_attack
from .probing import extract_activations, train_probe
from .steering import steering, steering_vector
from .token_probs import analyze_token_probs

TECHNIQUES = [
    get_model_info, generate_text, analyze_token_probs, prefill_attack, logit_lens, activation_patching,
    attribution_patching, steering, steering_vector, attention_patterns, direct_logit_attribution, ablation,
    patchscope, extract_activations, train_probe,
]
PLOTS = [plot_logit_lens, plot_patching, plot_attention]
__all__ = [fn.__name__ for fn in TECHNIQUES + PLOTS]


def catalog() -> list[dict]:
    """Each technique's name, signature (without model and tokenizer) and one-line summary."""
    entries = []
    for fn in TECHNIQUES:
        params = list(inspect.signature(fn).parameters.values())[2:]
        entries.append({
            "name": fn.__name__,
            "signature": f"{fn.__name__}({', '.join(_describe(p) for p in params)})",
            "summary": inspect.getdoc(fn).splitlines()[0],
        })
    return entries


def _describe(param: inspect.Parameter) -> str:
    text = param.name
    if param.annotation is not inspect.Parameter.empty:
        text += f": {param.annotation}"  # already a string: annotations are postponed
    if param.default is not inspect.Parameter.empty:
        text += f" = {param.default!r}"
    return text
