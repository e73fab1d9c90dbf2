"""llama.cpp's mix presets (minilm/mixes.py) and importance-weighted quantization (calibrate.py).

The expected types below are written out from llama.cpp's rules (llama_tensor_get_type,
src/llama-quant.cpp at 0c1e570) by hand, not produced by our own table."""
from __future__ import annotations

import numpy as np
import pytest

import minilm
from minilm.config import Config
from minilm.mixes import mix_formats, tensor_type
from minilm.quant import FORMATS, Linear

from conftest import shared_path
from test_random_models import llama_cfg


def cfg(**kw) -> Config:
    return Config.from_hf(llama_cfg(**kw))


# Llama-2-7B's shape: 32 layers, 32 heads (no GQA), K 4096, ffn 11008 (a multiple of 256), untied.
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
# llama.cpp's use_more_bits for 32 layers: i < 4, i >= 28, (i - 4) % 3 == 2
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def test_q4_k_m_on_a_7b_shape():
    c = cfg(**LLAMA7B)
    for i in range(32):
        want = "q6_k" if i in MORE_BITS_32 else "q4_k"
        assert tensor_type("q4_k_m", "attn_v", i, c, 4096)[0] == want, i
        assert tensor_type("q4_k_m", "ffn_down", i, c, 11008)[0] == want, i
        for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert tensor_type("q4_k_m", role, i, c, 4096)[0] == "q4_k", (role, i)
    assert tensor_type("q4_k_m", "output", 0, c, 4096)[0] == "q6_k"
    assert tensor_type("q4_k_m", "token_embd", 0, c, 4096)[0] == "q4_k"
    f = mix_formats("q4_k_m", c)        # fused q/k/v: the widest part
    assert [f[f"l{i}.wqkv"] for i in range(32)] == ["q6_k" if i in MORE_BITS_32 else "q4_k" for i in range(32)]
    assert f["output"] == "q6_k" and f["tok_embd"] == "q4_k" and f["l5.w_gate_up"] == "q4_k"


