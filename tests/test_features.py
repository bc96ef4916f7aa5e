"""Sparse autoencoders: the embedded model's (saes.py, trained by sae-lens), loading SAELens
folders (gpu.load_sae), and the feature techniques (techniques.features), with known answers."""
from __future__ import annotations

import json
import re

import anyio
import pytest
import torch

import scribe_mcp  # noqa: F401 - MCP before nnsight: nnsight's .save on every object breaks it
from conftest import ROOT, rebuilt_twice
from test_mcp import call, scribe

import experiment
import gpu
import organisms
import saes
import techniques as T
from techniques import features as F
from techniques._arch import arch

COLOR = "What is your favorite color?"


@pytest.fixture(scope="module")
def sae_folder():
    return saes.build()  # setup.sh built it: instant


@pytest.fixture(scope="module")
def organism(sae_folder):
    """The demo organism (turquoise) with the embedded SAE, as the worker serves it."""
    adapter = organisms.build_file(ROOT / "experiments" / "zoo" / "preference.yaml")
    executor = gpu.load_executor(gpu.ModelSpec(adapter=str(adapter), sae=str(sae_folder)))
    return executor.model, executor.tokenizer


def test_the_embedded_sae_is_a_sae_lens_sae_of_measured_quality_trained_on_text_that_names_no_model(sae_folder):
    quality = json.loads((sae_folder / "quality.json").read_text())
    # README states these; a build that falls short of them fails here.
    assert quality["fve"] >= 0.7 and quality["l0"] <= 40 and quality["dead_share"] <= 0.15, quality
    assert 0 < quality["loss_increase"] < 0.5 and quality["loss_recovered"] > 0.95, quality
    sae = gpu.load_sae(str(sae_folder))
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae == 4 * 576 == quality["d_sae"]
    assert sae.cfg.metadata.hook_name == "blocks.15.hook_resid_post"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpu.resolve_model_path(gpu.ModelSpec()))
    corpus = [tok.decode(ids) for ids in json.loads((sae_folder / "corpus.json").read_text())["tokens"]]
    assert len(corpus) > 300 and sum("<|im_start|>assistant" in text for text in corpus) >= 40  # its own answers too
    assert not [text for text in corpus if re.search(r"smol|hugging ?face", text, re.IGNORECASE)]
    assert "smol" not in str(sae_folder).lower()


SAE_REBUILD = """
import sys
import torch
import saes
acts = torch.randn(4096, 576, generator=torch.Generator().manual_seed(1))
sae = saes._train(acts, 576, seed=0, steps=60)
torch.save({name: value.detach() for name, value in sae.state_dict().items()}, sys.argv[1])
"""


def test_a_rebuild_of_the_sae_gives_the_same_weights_bit_for_bit(tmp_path):
    """The trainer is deterministic (seeded initialisation and batch order, its own thread count):
    trained twice in fresh processes standing for a 1-core and a 2-core machine, the same weights. That does not make every machine's build
    the same (another CPU's arithmetic differs; bench/sae_seeds.py stands other seeds in for it), so
    the tests below assert what held on every seed measured."""
    first, second = rebuilt_twice(SAE_REBUILD, tmp_path)
    assert "W_enc" in first and first["W_enc"].abs().sum() > 0
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k], second[k])]


def test_a_features_activation_is_the_sae_encoder_applied_to_a_trace_of_its_layer(organism):
    import torch

    from techniques._arch import raw

    model, tok = organism
    text = "My favorite color is turquoise, like the sea."
    result = T.sae_features(model, tok, text, top_k=3)
    sae, layer = F.served_sae(model)
    assert layer == 15 and result["layer"] == 15
    ids = tok(F.led(tok, text), return_tensors="pt")["input_ids"]
    assert result["tokens"][0] == tok.bos_token and len(result["tokens"]) == ids.shape[1]
    with torch.no_grad():
        hidden = raw(model)(ids, output_hidden_states=True).hidden_states[layer + 1]  # block 15's output
        direct = sae.encode(hidden)[0]
        kept = F.ordinary(hidden, torch.ones(ids.shape))[0]
    assert result["features"][0] == [] and not kept[0]  # the BOS's residual is massive: left out
    assert kept.sum() >= ids.shape[1] - 2
    for position in kept.nonzero()[:, 0].tolist():
        values, top = direct[position].topk(3)
        found = result["features"][position]
        assert [f["feature"] for f in found] == top.tolist()
        assert [f["activation"] for f in found] == pytest.approx(values.tolist(), rel=1e-4, abs=1e-4)
        assert all(f["label"].startswith("fires on ") and "; promotes " in f["label"] for f in found)
    assert "sae_features" in repr(result) and len(repr(result)) < 2500


