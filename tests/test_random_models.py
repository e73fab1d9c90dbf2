"""minilm vs the numpy float64 reference (tests/reference_model.py) on small random checkpoints of
every supported architecture and option; and, where transformers + torch are importable, the
reference itself vs transformers on the same checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

import minilm

from conftest import (
    check_against_reference,
    check_decode_equals_prefill,
    check_greedy,
    check_reference_against_transformers,
    needs_hf,
)
from reference_model import RefModel

N_NEW = 16


def llama_cfg(**kw):
    c = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
             intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    c.update(kw)
    return c


def neox_cfg(**kw):
    c = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=512,
             hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, layer_norm_eps=1e-5, rotary_pct=0.5, rotary_emb_base=10000,
             hidden_act="gelu", use_parallel_residual=True, tie_word_embeddings=False,
             attention_bias=True, bos_token_id=0, eos_token_id=0, torch_dtype="float32")
    c.update(kw)
    return c


def gpt2_cfg(**kw):
    c = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=512, n_embd=64,
             n_layer=2, n_head=4, n_positions=96, n_inner=None, activation_function="gelu_new",
             layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
             torch_dtype="float32")
    c.update(kw)
    return c


_no_tie = llama_cfg(vocab_size=32000, num_key_value_heads=4)
del _no_tie["tie_word_embeddings"]

# id -> (config, make_checkpoint options, prompt length, n_ctx, xfail reason or None)
CASES = {
    "llama_dims": (llama_cfg(hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=2, head_dim=16, intermediate_size=200), {}, 23, 64, None),
    "llama_untied_32k": (llama_cfg(vocab_size=32000, tie_word_embeddings=False, num_key_value_heads=4),
                         {"tokenizer": "llama2-32k"}, 12, 64, None),
    "llama_bias": (llama_cfg(attention_bias=True, mlp_bias=True, num_key_value_heads=1), {}, 9, 48, None),
    "llama_hd8_group4": (llama_cfg(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                   head_dim=8), {}, 11, 48, None),
    "llama_rope_llama3": (llama_cfg(head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, rope_theta=500000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}),
                          {}, 150, 192, None),
    "llama_rope_linear": (llama_cfg(rope_scaling={"type": "linear", "factor": 4.0}), {}, 60, 96, None),
    "llama_rope_dynamic": (llama_cfg(max_position_embeddings=64,
                                     rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
                           {}, 100, 128, None),
    "llama_rope_dynamic_long_prompt": (
        llama_cfg(max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
        {}, 300, 320, None),
    "llama_untied_default": (
        _no_tie, {}, 12, 48, None),
    "mistral_sliding": (llama_cfg(model_type="mistral", architectures=["MistralForCausalLM"],
                                  sliding_window=8, num_key_value_heads=1), {}, 30, 64, None),
    "qwen2": (llama_cfg(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6,
                        use_sliding_window=False, sliding_window=None), {}, 17, 48, None),
    "qwen2_sliding_layers": (
        llama_cfg(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=3,
                  use_sliding_window=True, sliding_window=6, max_window_layers=2), {}, 24, 64, None),
    "qwen3": (llama_cfg(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        attention_bias=False), {}, 17, 48, None),
    # long decodes: the position split of decode_attention over 500+ cached rows
    "qwen3_long_decode": (llama_cfg(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16,
                                    num_attention_heads=4, num_key_value_heads=2, hidden_size=48,
                                    intermediate_size=64, max_position_embeddings=1024,
                                    attention_bias=False), {}, 505, 530, None),
    "neox_long_decode": (neox_cfg(max_position_embeddings=1024, hidden_size=48, intermediate_size=96,
                                  num_attention_heads=3), {}, 505, 530, None),
    "gpt2_prefix": (gpt2_cfg(), {"gpt2_prefix": True}, 20, 64, None),
    "gpt2_noprefix": (gpt2_cfg(n_inner=200), {"gpt2_prefix": False}, 20, 64, None),
    "neox_parallel": (neox_cfg(use_parallel_residual=True), {}, 19, 64, None),
    "neox_sequential": (neox_cfg(use_parallel_residual=False, num_attention_heads=2), {}, 19, 64, None),
    "llama_bf16": (llama_cfg(torch_dtype="bfloat16"), {"dtype": "BF16"}, 15, 48, None),
    "qwen2_f16": (llama_cfg(model_type="qwen2", architectures=["Qwen2ForCausalLM"], torch_dtype="float16"),
                  {"dtype": "F16"}, 15, 48, None),
    "llama_sharded": (llama_cfg(num_hidden_layers=3), {"shards": 3}, 15, 48, None),
}


def _params():
    out = []
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(reason=case[4], strict=True, raises=AssertionError)] if case[4] else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _prompt(vocab, n, seed=1):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, min(vocab, 500), size=n)]


@pytest.fixture
def built(make_checkpoint, request):
    def build(name):
        cfg, opts, T, n_ctx, _ = CASES[name]
        folder = make_checkpoint(cfg, **{"std": 0.2, **opts}, name=name)
        return folder, _prompt(cfg["vocab_size"], T), n_ctx
    return build


@pytest.mark.parametrize("name", _params())
def test_logits_and_greedy_match_reference(name, built):
    folder, ids, n_ctx = built(name)
    check_against_reference(folder, ids, n_ctx, N_NEW)


# ---- the reference vs transformers (dev machines only) -----------------------------------------
@needs_hf
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_transformers(name, built):
    folder, ids, _ = built(name)
    check_reference_against_transformers(folder, ids, N_NEW)


def test_dynamic_rope_prefix_reuse_matches_fresh(built):
    folder, ids, n_ctx = built("llama_rope_dynamic")
    model = minilm.load(str(folder), n_ctx=n_ctx)
    ref = RefModel(folder)
    p = ids[:80]
    out = model.generate_ids(p, N_NEW, ignore_eos=True)
    p2 = p + out[:8]
    model.reset()
    fresh = model.generate_ids(p2, N_NEW, ignore_eos=True)
    check_greedy(fresh, ref, p2)                       # a fresh call is right
    model.reset()
    model.generate_ids(p, N_NEW, ignore_eos=True)
    reused = model.generate_ids(p2, N_NEW, ignore_eos=True)
    assert reused == fresh


# ---- one plan, one executor: decode (M = 1) == prefill (M > 1) ----------------------------------
# f32 on every architecture; each other format on one or two of them: its row kernels do not depend
# on the architecture, and test_decode_exact.py checks every format of quant.FORMATS (as layer
# matrices and as the head) on one model. (These formats on these architectures share executor
# compiles with test_quant / test_archs; the default f16 KV cache, as everywhere else.)
DECODE_CASES = [(c, "f32") for c in ("qwen3", "llama_bias", "qwen2_sliding_layers", "gpt2_prefix", "neox_parallel")]
DECODE_CASES += [("qwen3", "int4"), ("llama_bias", "int8"), ("llama_bias", "f16"), ("qwen2_sliding_layers", "bf16"),
                 ("gpt2_prefix", "int8"), ("neox_parallel", "int4")]


@pytest.mark.parametrize("case,quant", DECODE_CASES)
def test_decode_equals_prefill(make_checkpoint, case, quant):
    """A token decoded alone (the executor with M = 1) gets the same final hidden state as inside a
    prefill of the whole sequence (M > 1), bit for bit, in every format (the float formats' prefill
    runs each token with the gemv's arithmetic). Covers qk-norm, biases, sliding windows, learned
    positions, GELU and parallel-residual MLPs: every architecture runs the one plan."""
    cfg, opts, _, _, _ = CASES[case]
    if quant in ("int8", "int4"):                # K a multiple of 32 (172 would be zero-padded)
        cfg = dict(cfg, intermediate_size=192)
    m = minilm.load(make_checkpoint(cfg, **opts), quant=quant, n_ctx=48)
    check_decode_equals_prefill(m)


def test_zero_padded_matrices_run_in_the_plan(make_checkpoint):
    """ffn 172 is zero-padded to 192 for int8: the plan widens the buffer the padded matrix reads
    and the padded columns stay zero, so the result is the unpadded product."""
    folder = make_checkpoint(llama_cfg(), name="p")
    ref = minilm.load(folder, quant="f32", n_ctx=32).logits([5, 9, 31, 2])
    m = minilm.load(folder, quant="int8", n_ctx=32)
    assert m.net.lowered.widths["act"] == 192
    got = m.logits([5, 9, 31, 2])
    assert np.abs(got - ref).max() < 0.05 * float(ref.max() - ref.min())


DEADLOCK_SCRIPT = r"""
import sys, numba, numpy as np, minilm
m = minilm.load(sys.argv[1], n_ctx=48, threads=2)        # run state sized for 2 threads
m.net.prefill([3, 17, 29, 5])
a = m.net.decode(9).copy()
numba.set_num_threads(1)                                 # ... run by one: it must take every task
m.net.cache.truncate(4)
b = m.net.decode(9).copy()
print("SAME" if np.array_equal(a, b) else "DIFF")
"""


def test_executor_with_fewer_threads_than_tasks(make_checkpoint):
    """The executor's phases never wait on a task nobody can take: with its region run by one
    thread (numba threads lowered after load) it finishes, with the same logits."""
    import subprocess
    import sys
    folder = make_checkpoint(CASES["qwen3"][0])
    r = subprocess.run([sys.executable, "-c", DEADLOCK_SCRIPT, str(folder)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "SAME"
