"""The sparse autoencoder (SAE) of the embedded model: trained once, offline, beside the model
cache, in SAELens's format, with its quality measured and a feature index for the techniques.

    .venv/bin/python saes.py build      # train (cached) and print its quality

What it is trained on needs no network: English paragraphs that Python itself ships (the
documentation topics of `pydoc_data`) and the model's own answers to SEEDS, a fixed, diverse set
of chat prompts (an answer that names the model is left out, so no feature example does).
The residual stream after layer LAYER (TransformerLens's `blocks.L.hook_resid_post`, the hook
GemmaScope's residual SAEs use) is collected, massive positions left out (techniques.features:
the first token's residual is a hundred times the others'), and a BatchTopK SAE is trained with
sae-lens's own trainer, saved as the JumpReLU SAE that BatchTopK becomes for inference.

The folder also holds corpus.json (the token ids of every text), index.pt (each feature's
strongest activations over the corpus: where and how strong) and quality.json, written last.
Training is worker-side (torch, sae-lens); naming the folder imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import gpu
from techniques.features import CONTEXT, PARAGRAPHS, feature_index, led, ordinary, paragraphs

LAYER = 15  # of the embedded model's 30: a middle layer
EXPANSION, K = 4, 32  # features per residual dimension; mean active features per token
STEPS, BATCH, LR = 1500, 256, 4e-4
ANSWER_TOKENS = 48
HELD_OUT = 0.1  # share of the texts the quality is measured on, never trained on
VERSION = 5  # bump when training or the corpus change
SEED = 0

SEEDS = [
    # everyday knowledge, how-to and writing
    "Tell me a short story about a lighthouse keeper.", "How do volcanoes form?", "What is a good recipe for pancakes?",
    "Explain photosynthesis to a child.", "Write a haiku about winter.", "What causes the seasons on Earth?",
    "How do I write a for loop in Python?", "Who was Cleopatra?", "Give me tips for a job interview.",
    "Why is the sky blue?", "Describe the taste of a lemon.", "What are the rules of chess?", "How do vaccines work?",
    "Write a limerick about a cat.", "What is the Pythagorean theorem?", "Plan a three-day trip to Rome.",
    "What is inflation in economics?", "How do bees communicate?", "What should I pack for a camping trip?",
    "Explain how a car engine works.", "What is the French Revolution?", "How can I sleep better at night?",
    "Describe a thunderstorm.", "What is machine learning?", "Write a thank-you note to a teacher.",
    "How do plants grow from seeds?", "What is the tallest mountain?", "How do I make a budget?",
    "Tell me about the ocean's deepest trench.", "What is a black hole?", "How do I care for a houseplant?",
    "What was the Renaissance?", "Write a poem about the moon.", "How does the heart pump blood?",
    "What are prime numbers?", "Give me advice on learning a language.",
    "What is the difference between weather and climate?", "How do I apologize to a friend?",
    "Describe a busy market in the morning.", "How is glass made?", "What is democracy?", "Why do we dream?",
    "How do I bake bread?", "What makes music sound happy or sad?", "Tell me about the history of the bicycle.",
    "How do electric cars work?", "What is a healthy breakfast?", "Explain gravity in simple words.",
    "What is the water cycle?", "Write a short dialogue between two robots.", "How do I start running?",
    "What are the planets of the solar system?", "How do computers store numbers?", "What is kindness?",
    "Describe the smell of rain.", "How do birds migrate?",
    # colours, art and design
    "Describe a rainbow after a storm.", "What colours go well together in a living room?",
    "Describe a sunset over the sea.", "What colours would you paint a child's bedroom?",
    "Describe the colours of a coral reef.", "Describe a field of flowers in spring.",
    "How do painters mix green paint?", "What does a peacock look like?", "Describe a jewellery shop window.",
    "What colour is the ocean on a cloudy day?", "Describe autumn leaves in a park.",
    "How do I choose a colour for my front door?", "Describe a stained glass window.",
    "What colours are in a bowl of fruit?", "Describe the night sky in the desert.",
    # food and drink
    "How do I make a cup of green tea?", "What is the best way to brew coffee?", "Describe a cosy cafe on a rainy day.",
    "What is a refreshing drink for summer?", "How do I make hot chocolate?", "What should I cook for a dinner party?",
    "Describe the taste of dark chocolate.", "How do I make a fruit smoothie?", "What spices go into a curry?",
    "What is a simple soup recipe?", "Describe a picnic in the countryside.", "What is a good snack for a long walk?",
    "How do I make lemonade?", "What cheeses go well with bread?", "Describe breakfast at a seaside hotel.",
    # animals and nature
    "What do dolphins eat?", "Describe a fox in the snow.", "How do cats show affection?",
    "Why do dogs wag their tails?", "What animals live in the rainforest?", "How do elephants look after their young?",
    "Describe a horse running in a field.", "What do owls do at night?", "How do butterflies grow?",
    "Describe a penguin colony.", "Why do whales sing?", "What makes a good pet for a small flat?",
    "Describe a forest in the early morning.", "How do rivers shape valleys?", "Describe a garden full of birds.",
    # places and travel
    "What is there to see in Paris?", "Describe a day in Tokyo.", "What is the weather like in Iceland?",
    "Plan a weekend in London.", "Tell me about the Great Wall of China.", "What is special about Venice?",
    "Describe a village in the Alps.", "What can I visit in New York?", "Tell me about the pyramids of Egypt.",
    "What is Australia's outback like?", "Describe a beach in Thailand.", "What should I see in Canada?",
    "Tell me about the Amazon river.", "What is life like on a small island?",
    "Describe a train journey through mountains.",
    # music, books, films and games
    "What makes jazz different from blues?", "Describe an orchestra warming up.", "How do I learn to play the guitar?",
    "What is a sonnet?", "Recommend a classic novel and say why.", "What makes a mystery story exciting?",
    "Describe a rock concert.", "How are films made?", "What is the plot of a typical fairy tale?",
    "What board games are fun for a family?", "Describe a street musician.", "What makes a good song?",
    "Tell me about a famous painter.", "How do I start writing a novel?", "What is opera?",
    # seasons, weather and time
    "Describe a snowy morning.", "What do people do in summer?", "Describe spring in the city.",
    "What makes autumn special?", "How do hurricanes form?", "Describe a foggy harbour.", "What is a heatwave?",
    "How do I dress for cold weather?", "Describe the first day of winter.", "Why do leaves fall in autumn?",
    # hobbies, sport and everyday life
    "How do I get started with gardening?", "What are the rules of football?", "How do I knit a scarf?",
    "What is a good hobby for a quiet evening?", "How do I take better photographs?", "Describe a marathon race.",
    "How do I learn to swim?", "What do I need to go fishing?", "How do I start drawing?", "What is yoga good for?",
    "How do I keep my kitchen tidy?", "How do I plan a birthday party?", "What should I wear to a wedding?",
    "How do I fix a flat bicycle tyre?", "What games can children play outside?",
    # people, feelings and advice
    "How do I make new friends in a new city?", "What does it feel like to be homesick?", "How can I be more patient?",
    "How do I comfort a friend who is sad?", "What makes a good teacher?", "How do I deal with stress at work?",
    "Describe the feeling of winning a race.", "How do I say no politely?", "What makes people laugh?",
    "How do I stay motivated?", "Write a birthday message for my grandmother.", "How can I be a better listener?",
    "What is jealousy?", "How do I ask for a raise?", "Describe a family dinner.",
    # work, money and society
    "What does a nurse do?", "How does a bank work?", "What is a good way to save money?",
    "What does a farmer do in spring?", "How do elections work?", "What is the job of a firefighter?",
    "How does a newspaper get made?", "What is a small business?", "How do taxes work?", "What does an architect do?",
    # science, health and technology
    "How do magnets work?", "What is DNA?", "Why is the ocean salty?", "How does the internet work?",
    "What is a rainbow made of?", "How do we see colours?", "What are atoms?", "How does a telescope work?",
    "Why do we need vitamins?", "How does the brain store memories?", "What is a virus?", "How do solar panels work?",
    "What is an earthquake?", "How do phones send messages?", "Why do we sneeze?",
    # history and culture
    "Who were the Vikings?", "What was the Industrial Revolution?", "Tell me about ancient Greece.",
    "What were castles used for?", "Who was Leonardo da Vinci?", "How did people travel before cars?",
    "What is the Olympic Games' history?", "Tell me about the Silk Road.", "What was the Moon landing?",
    "How did writing begin?", "What are traditional festivals in India?", "Tell me about Chinese New Year.",
    "What is Halloween?", "How is tea grown?", "What is the history of chocolate?",
]
NAMED = re.compile(r"smol|hugging\s*face", re.IGNORECASE)  # the embedded model's names: kept out of the corpus


def folder(seed: int = SEED) -> Path:
    """The SAE's folder, named by what it is trained from."""
    settings = [VERSION, LAYER, EXPANSION, K, STEPS, BATCH, LR, CONTEXT, PARAGRAPHS, ANSWER_TOKENS, HELD_OUT, SEEDS, seed]
    key = hashlib.sha256(json.dumps([gpu.EMBEDDED_FILE, settings]).encode()).hexdigest()[:12]
    return gpu.cache_root(gpu.ModelSpec()) / "sae" / f"sae-L{LAYER}-{key}"  # never the model's name: agents may see it


