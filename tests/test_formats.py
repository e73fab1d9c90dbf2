"""One loop over the weight-format traits table (minilm.quant.FORMATS), as ggml's
test-quantize-fns does: every format's kernels against its numpy references, with thresholds."""
from __future__ import annotations

import numpy as np
import pytest

from minilm.quant import FORMATS, Linear, quantize_act_ref

# format -> (max round-trip RMSE relative to the weights' RMS, max relative dot error vs f64)
THRESHOLDS = {"f32": (0.0, 1e-6), "f16": (1e-3, 2e-3), "bf16": (8e-3, 1e-2),
              "q8_0": (8e-3, 2e-2), "q4_0": (0.12, 0.12), "q4_1": (0.12, 0.12), "q5_0": (0.06, 0.06),
              "q5_1": (0.06, 0.06), "q2_k": (0.45, 0.45), "q3_k": (0.25, 0.25), "q4_k": (0.12, 0.12),
              "q5_k": (0.06, 0.06), "q6_k": (0.03, 0.03), "iq4_nl": (0.12, 0.12), "iq4_xs": (0.12, 0.12)}


def _data(N, K, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    x = rng.standard_normal(K).astype(np.float32)
    return w, x


def test_every_format_has_thresholds_and_consistent_traits():
    assert set(THRESHOLDS) == set(FORMATS)
    for f in FORMATS.values():
        assert f.block_bytes * 8 / f.block == pytest.approx(f.bits()), f.name
        if f.ggml_name is not None:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
            gt = GGMLQuantizationType[f.ggml_name]
            assert int(gt) == f.ggml_type
            assert GGML_QUANT_SIZES[gt] == (f.block, f.block_bytes), f.name


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("group", [32, 64, 128])
def test_format_kernels_against_references(name, group):
    f = FORMATS[name]
    if group != 32 and name != "q4_0":
        pytest.skip("only q4_0 has group sizes")
    N, K = 37, 256                                     # N not a multiple of the 4-row groups
    w, x = _data(N, K)
    lin = Linear.quantize(w, name, group)
    rmse_max, dot_max = THRESHOLDS[name]
    deq = f.unpack(lin.arrays)                         # numpy dequantize
    rmse = float(np.sqrt(((deq - w) ** 2).mean()) / np.sqrt((w ** 2).mean()))
    assert rmse <= rmse_max, f"{name}/g{group}: round-trip RMSE {rmse:.3g} > {rmse_max}"
    assert lin.bits_per_weight == pytest.approx(f.bits(group)), name

    ref = np.array([f.dot_ref({k: a[r:r + 1] for k, a in lin.arrays.items()}, x) for r in range(N)])
    exact = w.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(exact).max()
    assert np.abs(ref - exact).max() <= dot_max * scale, f"{name}: dot_ref vs f64 dot"

    out = np.zeros((1, N), np.float32)
    lin(x[None], out)                                  # decode GEMV
    assert np.abs(out[0] - ref).max() <= 2e-5 * scale, f"{name}: gemv vs dot_ref"
    xs = np.stack([x, -x, x * 0.5])                    # prefill GEMM: each row its own activation blocks
    out3 = np.zeros((3, N), np.float32)
    lin(xs, out3)
    ref3 = np.array([[f.dot_ref({k: a[r:r + 1] for k, a in lin.arrays.items()}, xr) for r in range(N)] for xr in xs])
    assert np.abs(out3 - ref3).max() <= 2e-5 * scale, f"{name}: gemm vs dot_ref"


def test_activation_reference_is_ggml_q8_0():
    x = np.linspace(-3, 5, 64).astype(np.float32)
    q, d = quantize_act_ref(x)
    assert q.shape == (2, 32) and np.abs(q).max() == 127
    np.testing.assert_allclose(q * d[:, None], x.reshape(2, 32), atol=float(d.max()) / 2 + 1e-7)