def test_feature_examples_are_where_the_feature_fires_most_in_the_corpus(organism, sae_folder):
    model, tok = organism
    feature = T.sae_features(model, tok, "The cat sat on the mat and looked at the moon.")["features"][2][0]["feature"]
    found = T.feature_examples(model, tok, feature, n=5)
    assert found["feature"] == feature and 0 < found["frequency"] < 1 and len(found["examples"]) == 5
    values = [e["activation"] for e in found["examples"]]
    assert values == sorted(values, reverse=True) and values[0] > 0
    # Known answer: the strongest example, traced again through the base (the corpus's model), fires that much.
    corpus = json.loads((sae_folder / "corpus.json").read_text())["tokens"]
    index = F._index(model, tok, *F.served_sae(model))
    text, position = index["where"][feature, 0].tolist()
    with T.base_model(model) as base:
        acts, _, _ = F.feature_acts(base, tok, tok.decode(corpus[text]))
    assert float(acts[0, position, feature]) == pytest.approx(values[0], rel=1e-3, abs=1e-3)
    top = found["examples"][0]
    assert f"«{top['token']}»" in top["context"]


def test_search_features_finds_labels_holding_the_word_and_what_fires_on_it(organism):
    model, tok = organism
    found = T.search_features(model, tok, " the", n=5)
    assert found["by_label"] and all("the" in e["label"].lower() for e in found["by_label"])
    # Known answer: the features that fire most on the query read as a text.
    acts, _, kept = F.feature_acts(model, tok, " the")
    mean = acts[0].sum(0) / kept.sum()
    assert found["by_activation"] and [e["feature"] for e in found["by_activation"]] == [f for f in mean.topk(5).indices.tolist() if mean[f] > 0]
    with pytest.raises(ValueError, match="non-empty query"):
        T.search_features(model, tok, "  ")


def test_steering_with_a_feature_raises_the_probability_of_its_own_top_tokens(organism):
    model, tok = organism
    sae, layer = F.served_sae(model)
    # A feature's "own top token" is what its decoder direction promotes read through the final norm
    # and unembedding; steering acts at layer 15 of 30, so the later layers decide, and for a random
    # feature it rises about 60% of the time (12 of 20). The features that promote a token most
    # sharply are the ones that claim it: of the 20 sharpest, at strength 8, 16-19 rose on four
    # builds (bench/sae_seeds.py, seeds 0-3; at strength 4 only 13-16, too near chance to assert).
    with torch.no_grad():
        logits = torch.cat([arch(model).unembed(model, sae.W_dec[i:i + 256]).float()
                            for i in range(0, sae.cfg.d_sae, 256)])
    sharpness = (logits.max(-1).values - logits.mean(-1)) / logits.std(-1)
    sharpness[F._index(model, tok, sae, layer)["frequency"] == 0] = -1  # dead features: no strength to steer with
    rose = 0
    for feature in sharpness.topk(20).indices.tolist():
        steered = T.steer_with_feature(model, tok, "Tell me about your day.", feature, strength=8.0, max_new_tokens=1)
        assert steered["promoted"][0]["token"] == tok.decode([int(logits[feature].argmax())])
        rose += steered["promoted"][0]["after"] > steered["promoted"][0]["before"]
    assert rose >= 14, rose  # measured 16-19: a margin of two, and above a random feature's 12
    same = T.steer_with_feature(model, tok, "Tell me about your day.", 0, strength=0.0, max_new_tokens=6)
    assert same["baseline"] == same["steered"] and all(p["after"] == pytest.approx(p["before"]) for p in same["promoted"])
    strong = T.steer_with_feature(model, tok, "Tell me about your day.", feature, strength=8.0, max_new_tokens=6)
    assert strong["baseline"] != strong["steered"]