def test_q3_k_m_q2_k_q4_k_s_on_a_tinyllama_shape():
    """TinyLlama-1.1B: 22 layers, 32 / 4 heads (n_gqa 8), K 2048, ffn 5632 (22 x 256), untied."""
    c = cfg(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    t = lambda p, r, i, K=2048: tensor_type(p, r, i, c, K)[0]
    # Q3_K_M: attn_v Q5_K in the first 2, else Q4_K; ffn_down Q5_K for i < 22/16 = 1, else Q4_K;
    # attn_output Q4_K; q/k/gate/up Q3_K
    assert [t("q3_k_m", "attn_v", i) for i in range(22)] == ["q5_k"] * 2 + ["q4_k"] * 20
    assert [t("q3_k_m", "ffn_down", i, 5632) for i in range(22)] == ["q5_k"] + ["q4_k"] * 21
    assert t("q3_k_m", "attn_output", 7) == "q4_k" and t("q3_k_m", "attn_q", 7) == "q3_k"
    # Q2_K with n_gqa 8 >= 4: attn_v Q4_K; ffn_down and attn_output Q3_K; the rest Q2_K
    assert t("q2_k", "attn_v", 9) == "q4_k" and t("q2_k", "ffn_down", 9, 5632) == "q3_k"
    assert t("q2_k", "attn_output", 9) == "q3_k" and t("q2_k", "ffn_up", 9) == "q2_k"
    # Q4_K_S: attn_v Q5_K in the first 4; ffn_down Q5_K for i < 22/8 = 2
    assert [t("q4_k_s", "attn_v", i) for i in range(6)] == ["q5_k"] * 4 + ["q4_k"] * 2
    assert [t("q4_k_s", "ffn_down", i, 5632) for i in range(4)] == ["q5_k"] * 2 + ["q4_k"] * 2
    # Q3_K_L: v / down / output projection Q5_K; Q5_K_M: more_bits(i, 22) layers Q6_K
    # (i < 2, i >= 19, (i - 2) % 3 == 2)
    assert t("q3_k_l", "attn_v", 10) == "q5_k" and t("q3_k_l", "attn_output", 10) == "q5_k"
    six = [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    assert [i for i in range(22) if t("q5_k_m", "attn_v", i) == "q6_k"] == six
    assert t("q5_k_s", "attn_v", 0) == "q5_k" and t("q3_k_s", "attn_v", 0) == "q3_k"


def test_gqa_and_width_fallbacks():
    """Q2_K's attn_v with n_gqa 2 is Q3_K; widths that are no multiple of 256 fall back as
    llama.cpp 0c1e570 does; a tied embedding is quantized as the output (Q6_K, or Q8_0 when
    its width is no multiple of the default type's block)."""
    smol = cfg(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    t = lambda p, r, i, K: tensor_type(p, r, i, smol, K)
    assert t("q2_k", "attn_v", 3, 576) == ("q4_0", "q3_k")        # n_gqa 3 < 4: Q3_K -> Q4_0
    assert t("q4_k_m", "attn_q", 3, 576) == ("q5_0", "q4_k")
    assert t("q5_k_s", "ffn_up", 3, 576) == ("q5_1", "q5_k")
    assert t("q4_k_m", "attn_v", 0, 576) == ("q8_0", "q6_k")
    assert t("q4_k_m", "ffn_down", 1, 1536) == ("q6_k", "q6_k")   # 1536 = 6 x 256: no fallback
    assert t("q4_k_m", "token_embd", 0, 576) == ("q8_0", "q8_0")  # tied, 576 % 256: Q8_0
    assert t("q4_k_m", "ffn_down", 0, 172) == ("f16", "q6_k")     # not even a 32-block: F16
    wide = cfg(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=1)
    assert tensor_type("q2_k", "attn_v", 0, wide, 256)[0] == "q4_k"   # n_gqa 4
    assert mix_formats("q4_k_m", wide)["tok_embd"] == "q6_k"          # tied, 256-wide: Q6_K
    with pytest.raises(ValueError, match="q4_k_x"):
        tensor_type("q4_k_x", "attn_v", 0, wide, 256)


@pytest.fixture(scope="module")
def llama256():
    return shared_path("models", "proxy-llama256-shakespeare")


def test_preset_round_trips_prequant_folder_and_gguf(tmp_path, llama256):
    gguf = pytest.importorskip("gguf")
    from minilm.gguf_io import export_gguf
    m = minilm.load(llama256, quant="q4_k_m", n_ctx=64)
    f = mix_formats("q4_k_m", m.config)
    assert {k: t.fmt for k, t in m.tensors.items() if isinstance(t, Linear)} == f
    assert "llama.cpp mix q4_k_m: q4_k x13, q6_k x5" in m.summary()
    ids = list(range(5, 40))
    ref = m.logits(ids)
    m.save(tmp_path / "pq")
    back = minilm.load(str(tmp_path / "pq"))
    assert back.quant == "q4_k_m" and {k: t.fmt for k, t in back.tensors.items() if isinstance(t, Linear)} == f
    np.testing.assert_array_equal(back.logits(ids), ref)
    path = export_gguf(m, tmp_path / "m.gguf", verbose=False)
    r = gguf.GGUFReader(str(path))
    assert int(r.fields["general.file_type"].contents()) == 15          # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in r.tensors}
    # 4 layers: more_bits = layers 2 and 3 (i >= 7*4/8 = 3, (i - 0) % 3 == 2)
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    g = minilm.load(str(path))
    assert g.quant == "q4_k_m"
    np.testing.assert_array_equal(g.logits(ids), ref)


def _werr(lin, w, qw):
    d = FORMATS[lin.fmt].unpack(lin.arrays)[:, :w.shape[1]]
    return float((qw[None, :] * (w - d) ** 2).sum())


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "q4_k", "q3_k", "q2_k", "q6_k", "iq4_nl", "q5_0"])
def test_importance_weights_lower_the_weighted_error(fmt):
    """A matrix whose important columns are known (every 8th column weighs 50x): quantizing with
    those weights gives a lower weighted squared error than without, for every format including
    minilm's own byte-compatible Q4_0 / Q8_0 packers."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 512)).astype(np.float32) * np.float32(0.05)
    w[:, ::37] *= 4                                          # some outliers, as in real weights
    qw = np.ones(512, np.float32)
    qw[::8] = 50.0
    plain = Linear.quantize(w, fmt)
    weighted = Linear.quantize(w, fmt, qw=qw)
    assert weighted.fmt == fmt and weighted.arrays.keys() == plain.arrays.keys()
    e0, e1 = _werr(plain, w, qw), _werr(weighted, w, qw)
    assert e1 < 0.95 * e0, (fmt, e0, e1)


def test_stats_step_sums_squares_like_numpy():
    """The executor's stats step on a buffer of M rows: column sums of squares added to the vector
    (two steps here: it accumulates)."""
    from minilm import plan as P
    from minilm.kernels import executor as X
    D, M = 40, 5
    steps = [P.Step("stats", src="x", w="imatrix:m"), P.Step("stats", src="x", w="imatrix:m")]
    v = np.full(D, 0.25, np.float32)
    low = P.lower(steps, {"imatrix:m": v}, {"x": D})
    x = (np.random.default_rng(0).standard_normal((M, D)) * 3).astype(np.float32)
    btab = np.array([[x.ctypes.data, M, D]], np.int64)
    z2, z5 = np.zeros((1, 1), np.float32), np.zeros((1, 1, 1, 1, 1), np.float32)
    pos, slot = np.arange(M, dtype=np.int64), np.zeros(M, np.int64)             # rows: positions 0.., slot 0
    X.run_plan(low.fs, low.steps, low.fpar, btab, low.mtab, low.vtab, M, pos, slot, z2, z2, z5, z5,
               np.zeros((M, 32), np.int8), np.zeros((M, 1), np.float32), np.zeros((M, 1), np.float32),
               np.zeros((2, 4, 32), np.float32), np.zeros((2, 1), np.float32), np.zeros((M, 2, 1, 3), np.float32),
               1, 1, 1, 0, np.zeros(2 * len(steps), np.int64))
    want = 0.25 + 2 * (x.astype(np.float64) ** 2).sum(0)
    np.testing.assert_allclose(v, want, rtol=1e-6)


def test_collected_statistics_match_numpy(llama256):
    """In the model: the statistics of layer 0's q/k/v matrix are the mean squares of the
    normed embeddings (its input), computed here with numpy; every matrix has a vector of its
    input width, the lm head (untied) its final-normed input's."""
    from minilm.calibrate import collect_imatrix
    m = minilm.load(llama256, n_ctx=128)
    text = shared_path("texts", "pride_and_prejudice_pg1342.txt").read_text()[:3000]
    ids = m.tokenizer.encode(text)[:300]
    im = collect_imatrix(m, text, max_tokens=300, chunk=128)
    x = m.tensors["tok_embd"].arrays["w"][ids].astype(np.float64)
    xn = x / np.sqrt((x ** 2).mean(1, keepdims=True) + m.config.norm_eps) * m.tensors["l0.attn_norm.w"]
    np.testing.assert_allclose(im["l0.wqkv"], (xn ** 2).mean(0), rtol=2e-4)
    for name, t in m.tensors.items():
        if isinstance(t, Linear) and name != "tok_embd":    # untied: the embedding is a lookup
            assert im[name].shape == (t.K,) and (im[name] > 0).all(), name
    assert "tok_embd" not in im and "output" in im
    cov = collect_imatrix(m, text, max_tokens=300, chunk=128, full=True)   # the whole X^T X
    np.testing.assert_allclose(cov["l0.wqkv"], xn.T @ xn / len(xn), rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(np.diagonal(cov["l0.w_down"]), im["l0.w_down"], rtol=1e-4)


@pytest.mark.parametrize("fmt", ["q4_0", "iq4_nl", "q4_k", "q2_k", "q5_k", "q6_k", "q8_0"])
def test_gptq_lowers_the_output_error(fmt):
    """Inputs with correlated columns (covariance H): block-wise GPTQ error feedback gives a lower
    output error E ||(W - Q) x||^2 on fresh inputs than the diagonal imatrix alone, and the result
    is a plain Linear of the format (its blocks as the format's quantizer wrote them)."""
    from minilm.calibrate import gptq_linear
    rng = np.random.default_rng(3)
    K, N = 512, 48
    A = rng.standard_normal((K, K)).astype(np.float32) / np.sqrt(K) + np.eye(K, dtype=np.float32)
    X = rng.standard_normal((4000, K)).astype(np.float32) @ A          # correlated inputs
    H = X[:2000].T @ X[:2000] / 2000
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    err = lambda lin: float(((X[2000:] @ (w - FORMATS[lin.fmt].unpack(lin.arrays)[:, :K]).T) ** 2).mean())
    diag = Linear.quantize(w, fmt, qw=np.diagonal(H).copy())
    g = gptq_linear(w, fmt, 32, H)
    assert g.fmt == fmt and g.Kp == K and {k: a.shape for k, a in g.arrays.items()} == \
        {k: a.shape for k, a in diag.arrays.items()}
    assert err(g) < 0.8 * err(diag), (fmt, err(g), err(diag))


def test_bad_quant_and_calibration_input(tmp_path, llama256):
    with pytest.raises(ValueError, match="q4_k_x.*q4_k_m"):
        minilm.load(llama256, quant="q4_k_x")
    with pytest.raises(ValueError, match="group_size"):
        minilm.load(llama256, quant="q4_k_m", group_size=64)
    with pytest.raises(ValueError, match="calibration file .*missing.txt"):
        minilm.load(llama256, quant="q4_0", calibration=tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bad.txt.*UTF-8"):
        minilm.load(llama256, quant="q4_0", calibration=bad)
    from minilm.calibrate import save_imatrix
    from minilm.errors import ModelLoadError
    p = save_imatrix({"l0.wqkv": np.ones(100, np.float32)}, tmp_path / "im.safetensors")
    with pytest.raises(ModelLoadError, match=r"im.safetensors.*'l0.wqkv'.*F32\[256\]"):
        minilm.load(llama256, quant="q4_0", imatrix=p)
    p = save_imatrix({"l9.wqkv": np.ones(256, np.float32)}, tmp_path / "im2.safetensors")
    with pytest.raises(ModelLoadError, match="'l9.wqkv' names no matrix"):
        minilm.load(llama256, quant="q4_0", imatrix=p)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="junk.safetensors"):
        minilm.load(llama256, quant="q4_0", imatrix=tmp_path / "junk.safetensors")
    from minilm.cli import main
    assert main(["quantize", "-m", str(llama256), "--quant", "q9_k_m", "-o", str(tmp_path / "o")]) != 0
    assert main(["quantize", "-m", str(llama256), "--quant", "q4_0", "--save-imatrix", str(tmp_path / "x"),
                 "-o", str(tmp_path / "o")]) != 0


def test_bench_levels_name_mixes_and_calibrated_rows(tmp_path, llama256):
    from minilm.bench.common import calibrated, gguf_type, parse_level
    from minilm.cli import main
    assert parse_level("q4_k_m+imatrix") == ("q4_k_m", None) and calibrated("q4_k_m+imatrix")
    assert parse_level("q4_0") == ("q4_0", None) and not calibrated("q4_0") and gguf_type("q4_0") == "q4_0"
    with pytest.raises(ValueError, match="chooses the embedding"):
        parse_level("q4_k_m@int8")
    with pytest.raises(ValueError, match="q4_k_z"):
        parse_level("q4_k_z+imatrix")
    # a calibrated row without --calibration: refused before anything is measured
    assert main(["bench", "-m", str(llama256), "--quant", "q4_0+imatrix", "-o", str(tmp_path / "b")]) != 0


def test_quantize_cli_calibration_and_saved_imatrix(tmp_path, llama256):
    """minilm quantize --calibration writes a folder whose matrices differ from the unweighted
    ones and saves the imatrix; --imatrix reads it back; both folders load and generate."""
    from safetensors.numpy import load_file

    from minilm.cli import main
    text = tmp_path / "calib.txt"
    text.write_text(shared_path("texts", "pride_and_prejudice_pg1342.txt").read_text()[:6000])
    im = tmp_path / "im.safetensors"
    assert main(["quantize", "-m", str(llama256), "--quant", "q4_0", "--calibration", str(text),
                 "--save-imatrix", str(im), "-o", str(tmp_path / "cal")]) == 0
    saved = load_file(str(im))
    assert saved["l0.w_down"].shape == (768,) and saved["output"].shape == (256,) and "tok_embd" not in saved
    assert main(["quantize", "-m", str(llama256), "--quant", "q4_0", "--imatrix", str(im),
                 "-o", str(tmp_path / "imx")]) == 0
    plain = minilm.load(llama256, quant="q4_0", n_ctx=64)
    for d in ("cal", "imx"):
        m = minilm.load(str(tmp_path / d), n_ctx=64)
        assert m.quant == "q4_0" and m.tensors["l1.w_down"].fmt == "q4_0"
        assert not np.array_equal(m.tensors["l1.w_down"].arrays["qs"], plain.tensors["l1.w_down"].arrays["qs"])
        assert len(m.generate("ROMEO:", max_new_tokens=8)) > 0


def test_mixed_fused_parts_take_the_widest_format_not_f32():
    """A GGUF from llama.cpp's Q4_K_M has attn_v in Q6_K beside attn_q / attn_k in Q4_K: the fused
    q/k/v matrix is Q6_K (the Q6_K part byte for byte, the Q4_K parts re-packed from their exact
    values), never an f32 copy; the values stay within Q6_K's grid of the originals."""
    from minilm.sources import cat_rows, dequant
    rng = np.random.default_rng(0)
    q = Linear.quantize(rng.standard_normal((64, 256)).astype(np.float32), "q4_k")
    k = Linear.quantize(rng.standard_normal((32, 256)).astype(np.float32), "q4_k")
    v = Linear.quantize(rng.standard_normal((32, 256)).astype(np.float32), "q6_k")
    fused = cat_rows([q, k, v])
    assert fused.fmt == "q6_k" and fused.N == 128 and fused.K == 256
    assert np.array_equal(fused.arrays["raw"][96:], v.arrays["raw"])           # the Q6_K part as stored
    exact = np.concatenate([dequant(q), dequant(k)])
    got = dequant(fused)[:96]
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()             # Q6_K re-pack of Q4_K values
    f32 = cat_rows([Linear.quantize(rng.standard_normal((8, 256)).astype(np.float32), "f32"), v])
    assert f32.fmt == "f32"                                                     # f32 (32 bits) is the widest
    low = [Linear.quantize(rng.standard_normal((32, 256)).astype(np.float32), f) for f in ("q2_k", "q3_k")]
    both = cat_rows(low)                                                        # Q2_K mix: q/k Q2_K, v Q3_K
    assert both.fmt == "q6_k"                                                   # not onto Q3_K's coarse grid
    exact = np.concatenate([dequant(x) for x in low])
    assert np.abs(dequant(both) - exact).max() <= 0.03 * np.abs(exact).max()


def test_residual_statistics_weight_the_embedding_hessian(llama256):
    """collect_imatrix also records the residual stream's mean square where each norm reads it
    (before layer 0's: the embedding rows of the calibration tokens, checked with numpy). With
    them embedding_hessian weights each reader by 1 / that mean square; on the 256-wide proxy a
    Q5_K embedding quantized by GPTQ with that Hessian is much closer to f32 (mean KL) than with
    every reader scaled to unit trace (the weighting used before)."""
    from minilm.calibrate import collect_imatrix, embedding_hessian, gptq_linear
    from minilm.loader import build_lm
    m = minilm.load(llama256, n_ctx=256)
    text = shared_path("texts", "pride_and_prejudice_pg1342.txt").read_text()[:12000]
    ids = m.tokenizer.encode(text)[:1024]
    cov = collect_imatrix(m, text, max_tokens=1024, chunk=256, full=True)
    L = m.config.n_layers
    assert set(cov.residual) == {f"l{i}.{n}_norm.w" for i in range(L) for n in ("attn", "ffn")} | {"out_norm.w"}
    x = m.tensors["tok_embd"].arrays["w"][ids].astype(np.float64)
    np.testing.assert_allclose(cov.residual["l0.attn_norm.w"], (x ** 2).mean(), rtol=1e-4)
    assert all(v > 0 for v in cov.residual.values())
    H = embedding_hessian(m, cov.residual)
    want = 0
    for norm, mat in [(f"l{i}.{n}_norm.w", f"l{i}.{w}") for i in range(L) for n, w in (("attn", "wqkv"), ("ffn", "w_gate_up"))] \
            + [("out_norm.w", "output")]:
        A = m.tensors[mat].arrays["w"].astype(np.float64) * m.tensors[norm].astype(np.float64)[None, :]
        want = want + A.T @ A / cov.residual[norm]
    np.testing.assert_allclose(H, want / np.trace(want), rtol=1e-9, atol=1e-15)
    ev = m.tokenizer.encode(shared_path("texts", "tinyshakespeare_input.txt").read_text()[500000:503000])[:256]
    ref = m.logits(ev).astype(np.float64)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = m.tensors["tok_embd"].arrays["w"]

    def kl(Hs):
        lm = build_lm(m.config, dict(m.tensors, tok_embd=gptq_linear(w, "q5_k", 32, Hs, "tok_embd")), m.tokenizer, 256)
        lg = lm.logits(ev).astype(np.float64)
        lq = lg - lg.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        return float((p * (np.log(p) - lq)).sum(1).mean())
    new, old = kl(H), kl(embedding_hessian(m))
    assert new < 0.7 * old, (new, old)


def test_untied_embedding_takes_gptq_with_the_readers_hessian(llama256):
    """An untied token embedding has no matmul input (no imatrix); with covariances it is quantized
    by GPTQ with embedding_hessian: how the residual stream's readers (norm, then matrix) see a
    row error. H is symmetric, positive semidefinite, of unit trace, and the quantized rows have
    a lower error e^T H e than the unweighted quantizer's."""
    from minilm.calibrate import embedding_hessian, gptq_linear, quantize_tensors
    m = minilm.load(llama256, n_ctx=64)
    H = embedding_hessian(m)
    D = m.config.hidden_size
    assert H.shape == (D, D) and np.allclose(H, H.T) and abs(np.trace(H) - 1) < 1e-9
    assert np.linalg.eigvalsh(H).min() > -1e-12
    w = m.tensors["tok_embd"].arrays["w"][:256].astype(np.float32)
    cost = lambda lin: float(np.einsum("ij,jk,ik->", e := w - FORMATS[lin.fmt].unpack(lin.arrays)[:, :D], H, e))
    assert cost(gptq_linear(w, "q4_k", 32, H)) < 0.9 * cost(Linear.quantize(w, "q4_k"))
    cov = {"l0.wqkv": np.eye(D, dtype=np.float32)}               # covariances given: the embedding too
    cal, _ = quantize_tensors(m, "q4_0", cov)
    plain, _ = quantize_tensors(m, "q4_0", None)
    assert cal["tok_embd"].fmt == plain["tok_embd"].fmt == "q8_0"
    assert not np.array_equal(cal["tok_embd"].arrays["qs"], plain["tok_embd"].arrays["qs"])


def test_tied_embedding_is_weighted_for_both_roles():
    """A tied embedding is the lm head and the token lookup. collect_imatrix records how often
    each token is an input (token_freq); tied_embedding_hessians gives row t the Hessian
    C + p_t R: C the head's input covariance, R the residual readers' Hessian (each reader
    1 / the stream's mean square, the tied head through the final norm among them), p_t the
    token's share of the inputs; rows of equal p_t share one. Quantized that way (Q4_0), the
    tied matrix alone costs less mean KL than with the head's C for every row (the weighting used
    before), and quantize_tensors does it for a tied model given covariances."""
    from minilm.calibrate import collect_imatrix, gptq_linear, quantize_tensors, tied_embedding_hessians
    from minilm.loader import build_lm
    m = minilm.load(shared_path("models", "proxy-qwen2-shakespeare"), n_ctx=256)
    assert m.config.tie_word_embeddings and "output" not in m.tensors
    text = shared_path("texts", "pride_and_prejudice_pg1342.txt").read_text()[:20000]
    ids = m.tokenizer.encode(text)[:2048]
    cov = collect_imatrix(m, text, max_tokens=2048, chunk=256, full=True)
    V, L = m.config.vocab_size, m.config.n_layers
    np.testing.assert_allclose(cov.token_freq, np.bincount(ids, minlength=V) / len(ids))
    C = cov["tok_embd"].astype(np.float64)
    R = 0
    for norm, mat in [(f"l{i}.{n}_norm.w", f"l{i}.{w}") for i in range(L) for n, w in (("attn", "wqkv"), ("ffn", "w_gate_up"))] \
            + [("out_norm.w", "tok_embd")]:
        A = m.tensors[mat].arrays["w"].astype(np.float64) * m.tensors[norm].astype(np.float64)[None, :]
        R = R + A.T @ A / cov.residual[norm] * m.config.embed_scale ** 2
    groups = list(tied_embedding_hessians(m, C, cov))
    rows = np.concatenate([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(V))
    for r, H in groups:
        p = cov.token_freq[r[0]]
        assert (cov.token_freq[r] == p).all()
        np.testing.assert_allclose(H, C + p * R, rtol=1e-9, atol=1e-12)
    assert tied_embedding_hessians(m, C, dict(cov)) is None          # no residual statistics: C alone
    ev = m.tokenizer.encode(shared_path("texts", "tinyshakespeare_input.txt").read_text()[500000:505000])[:512]
    wins = [ev[:256], ev[256:512]]
    kl = []
    for tensors in (quantize_tensors(m, "q4_0", cov, formats={"tok_embd": "q4_0"})[0],
                    dict(m.tensors, tok_embd=gptq_linear(m.tensors["tok_embd"].arrays["w"], "q4_0", 32, C, "tok_embd"))):
        lm = build_lm(m.config, dict(m.tensors, tok_embd=tensors["tok_embd"]), m.tokenizer, 256)
        out = []
        for w in wins:
            ref, lg = m.logits(w).astype(np.float64), lm.logits(w).astype(np.float64)
            lp, lq = (a - a.max(1, keepdims=True) for a in (ref, lg))
            lp, lq = (a - np.log(np.exp(a).sum(1, keepdims=True)) for a in (lp, lq))
            out.append((np.exp(lp) * (lp - lq)).sum(1))
        kl.append(float(np.concatenate(out).mean()))
    assert kl[0] < 0.95 * kl[1], kl