def built(seed: int = SEED) -> Path | None:
    """The SAE's folder if it is built (quality.json is written last), else None."""
    path = folder(seed)
    return path if (path / "quality.json").is_file() else None


def build(log=print, seed: int = SEED) -> Path:
    """Train the SAE unless it is built; returns its folder. Another `seed` gives another build
    of the same recipe (another split, initialisation and batch order): what a machine whose
    arithmetic differs could get (bench/sae_seeds.py compares them)."""
    done = built(seed)
    if done:
        return done
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(gpu.BUILD_THREADS)
    path = gpu.resolve_model_path(gpu.ModelSpec())
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [tokenizer(led(tokenizer, t), truncation=True, max_length=CONTEXT)["input_ids"] for t in paragraphs()]
    texts += [ids for ids in _answers(hf, tokenizer) if not NAMED.search(tokenizer.decode(ids))]
    random.Random(seed).shuffle(texts)
    held = max(1, int(len(texts) * HELD_OUT))
    hidden, kept = _activations(hf, tokenizer, texts)
    acts = [h[k] for h, k in zip(hidden, kept)]
    log(f"corpus: {len(texts)} texts, {sum(len(a) for a in acts)} tokens ({time.perf_counter() - start:.0f}s)")
    sae = _train(torch.cat(acts[held:]), hf.config.hidden_size, seed)
    log(f"trained ({time.perf_counter() - start:.0f}s)")
    target = folder(seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    sae.save_inference_model(str(tmp))
    (tmp / "corpus.json").write_text(json.dumps({"tokens": texts, "held_out": held}))
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(tmp))  # measured as it will be served
    with torch.no_grad():
        encoded = (sae.encode(h) * k[:, None] for h, k in zip(hidden, kept))
        torch.save(feature_index(sae.cfg.d_sae, encoded), tmp / "index.pt")
    quality = {**_quality(sae, hf, tokenizer, texts[:held], acts), "layer": LAYER, "d_sae": sae.cfg.d_sae,
               "d_in": sae.cfg.d_in, "training_tokens": sum(len(a) for a in acts[held:]),
               "seconds": round(time.perf_counter() - start)}
    (tmp / "quality.json").write_text(json.dumps(quality, indent=1))
    if target.exists():  # a half-written folder of a build that died
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _answers(hf, tokenizer) -> list[list[int]]:
    """The model's greedy answers to SEEDS, each with its prompt, as chat-formatted token ids."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A system message of our own: the template's default one names the model.
    chats = [tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                            {"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
             for s in SEEDS]
    inputs = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():  # one batch: on a CPU each generation step costs nearly the same for 16 rows or 56
        out = hf.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    found = []
    for row, mask in zip(out, inputs["attention_mask"]):
        ids = row[int(len(mask) - mask.sum()):].tolist()
        while ids and ids[-1] == tokenizer.pad_token_id:
            ids.pop()
        found.append(ids[:CONTEXT])
    return found


class _Enough(Exception):
    """Raised by the hook: nothing past LAYER is needed."""


def _activations(hf, tokenizer, texts: list[list[int]]) -> tuple[list, list]:
    """Per text, the residual stream after LAYER at every position, and which positions an SAE
    reads (techniques.features.ordinary)."""
    import torch

    caught = []

    def hook(module, args, output):
        caught.append(output[0] if isinstance(output, tuple) else output)
        raise _Enough

    handle = hf.model.layers[LAYER].register_forward_hook(hook)
    found, kept = [], []
    try:
        for i in range(0, len(texts), 16):
            chunk = texts[i:i + 16]
            ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            for row, t in enumerate(chunk):
                ids[row, :len(t)], mask[row, :len(t)] = torch.tensor(t), 1
            caught.clear()
            with torch.no_grad(), contextlib.suppress(_Enough):
                hf(input_ids=ids, attention_mask=mask)
            ordinary_ = ordinary(caught[0], mask)
            found += [caught[0][row, :len(t)].float() for row, t in enumerate(chunk)]
            kept += [ordinary_[row, :len(t)] for row, t in enumerate(chunk)]
    finally:
        handle.remove()
    return found, kept


def _train(acts, d_in: int, seed: int, steps: int = STEPS):
    """A BatchTopK SAE trained by sae-lens's SAETrainer on shuffled batches of `acts`."""
    import torch
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=EXPANSION * d_in, k=K,
                                     metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post", context_size=CONTEXT,
                                                          prepend_bos=True))

    torch.manual_seed(seed)  # the SAE's initial weights
    torch.set_num_threads(gpu.BUILD_THREADS)  # build() pins them too; this is for a trainer called alone

    def batches():
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(acts), generator=generator)
            for i in range(0, len(order) - BATCH + 1, BATCH):
                yield acts[order[i:i + BATCH]]

    trainer = SAETrainer(SAETrainerConfig(
        total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=LR, lr_end=LR / 10,
        lr_warm_up_steps=steps // 30, lr_decay_steps=steps // 5, n_batches_for_norm_estimate=20,
        dead_feature_window=steps // 5, feature_sampling_window=steps // 3), BatchTopKTrainingSAE(cfg), batches())
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # its progress bar
        return trainer.fit()


def _quality(sae, hf, tokenizer, held: list[list[int]], acts: list) -> dict:
    """FVE, mean L0 and the next-token loss (clean, with the SAE's reconstruction in place of the
    layer's output, with that output zeroed) on the held-out texts; dead features over them all."""
    import torch

    x = torch.cat(acts[:len(held)])
    with torch.no_grad():
        f = sae.encode(x)
        fve = 1 - ((x - sae.decode(f)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        for a in acts:
            alive |= (sae.encode(a) > 0).any(0)
    losses = {mode: _loss(hf, tokenizer, held, sae, mode) for mode in ("clean", "sae", "zero")}
    return {"fve": round(fve.item(), 4), "l0": round((f > 0).float().sum(1).mean().item(), 2),
            "dead": int((~alive).sum()), "dead_share": round((~alive).float().mean().item(), 4),
            "loss_clean": round(losses["clean"], 4), "loss_sae": round(losses["sae"], 4),
            "loss_zero": round(losses["zero"], 4), "loss_increase": round(losses["sae"] - losses["clean"], 4),
            "loss_recovered": round((losses["zero"] - losses["sae"]) / (losses["zero"] - losses["clean"]), 4),
            "held_out_tokens": int(x.shape[0])}


def _loss(hf, tokenizer, texts: list[list[int]], sae, mode: str) -> float:
    """Mean next-token loss over `texts`, LAYER's output (where an SAE reads it) as `mode` says."""
    import torch

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        keep = ordinary(hidden, torch.ones(hidden.shape[:2]))
        hidden[keep] = sae.decode(sae.encode(hidden[keep])) if mode == "sae" else 0
        return output

    handle = hf.model.layers[LAYER].register_forward_hook(hook) if mode != "clean" else None
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([t])
                logits = hf(input_ids=ids).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
                total, count = total + loss.item(), count + len(t) - 1
    finally:
        if handle is not None:
            handle.remove()
    return total / max(count, 1)


def describe(quality: dict) -> str:
    return (f"{quality['d_sae']} features on layer {quality['layer']}'s residual stream, trained on "
            f"{quality['training_tokens']} tokens in {quality['seconds']}s: FVE {quality['fve']:.3f}, mean L0 "
            f"{quality['l0']:.1f}, dead {quality['dead']} ({quality['dead_share']:.1%}), next-token loss "
            f"{quality['loss_clean']:.3f} -> {quality['loss_sae']:.3f} (+{quality['loss_increase']:.3f}; "
            f"{quality['loss_recovered']:.1%} of the loss that zeroing the layer adds is recovered)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="saes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--seed", type=int, default=SEED, help="another build of the same recipe (default %(default)s: "
                        "the one the techniques serve)")
    args = parser.parse_args(argv)
    path = build(log=lambda line: print(f"[sae] {line}", flush=True), seed=args.seed)
    print(f"{path}\n{describe(json.loads((path / 'quality.json').read_text()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
