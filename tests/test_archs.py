"""Granite, OLMo 2, SmolLM3, Gemma 3, Gemma 2, Phi-3 and LFM2 (issue 13).

The shared proxies against transformers are in test_golden / test_generate / test_quant. Here:
the float64 reference (tests/reference_model.py) against those same transformers goldens (so the
reference is checked where torch is not installed), then minilm against the reference on random
checkpoints with other dimensions and the older config spellings real hub checkpoints use, the
cases the proxies do not reach (LongRoPE switching mid-generation, LFM2's convolution state under
prefix reuse, decode == prefill for the new step kinds), and the config errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import minilm
from minilm.config import Config
from minilm.errors import ModelLoadError, UnsupportedModelError

from conftest import (
    check_against_reference,
    check_decode_equals_prefill,
    check_greedy,
    check_reference_against_transformers,
    needs_hf,
    random_tensors,
    shared_path,
)
from reference_model import RefModel

PROXIES = ["granite", "olmo2", "smollm3", "gemma3", "gemma2", "phi3", "lfm2"]
N_NEW = 16


# ---- random checkpoints ------------------------------------------------------------------------
def base(mt, arch, **kw):
    c = dict(model_type=mt, architectures=[arch], vocab_size=512, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    c.update(kw)
    return c


def hf_shapes(c: dict) -> dict:
    """Tensor name -> shape of a checkpoint of config c, under the transformers names."""
    mt, D, L = c["model_type"], c["hidden_size"], c["num_hidden_layers"]
    H = c["num_attention_heads"]
    Hkv = c.get("num_key_value_heads") or H
    hd = c.get("head_dim") or D // H
    F, V = c["intermediate_size"], c["vocab_size"]
    s = {"model.embed_tokens.weight": (V, D)}
    if mt == "lfm2":
        if c.get("block_auto_adjust_ff_dim"):
            F = int(c.get("block_ffn_dim_multiplier", 1.0) * int(2 * F / 3))
            m = c.get("block_multiple_of", 256)
            F = m * ((F + m - 1) // m)
        attn = c.get("full_attn_idxs") if c.get("layer_types") is None else [
            i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
        Lc = c.get("conv_L_cache", 3)
        for i in range(L):
            p = f"model.layers.{i}."
            s[p + "operator_norm.weight"] = (D,)
            s[p + "ffn_norm.weight"] = (D,)
            s.update({p + "feed_forward.w1.weight": (F, D), p + "feed_forward.w3.weight": (F, D),
                      p + "feed_forward.w2.weight": (D, F)})
            if i in attn:
                s.update({p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hkv * hd, D),
                          p + "self_attn.v_proj.weight": (Hkv * hd, D), p + "self_attn.out_proj.weight": (D, H * hd),
                          p + "self_attn.q_layernorm.weight": (hd,), p + "self_attn.k_layernorm.weight": (hd,)})
            else:
                s.update({p + "conv.in_proj.weight": (3 * D, D), p + "conv.out_proj.weight": (D, D),
                          p + "conv.conv.weight": (D, 1, Lc)})
                if c.get("conv_bias"):
                    s.update({p + "conv.in_proj.bias": (3 * D,), p + "conv.out_proj.bias": (D,),
                              p + "conv.conv.bias": (D,)})
        s["model.embedding_norm.weight"] = (D,)
    else:
        for i in range(L):
            p = f"model.layers.{i}."
            if mt != "olmo2":
                s[p + "input_layernorm.weight"] = (D,)
            s[p + "post_attention_layernorm.weight"] = (D,)
            if mt in ("olmo2", "gemma2", "gemma3_text"):
                s[p + "post_feedforward_layernorm.weight"] = (D,)
            if mt in ("gemma2", "gemma3_text"):
                s[p + "pre_feedforward_layernorm.weight"] = (D,)
            if mt == "phi3":
                s[p + "self_attn.qkv_proj.weight"] = ((H + 2 * Hkv) * hd, D)
                s[p + "mlp.gate_up_proj.weight"] = (2 * F, D)
            else:
                s.update({p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hkv * hd, D),
                          p + "self_attn.v_proj.weight": (Hkv * hd, D), p + "mlp.gate_proj.weight": (F, D),
                          p + "mlp.up_proj.weight": (F, D)})
            s[p + "self_attn.o_proj.weight"] = (D, H * hd)
            s[p + "mlp.down_proj.weight"] = (D, F)
            if mt == "olmo2":
                s[p + "self_attn.q_norm.weight"] = (H * hd,)
                s[p + "self_attn.k_norm.weight"] = (Hkv * hd,)
            if mt == "gemma3_text":
                s[p + "self_attn.q_norm.weight"] = (hd,)
                s[p + "self_attn.k_norm.weight"] = (hd,)
        s["model.norm.weight"] = (D,)
    if not c.get("tie_word_embeddings", True):
        s["lm_head.weight"] = (V, D)
    return s


_GEMMA = dict(hidden_activation="gelu_pytorch_tanh", head_dim=16, num_attention_heads=4, num_key_value_heads=1)
_PHI_FACTORS = dict(short_factor=[1.0 + 0.05 * i for i in range(4)], long_factor=[1.0 + 1.5 * i for i in range(4)])

# id -> (config, prompt length, n_ctx)
CASES = {
    "granite": (base("granite", "GraniteForCausalLM", embedding_multiplier=6.0, residual_multiplier=0.5,
                     attention_multiplier=0.1, logits_scaling=2.5, num_key_value_heads=1), 21, 64),
    "olmo2_untied": (base("olmo2", "Olmo2ForCausalLM", hidden_size=96, num_attention_heads=6, head_dim=16,
                          intermediate_size=128, tie_word_embeddings=False), 19, 64),
    "smollm3_interval": (base("smollm3", "SmolLM3ForCausalLM", num_hidden_layers=4, no_rope_layer_interval=2,
                              rope_theta=2e6), 17, 64),
    # older spellings: rope_theta + rope_local_base_freq + sliding_window_pattern, linear scaling on global
    "gemma3_old_keys": (base("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=4, sliding_window=8,
                             sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}, query_pre_attn_scalar=24,
                             **_GEMMA), 30, 64),
    "gemma3_new_keys": (base("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=3, sliding_window=6,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                             query_pre_attn_scalar=16, **_GEMMA), 25, 64),
    "gemma2_old_keys": (base("gemma2", "Gemma2ForCausalLM", num_hidden_layers=3, sliding_window=8,
                             attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                             query_pre_attn_scalar=16, **_GEMMA), 27, 64),
    # LongRoPE, older spelling ("su"), original context 32: the prompt is short, generation crosses it
    "phi3_crossing": (base("phi3", "Phi3ForCausalLM", num_attention_heads=4, head_dim=16,
                           partial_rotary_factor=0.5, original_max_position_embeddings=32,
                           max_position_embeddings=128, tie_word_embeddings=False,
                           rope_scaling={"type": "su", **_PHI_FACTORS}), 24, 64),
    "phi3_long_prompt": (base("phi3", "Phi3ForCausalLM", partial_rotary_factor=0.75, max_position_embeddings=128,
                              tie_word_embeddings=False,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 40,
                                               "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                               "long_factor": [1.0 + 2 * i for i in range(6)]}), 50, 80),
    # older spelling (full_attn_idxs, block_ff_dim), conv bias, the auto-adjusted ffn width
    "lfm2_old_keys": (base("lfm2", "Lfm2ForCausalLM", num_hidden_layers=4, full_attn_idxs=[1, 3],
                           conv_L_cache=4, conv_bias=True, block_ff_dim=192, intermediate_size=192,
                           block_auto_adjust_ff_dim=True, block_multiple_of=64, norm_eps=1e-5,
                           rope_theta=1e6), 22, 64),
    "lfm2": (base("lfm2", "Lfm2ForCausalLM", num_hidden_layers=3,
                  layer_types=["conv", "full_attention", "conv"], conv_L_cache=3, norm_eps=1e-5), 18, 64),
}


@pytest.fixture
def built(make_checkpoint):
    def build(name, **kw):
        cfg, T, n_ctx = CASES[name]
        tensors = random_tensors(hf_shapes(cfg), std=0.2, seed=len(name))
        folder = make_checkpoint(cfg, tensors=tensors, name=name)
        rng = np.random.default_rng(1)
        return folder, [int(t) for t in rng.integers(3, 500, size=T)], n_ctx
    return build


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_match_reference(name, built):
    folder, ids, n_ctx = built(name)
    check_against_reference(folder, ids, n_ctx, N_NEW, kv_quant="f32")   # the f32 path against the f32 reference


def test_longrope_switch_keeps_prefix_reuse_exact(built):
    """Phi-3: a generation that crossed the original context re-ran its cache with the long factors;
    a next prompt that shares its prefix but is short again needs the short factors for every
    position: minilm re-runs the cache, and both equal a fresh model."""
    folder, ids, n_ctx = built("phi3_crossing")
    m = minilm.load(str(folder), n_ctx=n_ctx)
    long_run = m.generate_ids(ids, 20, ignore_eos=True)            # 24 + 20 > 32: switches to long
    assert m.net.cache.kv_long
    short = ids[:20]
    again = m.generate_ids(short, 8, ignore_eos=True)               # 28 <= 32: short again
    fresh = minilm.load(str(folder), n_ctx=n_ctx)
    assert again == fresh.generate_ids(short, 8, ignore_eos=True)
    check_greedy(again, RefModel(folder), short)
    # and logits of a sequence past the switch, on top of a short cache, equal a one-call run
    m.reset()
    m.net.prefill(ids[:10])
    tail = m.net.all_logits(ids[10:] + long_run[:10]).copy()        # 44 > 32: re-runs the 10 cached
    whole = fresh.logits(ids + long_run[:10])[10:]
    np.testing.assert_allclose(tail, whole, rtol=0, atol=1e-5 * float(np.abs(whole).max()))


def test_lfm2_conv_state_follows_prefix_reuse(built):
    """LFM2's convolution state lives in the cache per position: a second prompt that shares only
    part of the first one's tokens (the cache truncated inside the old sequence) generates what a
    fresh model does."""
    folder, ids, n_ctx = built("lfm2_old_keys")
    m = minilm.load(str(folder), n_ctx=n_ctx)
    first = m.generate_ids(ids, 10, ignore_eos=True)
    second_prompt = ids[:9] + [7, 11] + first[:3]
    reused = m.generate_ids(second_prompt, 10, ignore_eos=True)
    assert m.net.cache.common_prefix(second_prompt) == len(second_prompt)
    fresh = minilm.load(str(folder), n_ctx=n_ctx).generate_ids(second_prompt, 10, ignore_eos=True)
    assert reused == fresh
    check_greedy(reused, RefModel(folder), second_prompt)


# f32 on every case, int8 / int4 on three or four each (LFM2's conv, whose history table keeps f32
# beside the quantized matrices, on both); every format on one model: test_decode_exact.py.
ARCH_DECODE_CASES = [(c, "f32") for c in ("gemma2_old_keys", "gemma3_old_keys", "olmo2_untied", "granite", "lfm2",
                                          "smollm3_interval")]
ARCH_DECODE_CASES += [(c, "int8") for c in ("gemma2_old_keys", "granite", "lfm2")]
ARCH_DECODE_CASES += [(c, "int4") for c in ("gemma3_old_keys", "olmo2_untied", "smollm3_interval", "lfm2")]


@pytest.mark.parametrize("case,quant", ARCH_DECODE_CASES)
def test_decode_equals_prefill(make_checkpoint, case, quant):
    """The new step kinds (scale, qk_norm, gelu_mul, conv, soft-capped attention, per-layer RoPE
    tables) give the same hidden state decoded one token at a time (M = 1) as inside a prefill,
    bit for bit."""
    cfg, _, _ = CASES[case]
    m = minilm.load(make_checkpoint(cfg, tensors=random_tensors(hf_shapes(cfg), seed=3)), quant=quant, n_ctx=48)
    check_decode_equals_prefill(m)


# ---- the reference itself against transformers (the shared goldens) ---------------------------
@pytest.mark.parametrize("arch", PROXIES)
def test_reference_matches_transformers_goldens(arch):
    name = f"proxy-{arch}-shakespeare"
    if not shared_path("golden", f"{name}.json").exists():
        pytest.skip("shared goldens not found")
    ref = RefModel(shared_path("models", name))
    g = json.loads(shared_path("golden", f"{name}.json").read_text())
    z = np.load(shared_path("golden", f"{name}.npz"))
    for i, case in enumerate(g["cases"]):
        want = z[f"prompt{i}_logits"]
        err = np.abs(ref.logits(case["input_ids"]) - want).max() / (want.max() - want.min())
        assert err <= 1e-4, f"{name} case {i}: reference vs transformers {err:.2e} of the range"


@needs_hf
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_transformers(name, built):
    folder, ids, _ = built(name)
    check_reference_against_transformers(folder, ids, N_NEW)


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])
def test_reference_perplexity_matches_transformers(arch):
    """Windows longer than Phi-3's original context (long factors) and the Gemma sliding window."""
    name = f"proxy-{arch}-shakespeare"
    if not shared_path("golden", f"{name}.json").exists():
        pytest.skip("shared goldens not found")
    spec = json.loads(shared_path("golden", f"{name}.json").read_text())["perplexity"]
    tok = minilm.load(shared_path("models", name), n_ctx=16).tokenizer
    text = shared_path("texts", spec["text_file"]).read_text(encoding="utf-8")[:spec["chars"]]
    ids = tok.encode(text, add_special_tokens=False)[:spec["max_tokens"]]
    ref = RefModel(shared_path("models", name))
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, spec["window"]):
        w = ids[a:a + spec["window"]]
        if len(w) < 2:
            continue
        lg = ref.logits(w)[:-1]
        lg = lg - lg.max(1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    assert n == spec["scored_tokens"]
    assert np.exp(nll / n) == pytest.approx(spec["ppl"], rel=1e-4)


# ---- config ----------------------------------------------------------------------------------------
def test_config_reads_both_spellings():
    old = Config.from_hf(CASES["gemma3_old_keys"][0])
    assert old.layer_windows == [8, 8, 0, 8] and old.layer_rope == [1, 1, 0, 1]
    assert old.rope_theta == 1e6 and old.rope_local_theta == 1e4 and old.rope_scaling["factor"] == 2.0
    assert old.attn_scale == pytest.approx(24 ** -0.5) and old.embed_scale == pytest.approx(8.0)
    new = Config.from_hf(CASES["gemma3_new_keys"][0])
    assert new.layer_windows == [6, 0, 6] and new.rope_theta == 5e5 and new.rope_local_theta == 1e4
    g2 = Config.from_hf(CASES["gemma2_old_keys"][0])
    assert g2.layer_windows == [8, 0, 8] and g2.attn_softcap == 20.0 and g2.final_softcap == 10.0
    su = Config.from_hf(CASES["phi3_crossing"][0])
    assert su.rope_scaling["rope_type"] == "longrope" and su.rope_scaling["original_max_position_embeddings"] == 32
    assert su.rope_scaling["attention_factor"] == pytest.approx((1 + np.log(4) / np.log(32)) ** 0.5)
    lf = Config.from_hf(CASES["lfm2_old_keys"][0])
    assert lf.layer_conv == [True, False, True, False] and lf.intermediate_size == 128 and lf.conv_bias
    sm = Config.from_hf(CASES["smollm3_interval"][0])
    assert sm.layer_rope == [0, -1, 0, -1]
    bf = Config.from_hf(dict(CASES["gemma2_old_keys"][0], hidden_size=640, torch_dtype="bfloat16"))
    assert bf.embed_scale == 25.25             # sqrt(640) = 25.298 rounded to bfloat16, as transformers


@pytest.mark.parametrize("case,change,field", [
    ("granite", {"embedding_multiplier": "x"}, "embedding_multiplier"),
    ("granite", {"logits_scaling": 0}, "logits_scaling"),
    ("smollm3_interval", {"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ("smollm3_interval", {"no_rope_layer_interval": 0}, "no_rope_layer_interval"),
    ("gemma3_old_keys", {"rope_local_base_freq": -1.0}, "rope_local_base_freq"),
    ("gemma3_old_keys", {"sliding_window_pattern": 0}, "sliding_window_pattern"),
    ("gemma3_old_keys", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    ("gemma3_old_keys", {"hidden_activation": "relu"}, "hidden_activation"),
    ("gemma2_old_keys", {"attn_logit_softcapping": -5}, "attn_logit_softcapping"),
    ("gemma2_old_keys", {"final_logit_softcapping": "big"}, "final_logit_softcapping"),
    ("phi3_crossing", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4}},
     "short_factor"),
    ("phi3_crossing", {"original_max_position_embeddings": -3}, "original_max_position_embeddings"),
    ("lfm2", {"layer_types": ["conv", "mamba", "conv"]}, "layer_types"),
    ("lfm2_old_keys", {"full_attn_idxs": [9]}, "full_attn_idxs"),
    ("lfm2", {"conv_L_cache": 0}, "conv_L_cache"),
])
def test_config_errors_name_the_field(case, change, field):
    with pytest.raises(ModelLoadError, match=field):
        Config.from_hf(dict(CASES[case][0], **change))


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        Config.from_hf(dict(CASES["granite"][0], model_type="mamba"))
    for mt in ("gemma2", "gemma3_text", "granite", "lfm2", "olmo2", "phi3", "smollm3", "llama"):
        assert mt in str(e.value)


@pytest.mark.parametrize("case", ["lfm2_old_keys", "gemma3_old_keys", "olmo2_untied"])
def test_prequantized_folder_round_trip(make_checkpoint, tmp_path, case):
    """model.save of an int8 model (Gemma's folded (1 + w) norms, OLMo 2's whole-projection q/k
    norms and post-norms, LFM2's conv kernels) loads back with the same logits."""
    cfg, T, n_ctx = CASES[case]
    m = minilm.load(make_checkpoint(cfg, tensors=random_tensors(hf_shapes(cfg), seed=5)), quant="int8", n_ctx=n_ctx)
    ids = list(range(3, 3 + T))
    want = m.logits(ids)
    m.save(tmp_path / "q")
    back = minilm.load(tmp_path / "q", n_ctx=n_ctx)
    np.testing.assert_array_equal(back.logits(ids), want)
