"""Reusable interpretability techniques: plain functions `fn(model, tokenizer, ...)`.

Run them in the model worker with `client.run(logit_lens, text="...")`, or call them
directly on a model you loaded yourself and wrapped in nnsight. Every one returns plain,
JSON-serializable values. Importing this package is light (no torch): each technique imports
what it needs inside its own body. Plotting helpers (`techniques.plotting`) draw results.
"""

from __future__ import annotations

import inspect
import re

from .ablation import ablation
from .activation_patching import activation_patching
from .attention import attention_patterns
from .attribution_patching import attribution_patching
from .auditing import adapter_directions, amplify_adapter, sample_rates
from ._arch import base_model
from .diffing import compare_to_base, score_candidates
from . import features
from .dla import direct_logit_attribution
from .features import contrastive_features, feature_examples, sae_features, search_features, steer_with_feature
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
    patchscope, extract_activations, train_probe, compare_to_base, score_candidates,
    sample_rates, adapter_directions, amplify_adapter,
    sae_features, feature_examples, search_features, contrastive_features, steer_with_feature,
]
# These need a sparse autoencoder served with the model: offered only where one is.
SAE_TECHNIQUES = tuple(fn.__name__ for fn in TECHNIQUES if fn.__module__ == features.__name__)
PLOTS = [plot_logit_lens, plot_patching, plot_attention]
__all__ = [fn.__name__ for fn in TECHNIQUES + PLOTS] + ["base_model"]


def catalog(functions=None) -> list[dict]:
    """Each technique's name, signature (without model and tokenizer), summary (the docstring's
    first sentence) and what it returns (from the docstring's "Returns ..." sentence)."""
    entries = []
    for fn in TECHNIQUES if functions is None else functions:
        params = list(inspect.signature(fn).parameters.values())
        if params[:2] and [p.name for p in params[:2]] == ["model", "tokenizer"]:
            params = params[2:]
        doc = inspect.getdoc(fn) or ""
        entries.append({
            "name": fn.__name__,
            "signature": f"{fn.__name__}({', '.join(_describe(p) for p in params)})",
            "summary": _first_sentence(doc) if doc else "(no description)",
            "returns": _returns(doc),
        })
    return entries


def _first_sentence(doc: str) -> str:
    """The docstring's first sentence, however many lines it is wrapped on."""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    return re.split(r"(?<!e\.g)(?<!i\.e)(?<=[.!?])\s", paragraph, maxsplit=1)[0]


def _returns(doc: str) -> str:
    """The docstring's sentences from "Returns ..." to the end of that paragraph, as one line."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if "Returns " in line), None)
    if start is None:
        return ""
    text = []
    for line in lines[start:]:
        if not line.strip():
            break
        text.append(line.strip())
    joined = " ".join(text)
    return joined[joined.index("Returns ") + len("Returns "):].strip()


def _describe(param: inspect.Parameter) -> str:
    text = param.name
    if param.annotation is not inspect.Parameter.empty:
        text += f": {param.annotation}"  # already a string: annotations are postponed
    if param.default is not inspect.Parameter.empty:
        text += f" = {param.default!r}"
    return text
