"""ggml's block formats (Q4_1 ... Q6_K, IQ4_NL, IQ4_XS; kernels/ggml_quants.py) inside whole
models: registered in the traits table, run by the executor from their raw ggml bytes."""
from __future__ import annotations

import numpy as np
import pytest

import minilm

from conftest import check_decode_equals_prefill, shared_path
from test_random_models import llama_cfg

WIDE = llama_cfg(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512)


@pytest.mark.parametrize("quant", ["q4_k", "q6_k", "q2_k", "iq4_xs", "q5_1"])
def test_decode_equals_prefill(make_checkpoint, quant):
    """The executor runs the raw-byte kernels per token in decode and prefill: bit-identical."""
    m = minilm.load(make_checkpoint(WIDE), quant=quant, n_ctx=48)
    # (q2_k is llama.cpp's Q2_K mix: its gate/up matrices are Q2_K, attention and down Q3_K)
    assert m.tensors["l0.w_gate_up"].fmt == quant
    assert quant == "q2_k" or (m.tensors["l0.wqkv"].fmt == quant and m.tensors["l0.w_down"].fmt == quant)
    check_decode_equals_prefill(m)


def test_256_block_formats_fall_back_as_llama_cpp(make_checkpoint):
    """K = 64 is no multiple of 256: Q4_K matrices take Q5_0, Q6_K ones Q8_0 (llama.cpp's rule)."""
    folder = make_checkpoint(llama_cfg(intermediate_size=192))
    assert minilm.load(folder, quant="q4_k", n_ctx=32).tensors["l0.wqkv"].fmt == "q5_0"
    assert minilm.load(folder, quant="q6_k", n_ctx=32).tensors["l0.wqkv"].fmt == "q8_0"


def _kl_top1(ref, lg):
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lq = lg - lg.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float((p * (np.log(p) - lq)).sum(1).mean()), float((lg.argmax(1) == ref.argmax(1)).mean())


@pytest.mark.parametrize("quant,kl_max", [("q6_k", 4e-4), ("q4_k", 3e-3), ("iq4_xs", 3e-3), ("q2_k", 3e-2)])
def test_accuracy_on_the_256_wide_proxy(quant, kl_max):
    """proxy-llama256 (every width a multiple of 256) in each K-quant: mean KL against f32 and
    top-1 agreement on 120 tokens of text (measured: q6_k 8e-5, q4_k 5e-4, iq4_xs 5e-4, q2_k 6e-3)."""
    folder = shared_path("models", "proxy-llama256-shakespeare")
    f32 = minilm.load(folder)
    ids = f32.tokenizer.encode(shared_path("texts", "tinyshakespeare_input.txt").read_text()[5000:7000])[:120]
    m = minilm.load(folder, quant=quant)
    kl, top1 = _kl_top1(f32.logits(ids), m.logits(ids))
    assert kl < kl_max and top1 >= 0.9, (quant, kl, top1)


@pytest.mark.parametrize("quant", ["q4_k", "q6_k", "iq4_xs", "q5_1"])
def test_gguf_round_trip_runs_the_raw_bytes(tmp_path, quant):
    """A GGUF of ggml block formats (mixed with Q8_0 embeddings and F32 norms) loads memory-mapped
    and runs natively: same logits as the model it was written from, and gguf-py's own dequantizer
    reads the same weights from the file."""
    gguf = pytest.importorskip("gguf")
    from minilm.gguf_io import export_gguf
    from minilm.quant import FORMATS
    m = minilm.load(shared_path("models", "proxy-llama256-shakespeare"), quant=quant)
    path = export_gguf(m, tmp_path / f"m-{quant}.gguf", verbose=False)
    g = minilm.load(str(path))
    assert g.tensors["l0.w_down"].fmt == quant and g.tensors["tok_embd"].fmt == "q8_0"
    ids = list(range(5, 40))
    np.testing.assert_array_equal(g.logits(ids), m.logits(ids))
    t = [x for x in gguf.GGUFReader(str(path)).tensors if x.name == "blk.0.ffn_down.weight"][0]
    assert t.tensor_type.name == FORMATS[quant].ggml_name
    lin = g.tensors["l0.w_down"]
    ours = FORMATS[quant].unpack(lin.arrays)
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape), ours)


@pytest.mark.parametrize("quant", ["q4_k", "q5_1"])
def test_prequantized_folder_round_trip(tmp_path, quant):
    """model.save of a ggml-format model maps back (its raw arrays checked against the traits
    table's stored shapes) with identical logits: a 256-block and a 32-block format, each one the
    GGUF round trip above compiles the executor for (IQ4_NL's kernel: test_decode_exact.py,
    its bytes: test_ggml_quants.py)."""
    m = minilm.load(shared_path("models", "proxy-llama256-shakespeare"), quant=quant)
    m.save(tmp_path / "pq")
    back = minilm.load(str(tmp_path / "pq"))
    assert back.quant == quant and back.tensors["l0.wqkv"].fmt == quant
    ids = list(range(5, 30))
    np.testing.assert_array_equal(back.logits(ids), m.logits(ids))
