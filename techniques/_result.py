"""Technique results: plain dicts (JSON-serializable, every key as documented) that show a
small summary when a notebook displays them, instead of thousands of characters of lists.

Light at import (no torch): results are unpickled in notebook kernels.
"""

from __future__ import annotations

SHOWN_MAX = 1500


def _shape(value) -> str:
    dims = []
    while isinstance(value, (list, tuple)) and value:
        dims.append(len(value))
        value = value[0]
    return "x".join(map(str, dims)) if dims else "empty"


def _brief(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}" if len(repr(value)) > 60 else repr(value)
    if isinstance(value, (list, tuple)) and len(repr(value)) > 60:
        return f"[{_shape(value)}]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Result(dict):
    """A dict whose repr is a compact summary; `dict(result)` or any key gives the full data."""

    title = "result"

    def __init__(self, data=(), title: str | None = None):
        super().__init__(data)
        if title:
            self.title = title

    def rebuild(self, data: dict) -> Result:
        """The same kind of result around other data (the worker converts tensors first)."""
        return type(self)(data, self.title)

    def __reduce__(self):  # keep the title through pickling (a dict subclass pickles its items only)
        return type(self), (dict(self), self.title)

    def highlights(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        keys = "  ".join(f"{k}={_brief(v)}" for k, v in self.items())
        lines = [f"{self.title}  (a dict; full data by key)", keys, *self.highlights()]
        text = "\n".join(lines)
        return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 4] + " ..."

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def _tok(token: str) -> str:
    return repr(token[:14])


class LensResult(Result):
    title = "logit_lens"

    def highlights(self) -> list[str]:
        lines = []
        for col, pos in enumerate(self["positions"][:2]):
            lines.append(f"position {pos} ({_tok(self['tokens'][pos])}): layer -> top tokens (prob)")
            for row, layer in enumerate(self["layers"]):
                top = self["top"][row][col][:3]
                lines.append(f"  L{layer:<3}" + "  ".join(f"{_tok(t['token'])} {t['prob']:.2f}" for t in top))
        for target, probs in list(self["target_probs"].items())[:3]:
            lines.append(f"p({target!r}) by layer: " + " ".join(f"{row[0]:.2f}" for row in probs))
        return lines


class GridResult(Result):
    """activation / attribution patching: the strongest cells of the layers x positions grid."""

    title = "patching"

    def highlights(self) -> list[str]:
        cells = [(value, layer, pos) for layer, row in zip(self["layers"], self["grid"])
                 for pos, value in zip(self["positions"], row) if value is not None]
        cells.sort(key=lambda c: -abs(c[0]))
        tokens = self.get("tokens") or []

        def where(pos):
            return f"{pos} ({_tok(tokens[pos])})" if isinstance(pos, int) and pos < len(tokens) else str(pos)

        partial = [f"PARTIAL: {len(cells)} cells finished before the call was stopped (None: not reached)"] \
            if self.get("partial") else []
        head = (f"grid {len(self['layers'])} layers x {len(self['positions'])} positions (1 = clean, 0 = corrupted); "
                "strongest cells:")
        return partial + [head] + [f"  L{layer:<3} pos {where(pos)}: {value:+.3f}" for value, layer, pos in cells[:8]]


class AblationResult(Result):
    title = "ablation"

    def highlights(self) -> list[str]:
        effects = self.get("effects")
        if not effects:
            return []
        ranked = sorted(effects, key=lambda e: -abs(e["change"]))
        return ["largest changes:"] + [f"  {e['component']:<10} {e['change']:+.3f}" for e in ranked[:10]]


class ContributionResult(Result):
    """direct_logit_attribution: the largest per-layer contributions."""

    title = "direct_logit_attribution"

    def highlights(self) -> list[str]:
        parts = [(value, f"L{i}.{kind}") for kind in ("attn", "mlp") for i, value in enumerate(self.get(kind, []))]
        parts.sort(key=lambda p: -abs(p[0]))
        return ["largest contributions:"] + [f"  {name:<8} {value:+.3f}" for value, name in parts[:8]]


class Progress:
    """A progress line in the cell while a technique works through its items: done/total,
    elapsed time and an estimate of what is left (printed with \\r: the cell shows the last)."""

    def __init__(self, total: int, label: str):
        import time

        self.total, self.label, self.done, self._clock = total, label, 0, time.monotonic
        self._start, self._width = self._clock(), 0

    def step(self, n: int = 1) -> None:
        self.done += n
        elapsed = self._clock() - self._start
        left = elapsed / self.done * (self.total - self.done)
        end = "\n" if self.done >= self.total else ""
        line = f"{self.label}: {self.done}/{self.total} done, {elapsed:.0f}s elapsed, about {left:.0f}s left"
        # A \r frame overwrites the one before it only as far as it reaches: a shorter one ("about 0s
        # left" after "about 10s left") is padded, or the old frame's end shows after it ("leftft").
        print(f"\r{line:<{self._width}}", end=end, flush=True)
        self._width = max(self._width, len(line))

    def interrupted(self) -> None:
        """In `except KeyboardInterrupt:` (a timeout or cancel): the interrupt goes on when nothing
        is finished; otherwise the technique returns what is, marked partial, and says so here."""
        if not self.done:
            raise  # noqa: PLE0704 - re-raises the KeyboardInterrupt being handled
        print(f"\n{self.label}: interrupted; returning the {self.done} of {self.total} finished", flush=True)
