"""Every shared model against transformers' reference outputs (../shared/golden)."""
import json

import numpy as np
import pytest

from conftest import GOLDEN_MODELS, SHARED

MODELS = GOLDEN_MODELS

pytestmark = pytest.mark.skipif(not (SHARED / "models").is_dir(),
                                reason=f"shared models not found at {SHARED} (tests need ../shared)")


def golden(name):
    return json.loads((SHARED / "golden" / f"{name}.json").read_text()), np.load(SHARED / "golden" / f"{name}.npz")


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference(shared_model, name):
    model = shared_model(name)
    g, z = golden(name)
    for i, case in enumerate(g["cases"]):
        ref = z[f"prompt{i}_logits"]
        out = model.logits(case["input_ids"])
        assert out.shape == ref.shape and out.dtype == np.float32
        err = np.abs(out - ref).max() / (ref.max() - ref.min())
        assert err <= 1e-3, f"{name} case {i}: max abs error {err:.2e} of the logit range"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_reference(shared_model, name):
    model = shared_model(name)
    g, _ = golden(name)
    for case in g["cases"]:
        new = model.generate_ids(case["input_ids"], max_new_tokens=len(case["greedy_new_ids"]), ignore_eos=True)
        assert new == case["greedy_new_ids"], f"{name}: {case['prompt']!r}"


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_matches_reference(shared_model, name):
    model = shared_model(name)
    g, _ = golden(name)
    for case in g["cases"]:
        assert model.tokenizer.encode(case["prompt"]) == case["input_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_perplexity_matches_reference(shared_model, name):
    model = shared_model(name)
    spec = golden(name)[0]["perplexity"]
    text = (SHARED / "texts" / spec["text_file"]).read_text(encoding="utf-8")[:spec["chars"]]
    ids = model.tokenizer.encode(text, add_special_tokens=spec["add_special_tokens"])[:spec["max_tokens"]]
    r = model.perplexity(ids, window=spec["window"])
    assert r["tokens"] == spec["scored_tokens"]
    assert r["ppl"] == pytest.approx(spec["ppl"], rel=1e-3)


def test_readme_example_generates_text(shared_model):
    model = shared_model("stories260K")
    text = model.generate("Once upon a time", max_new_tokens=64)
    assert isinstance(text, str) and len(text) > 20
    streamed = "".join(model.generate("Tom and his dog", max_new_tokens=64, stream=True))
    assert streamed == model.generate("Tom and his dog", max_new_tokens=64)
    ids = model.tokenizer.encode("Hello")
    assert ids[0] == model.tokenizer.bos_token_id
    assert model.logits(ids).shape == (len(ids), model.config.vocab_size)
