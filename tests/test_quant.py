"""INT8 / INT4 accuracy against the f32 golden references, and pre-quantized folders."""
import json
import shutil

import numpy as np
import pytest

import minilm
from minilm import prequant
from minilm.errors import ModelLoadError

from conftest import GOLDEN_MODELS, SHARED

MODELS = GOLDEN_MODELS
pytestmark = pytest.mark.skipif(not (SHARED / "models").is_dir(),
                                reason=f"shared models not found at {SHARED} (tests need ../shared)")


def golden(name):
    return json.loads((SHARED / "golden" / f"{name}.json").read_text())


def ppl(model, name):
    spec = golden(name)["perplexity"]
    text = (SHARED / "texts" / spec["text_file"]).read_text(encoding="utf-8")[:spec["chars"]]
    ids = model.tokenizer.encode(text, add_special_tokens=False)[:spec["max_tokens"]]
    return model.perplexity(ids, window=spec["window"])["ppl"], spec["ppl"]


@pytest.mark.parametrize("name", MODELS)
def test_int8_keeps_greedy_tokens_and_perplexity(name):
    model = minilm.load(SHARED / "models" / name, quant="int8")
    kept = 0
    for case in golden(name)["cases"]:
        new = model.generate_ids(case["input_ids"], max_new_tokens=16, ignore_eos=True)
        kept += new == case["greedy_new_ids"][:16]
    assert kept >= 3, f"{name} int8: first 16 greedy tokens kept on only {kept} of 4 prompts"
    p, ref = ppl(model, name)
    assert abs(p / ref - 1) <= 0.01, f"{name} int8 perplexity {p:.3f} vs f32 {ref:.3f}"


@pytest.mark.parametrize("name", MODELS)
def test_int4_perplexity_within_12_percent(name):
    model = minilm.load(SHARED / "models" / name, quant="int4")
    p, ref = ppl(model, name)
    assert abs(p / ref - 1) <= 0.12, f"{name} int4 perplexity {p:.3f} vs f32 {ref:.3f}"


@pytest.mark.parametrize("quant", ["f16", "bf16", "int4-g64", "int4-g128"])
def test_other_levels_stay_close(quant):
    model = minilm.load(SHARED / "models" / "proxy-qwen2-shakespeare", quant=quant)
    p, ref = ppl(model, "proxy-qwen2-shakespeare")
    bound = {"f16": 0.001, "bf16": 0.01}.get(quant, 0.15)
    assert abs(p / ref - 1) <= bound, f"{quant}: perplexity {p:.3f} vs f32 {ref:.3f}"


@pytest.mark.parametrize("name,quant", [("stories260K", "int4"), ("proxy-neox-shakespeare", "int8"),
                                        ("proxy-gpt2-shakespeare", "int4-g64")])
def test_save_load_round_trip_is_exact(tmp_path, name, quant, monkeypatch):
    model = minilm.load(SHARED / "models" / name, quant=quant)
    ids = golden(name)["cases"][1]["input_ids"]
    before = model.logits(ids)
    out = tmp_path / "q"
    model.save(out)
    assert not list(out.glob("model.safetensors*")), "the original weights must not be copied"
    # loading must not touch any original checkpoint reader
    import minilm.sources as S

    def boom(*a, **k):
        raise AssertionError("pre-quantized load read an original checkpoint")
    monkeypatch.setattr(S, "CheckpointReader", boom)
    small = minilm.load(out)
    assert small.quant == quant
    np.testing.assert_array_equal(small.logits(ids), before)
    assert "q4_0" in repr(small) or "q8_0" in repr(small)


def test_prequantized_folder_works_alone(tmp_path):
    model = minilm.load(SHARED / "models" / "proxy-qwen3-shakespeare", quant="int4")
    model.save(tmp_path / "q")
    shutil.move(str(tmp_path / "q"), str(tmp_path / "moved"))     # no path back to the source
    m2 = minilm.load(tmp_path / "moved")
    assert m2.generate("ROMEO:", max_new_tokens=8) == model.generate("ROMEO:", max_new_tokens=8)
    with pytest.raises(ValueError, match="already quantized as int4"):
        minilm.load(tmp_path / "moved", quant="int8")


def test_newer_format_version_is_refused(tmp_path):
    model = minilm.load(SHARED / "models" / "stories260K", quant="int8")
    model.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / prequant.MARKER).read_text())
    meta["format_version"] = prequant.FORMAT_VERSION + 1
    (tmp_path / "q" / prequant.MARKER).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="newer minilm"):
        minilm.load(tmp_path / "q")


def test_nan_weights_are_named_at_quantize_time(tmp_path):
    src = SHARED / "models" / "stories260K"
    dst = tmp_path / "nan"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("original"))
    from minilm.safetensors_io import SafetensorsFile, save_file
    f = SafetensorsFile(dst / "model.safetensors")
    t = {n: np.array(f.get(n)) for n in f.names}
    t["model.layers.2.mlp.up_proj.weight"][3, 5] = np.nan
    del f
    save_file(t, dst / "model.safetensors")
    from minilm.errors import NonFiniteWeightsError
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        minilm.load(dst)        # checked at load (issue 9)
    with pytest.raises(NonFiniteWeightsError, match=r"l2\.w_gate_up"):
        minilm.load(dst, quant="int4", check_weights=False)    # the quantizer still names it
    minilm.load(dst, check_weights=False)            # f32 keeps the weights as they are


def test_odd_shapes_are_padded_and_reported():
    model = minilm.load(SHARED / "models" / "stories260K", quant="int8")   # ffn 172
    s = model.summary()
    assert "l0.w_down (K 172->192)" in s
    assert "KV cache" in s and "bits/weight" in s


def test_bad_quant_arguments():
    with pytest.raises(ValueError, match="quant="):
        minilm.load(SHARED / "models" / "stories260K", quant="int3")
    with pytest.raises(ValueError, match="group_size"):
        minilm.load(SHARED / "models" / "stories260K", quant="int4", group_size=48)


def test_affine_grid_and_codes_round_trip():
    """Every quantized format but the IQ4 ones describes its values as an affine grid
    (Format.grid: value = s * q + o, lo <= q <= hi), exactly what its dequantizer gives; codes()
    writes chosen codes into the stored bytes and keeps the scales (GPTQ picks the codes), and
    codes outside the range are refused."""
    from minilm.quant import FORMATS, Linear
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((6, 512)) * 0.1).astype(np.float32)
    w[0, :256] = 0.0                                                  # a zero block
    affine = [f for f in FORMATS.values() if f.grid is not None]
    assert {f.name for f in affine} == {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
    for f in affine:
        lin = Linear.quantize(w, f.name)
        s, o, q, (lo, hi) = f.grid(lin.arrays)
        assert s.shape == o.shape == q.shape == (6, 512) and lo <= q.min() and q.max() <= hi, f.name
        assert np.array_equal((s * q + o).astype(np.float32), f.unpack(lin.arrays)), f.name
        same = f.codes(lin.arrays, q)
        assert all(np.array_equal(same[k], lin.arrays[k]) for k in lin.arrays), f.name
        q2 = rng.integers(lo, hi + 1, q.shape)
        s2, o2, back, _ = f.grid(f.codes(lin.arrays, q2))
        assert np.array_equal(back, q2) and np.array_equal(s2, s) and np.array_equal(o2, o), f.name
        with pytest.raises(ValueError, match="codes outside"):
            f.codes(lin.arrays, np.full(q.shape, hi + 1))
