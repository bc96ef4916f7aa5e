"""The organisms one model worker serves: LoRA adapters of its one base model, loaded on demand
under opaque names, each session bound to one of them (or to the untouched base), and batches
whose rows each run with their own adapter (peft's `adapter_names`).

An audit of a zoo is many organisms of one base, audited by many agents at once. One worker per
base holds the base weights once; each organism adds only its LoRA (a few MB). A session's
server binds it (`Organisms.bind`: a random token for its kernels, the adapter's folder, the
experiment's alias), so a call runs with its own organism active and only it; nothing in the
model names which organism that is, where its adapter lives or which others are loaded beyond
their opaque names (`organism_0`, ...). Loaded adapters are kept, least recently used first out
past `max_loaded`.

Worker-side (peft, torch); gpu.py uses it. Importing this module is light.
"""

from __future__ import annotations

import contextlib
import secrets as _secrets
from collections import OrderedDict
from dataclasses import dataclass, field

BASE = "__base__"  # peft's name, in a mixed batch, for a row that runs without any adapter
MAX_LOADED = 64  # adapters kept on one worker (r = 8 on a 135M model: 1.5 MB each; on an 8B one ~20 MB)


@dataclass(frozen=True)
class Binding:
    """What a session's calls run with: its organism (an adapter folder; "" = the base itself),
    the only name the agent sees for the model, and what replies must never show."""

    adapter: str = ""
    alias: str = ""
    secrets: dict = field(default_factory=dict, hash=False, compare=False)


class Organisms:
    """The adapters on one base model and the sessions bound to them. `changes` counts loads and
    evictions: each injects or removes modules the worker must see again (gpu.Executor)."""

    def __init__(self, hf_model, default: Binding = Binding(), max_loaded: int = MAX_LOADED):
        self.hf = hf_model  # the base, with LoRA layers injected in place once an adapter is loaded
        self.peft = None  # the PeftModel that owns those layers
        self.default = default  # what calls that name no binding run with (a server of one organism)
        self.max_loaded = max_loaded
        self.changes = 0
        self._names: OrderedDict[str, str] = OrderedDict()  # adapter folder -> opaque name, least recent first
        self._made = 0
        self._bindings: dict[str, Binding] = {}

    @property
    def loaded(self) -> int:
        return len(self._names)

    # -- loading ---------------------------------------------------------------------------------
    def name_of(self, adapter: str) -> str | None:
        """The opaque name `adapter` runs under, loading it first if need be (None: the base)."""
        if not adapter:
            return None
        if adapter in self._names:
            self._names.move_to_end(adapter)
            return self._names[adapter]
        name = f"organism_{self._made}"
        if self.peft is None:
            from peft import PeftModel

            # Not merged: the LoRA layers sit in place (module paths unchanged) and can be switched
            # off for a base-vs-organism comparison in the same call (techniques.base_model).
            self.peft = PeftModel.from_pretrained(self.hf, adapter, adapter_name=name).eval()
            peft = self.peft
            # PEFT's own idiom works on the wrapped model too: `with model.disable_adapter(): ...`;
            # a closure, not the PeftModel's bound method, so its peft_config is not an attribute away.
            self.hf.disable_adapter = lambda: peft.disable_adapter()
            self.hf.scribe_base = self.hf.disable_adapter
            rows = self.rows  # a closure too: a bound method's __self__ would hold every session's binding
            self.hf.scribe_rows = lambda organisms: rows(organisms)
            self.base = _base_of(peft.peft_config[name])
        else:
            self.peft.load_adapter(adapter, adapter_name=name)
            theirs = _base_of(self.peft.peft_config[name])
            if theirs != self.base:
                self.peft.delete_adapter(name)
                raise ValueError(f"{adapter} is an adapter of another base model ({theirs}); this worker serves "
                                 f"adapters of {self.base}: serve it from a worker of its own base")
        # peft copies every adapter's config onto the model for transformers; nothing reads it there,
        # and there it would list the other organisms a session's model is not.
        vars(self.hf).pop("peft_config", None)
        self._made += 1
        self._names[adapter] = name
        self.changes += 1
        self._evict(keep=adapter)
        return name

    def _evict(self, keep: str = "") -> None:
        """Past max_loaded, the least recently used adapters no session is bound to are deleted
        (never `keep`: the one being loaded for a binding)."""
        in_use = {b.adapter for b in self._bindings.values()} | {self.default.adapter, keep}
        for adapter in [a for a in self._names if a not in in_use][:max(0, len(self._names) - self.max_loaded)]:
            self.peft.delete_adapter(self._names.pop(adapter))
            self.changes += 1

    # -- sessions --------------------------------------------------------------------------------
    def bind(self, binding: Binding, token: str = "") -> str:
        """A token (new, or `token` again after a restart) for calls that must run with `binding`;
        its adapter is loaded now, so a missing or mismatched one is refused here, before any call."""
        self.name_of(binding.adapter)
        token = token or _secrets.token_hex(16)
        self._bindings[token] = binding
        return token

    def unbind(self, token: str) -> None:
        """The session is over: its organism may be evicted once no other session uses it."""
        self._bindings.pop(token, None)
        self._evict()

    def binding(self, token: str | None) -> Binding:
        if not token:
            return self.default
        try:
            return self._bindings[token]
        except KeyError:
            raise ValueError("this session's organism is not bound on the model worker (the worker was restarted "
                             "since): restart the session") from None

    @contextlib.contextmanager
    def active(self, binding: Binding):
        """The block runs with `binding`'s organism active and no other (the base: none)."""
        name = self.name_of(binding.adapter)
        if self.peft is None:
            yield
        elif name is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(name, inference_mode=True)
            yield

    def rows(self, organisms: list):
        """The context in which one batched forward or generate runs row i with `organisms[i]`'s
        adapter (a Binding; None: the base)."""
        names = [BASE if b is None else (self.name_of(b.adapter) or BASE) for b in organisms]
        return self.peft._enable_peft_forward_hooks(adapter_names=names)


def _base_of(config) -> str:
    """The base model an adapter was trained on, as one spelling of it: the last part of its name
    or folder (a hub id and the local folder it was converted to agree there)."""
    return str(getattr(config, "base_model_name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]
