"""The plan: each architecture's differences are data (model.build_plan), lowered to tables that
one executor runs; and the executor takes a new kind of step without touching the others."""
from __future__ import annotations

import os
import subprocess
import sys

from minilm.config import Config
from minilm.kernels.executor import ACT_GELU, ACT_GELU_TANH
from minilm.model import build_plan

from test_random_models import gpt2_cfg, llama_cfg, neox_cfg


def ops(plan, **match):
    return [s for s in plan if all(getattr(s, k) == v for k, v in match.items())]


def test_architecture_differences_are_data():
    L = 2
    llama = build_plan(Config.from_hf(llama_cfg()))
    assert [s.op for s in llama[:4]] == ["norm", "quant", "matmul", "qkv"]
    assert len(ops(llama, op="silu_mul")) == L and not ops(llama, op="gelu") and not ops(llama, op="add_rows")
    assert [s.b for s in ops(llama, op="matmul", dst="qkv")] == ["l0.bqkv", "l1.bqkv"]  # absent: skipped
    assert llama[-1].op == "add_norm" and llama[-1].w == "out_norm.w"

    gpt2 = build_plan(Config.from_hf(gpt2_cfg()))
    assert gpt2[0].op == "add_rows" and gpt2[0].mat == "pos_embd"          # learned positions
    assert [s.i0 for s in ops(gpt2, op="matmul", dst="ff")] == [ACT_GELU_TANH] * L   # gelu_new, fused
    assert not ops(gpt2, op="gelu")

    neox = build_plan(Config.from_hf(neox_cfg(use_parallel_residual=True)))
    assert len(ops(neox, op="add", dst="o", src="o2")) == L               # parallel residual
    assert [s.i0 for s in ops(neox, op="matmul", dst="o2")] == [0] * L     # down: no activation
    assert [s.i0 for s in ops(neox, op="matmul", dst="ff")] == [ACT_GELU] * L        # exact GELU, fused

    mistral = build_plan(Config.from_hf(llama_cfg(model_type="mistral", sliding_window=16)))
    assert [s.i0 for s in ops(mistral, op="attend")] == [16] * L           # sliding windows
    text = "\n".join(map(str, mistral))
    assert "attend(dst='att', src='qkv', i0=16" in text                    # readable


NEW_KIND = r"""
import numpy as np
from numba import njit
from minilm import plan as P
from minilm.kernels import executor as X

@njit
def softcap(s, k, M, pos, steps, fpar, btab, mtab, vtab):
    # a new step kind: dst = cap * tanh(dst / cap), cap = the step's scale (as Gemma 2 caps logits)
    d = X._buf(btab, steps[s, X.S_DST], M)[k]
    cap = np.float32(fpar[s, X.P_SCALE])
    for i in range(d.shape[0]):
        d[i] = cap * np.tanh(d[i] / cap)

P.register_step_kind("softcap", softcap)
D, M = 64, 3
steps = [P.Step("norm", dst="xn", src="x", w="w", eps=1e-5), P.Step("softcap", dst="xn", scale=0.5)]
w = np.linspace(0.5, 2.0, D).astype(np.float32)
low = P.lower(steps, {"w": w}, {"x": D, "xn": D})
x = (np.random.default_rng(0).standard_normal((M, D)) * 3).astype(np.float32)
bufs = {"x": x.copy(), "xn": np.zeros((M, D), np.float32)}
btab = np.array([[bufs[n].ctypes.data, M, D] for n in low.buffer_names], np.int64)
z2, z5 = np.zeros((1, 1), np.float32), np.zeros((1, 1, 1, 1, 1), np.float32)
pos, slot = np.arange(M, dtype=np.int64), np.zeros(M, np.int64)
X.run_plan(low.fs, low.steps, low.fpar, btab, low.mtab, low.vtab, M, pos, slot, z2, z2, z5, z5,
           np.zeros((M, 32), np.int8), np.zeros((M, 1), np.float32), np.zeros((M, 1), np.float32),
           np.zeros((2, 4, 32), np.float32), np.zeros((2, 1), np.float32), np.zeros((M, 2, 1, 3), np.float32),
           1, 1, 1, 0, np.zeros(2 * len(steps), np.int64))
xd = x.astype(np.float64)
want = xd / np.sqrt((xd ** 2).mean(1, keepdims=True) + 1e-5) * w
want = 0.5 * np.tanh(want / 0.5)
err = np.abs(bufs["xn"] - want).max()
print("ERR", err)
"""


def test_executor_takes_a_new_step_kind(tmp_path):
    """A step kind defined outside kernels/executor.py (a soft-cap), registered, named in a small
    test-only plan and run by the executor next to a built-in kind, gives numpy's answer."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    r = subprocess.run([sys.executable, "-c", NEW_KIND], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    err = float(r.stdout.split("ERR")[-1])
    assert err < 1e-5, r.stdout
