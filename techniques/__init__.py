"""Reusable interpretability techniques: plain functions `fn(model, tokenizer, ...)`.

Run them in the model worker with `client.run(logit_lens, text="...")`, or call them
directly on a model you loaded yourself and wrapped in nnsight. Importing this package is
light (no torch): each technique imports what it needs inside its own body.
"""

from __future__ import annotations

import inspect

__all__: list[str] = []


def catalog() -> list[dict]:
    """Each technique's name, signature and the first line of its docstring."""
    return [
        {
            "name": name,
            "signature": f"{name}{inspect.signature(fn)}",
            "summary": (inspect.getdoc(fn) or "").splitlines()[0],
        }
        for name in __all__
        if (fn := globals()[name]) is not None
    ]
