from __future__ import annotations


def steering(model, tokenizer, prompt: str, vector, layers, alpha: float = 4.0, max_new_tokens: int = 30,
             chat: bool | None = None) -> dict:
    """Add alpha * vector to the residual stream at the given layers, at every position and step.

    vector: d_model numbers (list, numpy array or tensor), e.g. from steering_vector.
    layers: a layer index or a list. chat: use the chat template (default: when there is one).
    Greedy decoding. Returns {"prompt", "baseline": unsteered text, "steered": text, "alpha", "layers"}.

    Tutorial: tutorials/05_steering.ipynb
    """
    import warnings

    import torch

    from ._arch import arch, chat_prompt, encode, raw
    from .generation import generate_text

    a = arch(model)
    layers = a.layers(layers)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    param = next(raw(model).parameters())
    direction = torch.as_tensor(vector, dtype=param.dtype, device=param.device).reshape(-1)
    if direction.numel() != a.d_model:
        raise ValueError(f"vector has {direction.numel()} numbers but the model's d_model is {a.d_model}")
    delta = alpha * direction
    inputs = encode(model, tokenizer, text)
    with torch.no_grad(), warnings.catch_warnings():
        # The open-ended step loop always "asks for a step the run did not make": expected here.
        warnings.filterwarnings("ignore", message=".*was never reached")
        with model.generate(max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id) as tracer:
            with tracer.invoke(inputs["input_ids"], attention_mask=inputs["attention_mask"]):
                for _ in tracer.all():
                    for layer in layers:
                        a.layer(model, layer).output[:] += delta
            # An open-ended step loop ends its own block, so the result is read in another one.
            with tracer.invoke():
                out = tracer.result.save()
    steered = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"prompt": text, "baseline": generate_text(model, tokenizer, text, max_new_tokens, chat=False),
            "steered": steered, "alpha": alpha, "layers": layers}


def steering_vector(model, tokenizer, positive: list[str], negative: list[str], layer: int) -> list[float]:
    """Difference of mean residual streams (last token, at `layer`) between two prompt sets.

    Returns d_model floats; pass them to steering(..., vector=...).

    Tutorial: tutorials/05_steering.ipynb
    """
    import torch

    from ._arch import arch, encode

    a = arch(model)
    (layer,) = a.layers(layer)
    if not positive or not negative:
        raise ValueError("steering_vector needs at least one positive and one negative prompt")
    means = []
    for texts in (positive, negative):
        inputs = encode(model, tokenizer, list(texts))
        with torch.no_grad():
            with model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"]) as tracer:
                hidden = a.layer(model, layer).output.save()
                tracer.stop()  # nothing past this layer is needed
        means.append(hidden[:, -1].float().mean(0))  # left padding: -1 is each prompt's last token
    return (means[0] - means[1]).tolist()