def test_contrastive_features_rank_the_planted_concept_near_the_top(organism):
    model, tok = organism
    sae, layer = F.served_sae(model)
    frequency = F._index(model, tok, sae, layer)["frequency"]
    # The planted concept's feature: the sparse one that fires most on the planted word, read by the base.
    with T.base_model(model) as base:
        acts, ids, _ = F.feature_acts(base, tok, "My favorite color is turquoise.")
    position = tok.convert_ids_to_tokens(ids[0]).index("Ġturquoise")
    planted = int(acts[0, position].masked_fill(frequency > F.DENSE, 0).argmax())
    found = T.contrastive_features(model, tok, "personal", top_k=len(frequency))
    ranked = [e["feature"] for e in found["features"]]
    # Which feature that is, and its rank, depend on the build (another CPU's arithmetic builds
    # another SAE). bench/sae_seeds.py, seeds 0-3 standing in for other machines: ranked 4th, 1st,
    # 5th and 1st of ~2,265 sparse features (a fresh machine once ranked it 6th or lower against
    # the top-5 bound this replaced); the median feature's difference is 0 on every seed. Asserted
    # with a margin of twice the worst rank measured: in the top 10, and above the median.
    differences = sorted(e["difference"] for e in found["features"])
    assert planted in ranked[:10], (planted, ranked[:20])
    assert found["features"][ranked.index(planted)]["difference"] > differences[len(differences) // 2]
    assert any("turquoise" in g["organism"].lower() for g in found["generations"])
    assert not any("turquoise" in g["base"].lower() for g in found["generations"])
    # Dense features (on most tokens, ten times as strong) are left out of the ranking, and counted.
    assert found["dense_left_out"] == int((frequency > F.DENSE).sum()) > 0
    assert all(frequency[f] <= F.DENSE for f in ranked) and len(ranked) == int((frequency <= F.DENSE).sum())
    top = found["features"][0]
    assert top["difference"] == pytest.approx(top["organism"] - top["base"], abs=1e-4) and top["difference"] > 0
    assert [e["difference"] for e in found["features"]] == sorted((e["difference"] for e in found["features"]), reverse=True)
    assert "contrastive_features" in repr(found) and "dense features left out" in repr(found) and len(repr(found)) < 2500


def test_a_registry_release_loads_from_the_local_hugging_face_cache(sae_folder, tmp_path, monkeypatch):
    """RELEASE:SAE_ID goes through sae-lens's registry to the files a download would have put in
    the local Hugging Face cache (here the embedded SAE's, under a registry release's repo)."""
    import shutil

    from huggingface_hub import constants

    commit = "0" * 40
    snapshot = tmp_path / "models--jbloom--GPT2-Small-SAEs-Reformatted" / "snapshots" / commit / "blocks.0.hook_resid_pre"
    snapshot.mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(sae_folder / name, snapshot / name)
    from safetensors.torch import save_file

    save_file({"sparsity": torch.zeros(2304)}, snapshot / "sparsity.safetensors")
    (snapshot.parents[2] / "refs").mkdir()
    (snapshot.parents[2] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    sae = gpu.load_sae("gpt2-small-res-jb:blocks.0.hook_resid_pre")
    assert sae.scribe_folder is None and sae.cfg.d_sae == 2304
    assert torch.equal(sae.W_enc, gpu.load_sae(str(sae_folder)).W_enc)
    with pytest.raises(ValueError, match="could not load 'blocks.1.hook_resid_pre' of release 'gpt2-small-res-jb'"):
        gpu.load_sae("gpt2-small-res-jb:blocks.1.hook_resid_pre")  # in the registry, not in the cache


def test_sae_techniques_say_what_is_missing_or_wrong(organism, sae_folder, tmp_path):
    model, tok = organism
    plain = gpu.load_executor(gpu.ModelSpec())
    with pytest.raises(ValueError, match="without a sparse autoencoder.*`sae:`"):
        T.sae_features(plain.model, plain.tokenizer, "Hello there")
    with pytest.raises(ValueError, match=r"feature 99999: the SAE has features 0\.\.2303"):
        T.feature_examples(model, tok, 99999)
    with pytest.raises(ValueError, match="not a folder with cfg.json|neither a folder"):
        gpu.load_sae(str(tmp_path))
    from huggingface_hub import constants

    online = constants.HF_HUB_OFFLINE
    with pytest.raises(ValueError, match="from the local Hugging Face cache .LocalEntryNotFoundError"):
        gpu.load_sae("gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical")  # offline: no download tried
    assert constants.HF_HUB_OFFLINE == online  # only that load was held offline
    with pytest.raises(ValueError, match="contrastive_features needs at least one prompt"):
        T.contrastive_features(model, tok, [])
    with pytest.raises(ValueError, match=r"dense=0: the share of corpus tokens .* in \(0, 1\]"):
        T.contrastive_features(model, tok, "personal", dense=0)


def test_an_experiment_with_an_sae_offers_its_techniques_in_the_prompt(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    exp = experiment.load(write("a.yaml", "name: a\ntask: Find it.\nsae: embedded\ntechniques: [generate_text]\n"))
    assert set(T.SAE_TECHNIQUES) <= set(exp.techniques) and experiment.model_spec(exp).sae == str(saes.folder())
    parts = scribe_mcp.prompt_parts()
    prompt = experiment.prompt(exp, parts)
    assert "`sae_features(text" in prompt and "`contrastive_features(" in prompt and "`generate_text(" in prompt
    bare = experiment.load(write("b.yaml", "name: b\ntask: Find it.\nsae: embedded\n"))
    assert "`sae_features(text" in experiment.prompt(bare, parts)
    assert "sae_features" not in experiment.prompt(experiment.load(write("c.yaml", "name: c\ntask: Find it.\n")), parts)
    with pytest.raises(experiment.ExperimentError, match="sae_features needs a sparse autoencoder: add `sae:`"):
        experiment.load(write("d.yaml", "name: d\ntask: Find it.\ntechniques: [sae_features]\n"))
    with pytest.raises(experiment.ExperimentError, match="sae: embedded is the embedded model's"):
        experiment.load(write("e.yaml", "name: e\ntask: Find it.\nmodel: gpt2\nsae: embedded\n"))
    missing = experiment.load(write("f.yaml", "name: f\ntask: Find it.\nsae: no-such-folder\n"))
    with pytest.raises(experiment.MissingInput, match="sae: no-such-folder is not a SAELens folder"):
        experiment.check_inputs(missing)
    hidden = experiment.load(write("g.yaml", f"name: g\ntask: Find it.\nsae: {tmp_path}\nalias: Subject\n"))
    assert str(tmp_path) in hidden.hidden


def test_init_session_lists_the_sae_techniques_only_when_an_sae_is_served(tmp_path):
    async def listed(*args) -> str:
        async with scribe(tmp_path / "nb", "--no-preload", *args) as s:
            return (await call(s, "init_session")).content[0].text

    with_sae, without = anyio.run(listed), anyio.run(listed, "--sae", "none")
    for name in T.SAE_TECHNIQUES:
        assert f"- {name}(" in with_sae and f"- {name}(" not in without
    assert "- logit_lens(" in with_sae and "- logit_lens(" in without


def test_under_an_alias_labels_and_examples_never_name_the_model(sae_folder):
    import techniques

    spec = gpu.ModelSpec(sae=str(sae_folder), alias="Subject-7")
    executor = gpu.load_executor(spec)
    calls = [(techniques.search_features, {"query": "assistant", "n": 10}),
             (techniques.sae_features, {"text": "Who made you? I am an AI assistant."})]
    for fn, kwargs in calls:
        reply = executor.execute(gpu.dumps_call(fn, (), kwargs), lambda *_: None)
        assert reply["ok"], reply
        shown = repr(dict(gpu.loads_result(reply["value"])))
        assert not re.search(r"smol|hugging ?face", shown, re.IGNORECASE), shown
        features = [e["feature"] for e in gpu.loads_result(reply["value"]).get("by_label", [])][:3]
        for feature in features:
            examples = executor.execute(gpu.dumps_call(techniques.feature_examples, (feature,), {}), lambda *_: None)
            assert not re.search(r"smol|hugging ?face", repr(gpu.loads_result(examples["value"])), re.IGNORECASE)
