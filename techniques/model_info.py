from __future__ import annotations

from ._result import Result


def get_model_info(model, tokenizer) -> dict:
    """Architecture, layer count, hidden size, heads, vocab, dtype, device and parameter count.

    Returns a dict of plain values.
    """
    from ._arch import _text_config, arch, raw

    hf = raw(model)
    a = arch(model)
    cfg = _text_config(hf)
    param = next(hf.parameters())
    return Result({
        "architecture": type(hf).__name__,
        "family": a.family,
        "name_or_path": getattr(hf.config, "_name_or_path", ""),
        "n_layers": a.n_layers,
        "d_model": a.d_model,
        "n_heads": a.n_heads,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", a.n_heads),
        "head_dim": a.head_dim,
        "vocab_size": cfg.vocab_size,
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "n_params": sum(p.numel() for p in hf.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }, "get_model_info")
