"""Where things live inside a model, so every technique works on Llama- and GPT-2-style models.

Light at import (no torch): techniques import this inside their bodies, in the worker.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

# family: (blocks, attention in a block, mlp in a block, attention's output projection, final norm)
_LAYOUTS = {
    "llama": ("model.layers", "self_attn", "mlp", "o_proj", "model.norm"),  # Llama, Qwen, Gemma, Mistral, ...
    "gpt2": ("transformer.h", "attn", "mlp", "c_proj", "transformer.ln_f"),
}
COMPONENTS = ("resid", "attn", "mlp")


def raw(model):
    """The plain Hugging Face module behind an nnsight wrapper (or the model itself)."""
    return getattr(model, "_module", model)


@contextlib.contextmanager
def base_model(model):
    """The base model behind a model organism, in the same process: `with base_model(model) as base:`.

    With a PEFT adapter, `base` is the same model with the adapter switched off (traces inside
    the block see base activations); with an experiment's `base_model`, it is that second model.
    Raises ValueError when the model has no base to compare with.
    """
    with require_base(model)() as other:
        yield model if other is None else other


def has_base(model) -> bool:
    return getattr(raw(model), "scribe_base", None) is not None


def require_base(model):
    """The switch to the base model; ValueError when there is none."""
    if not has_base(model):
        raise ValueError("this model has no base to compare with: serve an experiment with an `adapter` "
                         "(or a `base_model` for a full fine-tune)")
    return raw(model).scribe_base


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has(obj, path: str) -> bool:
    try:
        _get(obj, path)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class Arch:
    family: str
    n_layers: int
    n_heads: int
    d_model: int
    head_dim: int
    paths: tuple

    def layer(self, model, i: int):
        return _get(model, self.paths[0])[i]

    def attn(self, model, i: int):
        return getattr(self.layer(model, i), self.paths[1])

    def mlp(self, model, i: int):
        return getattr(self.layer(model, i), self.paths[2])

    def out_proj(self, model, i: int):
        """Its input holds the heads' outputs side by side: [batch, pos, n_heads * head_dim]."""
        return getattr(self.attn(model, i), self.paths[3])

    def norm(self, model):
        return _get(model, self.paths[4])

    def site(self, model, i: int, component: str):
        """The activation a patch or an ablation writes to (a tensor inside a trace)."""
        if component == "resid":
            return self.layer(model, i).output
        if component == "attn":
            return self.attn(model, i).output[0]  # (attn_output, attn_weights)
        if component == "mlp":
            return self.mlp(model, i).output
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")

    def run_sites(self, model, ids, layers, component: str):
        """One forward of `ids`: each layer's site activation and the logits (grad mode is the caller's).

        Under grad mode every site requires grad, so gradients reach it even when no weight does
        (a PEFT organism's weights are all frozen, and autograd would have no graph at all)."""
        import torch

        acts = {}
        with model.trace(ids):
            for layer in sorted(set(layers)):  # modules must be read in execution order
                site = self.site(model, layer, component)
                if torch.is_grad_enabled() and not site.requires_grad:
                    site.requires_grad_(True)
                acts[layer] = site.save()
            logits = model.lm_head.output.save()
        return acts, logits

    def layers(self, layers) -> list[int]:
        """Validated layer indices (negative ones count from the end), in the order given."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for layer in layers:
            if not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
                raise ValueError(f"layer {layer!r} is out of range: the model has {self.n_layers} layers "
                                 f"(0..{self.n_layers - 1}, or negative from the end); layer i is the output that "
                                 f"output_hidden_states gives as hidden_states[i + 1] ({self.n_layers + 1} states: "
                                 "hidden_states[0] is the embeddings)")
            out.append(layer % self.n_layers)
        return out

    def unembed(self, model, hidden):
        """Final norm + unembedding (+ Gemma's logit soft-cap), as the model's own head does it."""
        import torch

        hf = raw(model)
        logits = _get(hf, "lm_head")(_get(hf, self.paths[4])(hidden))
        cap = getattr(_text_config(hf), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _text_config(hf):
    return getattr(hf.config, "text_config", None) or hf.config


def arch(model) -> Arch:
    hf = raw(model)
    family = next((name for name, paths in _LAYOUTS.items() if _has(hf, paths[0]) and _has(hf, paths[4])), None)
    if family is None:
        raise ValueError(f"unsupported architecture {type(hf).__name__}: techniques know Llama/Qwen/Gemma/"
                         "Mistral-style (model.layers) and GPT-2-style (transformer.h) causal LMs")
    cfg = _text_config(hf)
    paths = _LAYOUTS[family]
    proj = getattr(getattr(_get(hf, paths[0])[0], paths[1]), paths[3])
    proj_in = getattr(proj, "in_features", None) or proj.weight.shape[0]  # GPT-2's Conv1D: [in, out]
    return Arch(family, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size,
                proj_in // cfg.num_attention_heads, paths)


def encode(model, tokenizer, texts):
    """Tokenize one text or a batch (left-padded, so position -1 is every row's last token)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Per call, not tokenizer.padding_side: the tokenizer is shared with every other caller.
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(raw(model).device)


def token_id(tokenizer, text: str) -> int:
    """The id of the first token of `text` (answers such as " Paris" are usually one token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} does not tokenize to any token")
    return ids[0]


def positions(n_tokens: int, wanted) -> list[int]:
    """Validated positions (negative from the end)."""
    if isinstance(wanted, int):
        wanted = [wanted]
    out = []
    for p in wanted:
        if not isinstance(p, int) or not -n_tokens <= p < n_tokens:
            raise ValueError(f"position {p!r} is out of range for a prompt of {n_tokens} tokens")
        out.append(p % n_tokens)
    return out


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The user turn in the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        return f"User: {user}\nAssistant: "
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def top_tokens(tokenizer, probs, k: int) -> list:
    """Top-k of a [..., vocab] tensor as nested lists of {"token", "id", "prob"} (one topk, one decode)."""
    values, ids = probs.topk(k, dim=-1)
    flat_ids = ids.reshape(-1).tolist()
    words = tokenizer.batch_decode([[i] for i in flat_ids])
    entries = [{"token": w, "id": i, "prob": p} for w, i, p in zip(words, flat_ids, values.reshape(-1).tolist())]
    nested = [entries[j:j + k] for j in range(0, len(entries), k)]
    for size in reversed(ids.shape[1:-1]):
        nested = [nested[j:j + size] for j in range(0, len(nested), size)]
    return nested if ids.dim() > 1 else nested[0]


def token_strings(tokenizer, ids) -> list[str]:
    """Each id of a 1-D tensor decoded on its own."""
    return tokenizer.batch_decode([[i] for i in ids.tolist()])


def prompt_pair(model, tokenizer, clean: str, corrupted: str, answer: str, wrong_answer: str):
    """Token ids of two equally long prompts and the two answer token ids of a logit difference."""
    ids_clean = encode(model, tokenizer, clean)["input_ids"]
    ids_corrupted = encode(model, tokenizer, corrupted)["input_ids"]
    if ids_clean.shape != ids_corrupted.shape:
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({ids_clean.shape[1]} vs {ids_corrupted.shape[1]}): reword one of them")
    return ids_clean, ids_corrupted, token_id(tokenizer, answer), token_id(tokenizer, wrong_answer)


def patch_columns(n_tokens: int, wanted) -> tuple[list[list[int]], list]:
    """Which positions each grid column patches: each one separately (None), all at once ("all"), or a list."""
    if wanted is None:
        return [[p] for p in range(n_tokens)], list(range(n_tokens))
    if wanted == "all":
        return [list(range(n_tokens))], ["all"]
    pos = positions(n_tokens, wanted)
    return [[p] for p in pos], pos


def normalize(values, clean: float, corrupted: float) -> list:
    """Logit differences rescaled so the clean run is 1 and the corrupted run is 0."""
    if abs(clean - corrupted) < 1e-6:
        raise ValueError(f"the clean and corrupted prompts give the same logit difference ({clean:.4f}): "
                         "there is nothing to patch; pick prompts whose answers differ")
    return ((values - corrupted) / (clean - corrupted)).tolist()
