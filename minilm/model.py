"""The forward pass: one file, top to bottom.

    ids ─▶ embed (+ learned positions) ─▶ for each layer:
              norm ─▶ qkv (+bias) ─▶ (q/k norm) ─▶ RoPE ─▶ write k,v into the cache
                   ─▶ attention over the cache ─▶ out-proj (+bias) ─▶ residual
              norm ─▶ MLP (gate·up SiLU, or up GELU) ─▶ down (+bias) ─▶ residual
              (GPT-NeoX: both branches read the same x and add together: parallel residual)
         ─▶ final norm ─▶ lm head ─▶ logits

Shapes: M new tokens, D hidden, H query heads, Hkv kv heads, hd head dim, F ffn, V vocab.
Architecture differences are switches read from `Config`; there is one loop for all of them.
`prefill` runs a whole prompt as matrix-matrix products; `decode` runs one token as
matrix-vector products. All scratch buffers are allocated once (`RunState`). For the Llama
family, `decode` runs the same kernels in the same order through `decode_step` (end of this
file): the layer loop inside one Numba call and one parallel region per token, instead of ~9
Python-level kernel calls and 5 parallel launches per layer.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .cache import KVCache
from .config import Config, rope_inv_freq
from .kernels.activations import gelu, gelu_row, gelu_tanh, gelu_tanh_row, silu_mul, silu_mul_row
from .kernels.attention import (attend_task, attention, decode_attention, decode_splits, merge_parts,
                                prep_decode, store_kv)
from .kernels.matmul import gemv_float_groups
from .kernels.norm import add_norm, add_norm_row, norm, norm_row, qk_rmsnorm
from .kernels.qmatmul import act_scratch, gemv_q4_0_groups, gemv_q8_0_groups
from .kernels.qmatmul import _quantize_act_q4 as quantize_act_q4
from .kernels.qmatmul import _quantize_act_q8v as quantize_act_q8v
from .kernels.simd import atomic_add, atomic_load, spin_pause
from .kernels.rope import rope_qk, rope_tables
from .quant import Linear

PREFILL_CHUNK = 256   # prompt rows per forward call: bounds the scratch buffers
FUSED_DECODE = True   # decode with decode_step (one Numba call per token) where the model allows
NONE = np.zeros(0, np.float32)  # "no bias" / "no q-k norm" for kernels that take optional arrays


class Layer:
    """One transformer block's weights (canonical names, see weights.py)."""

    def __init__(self, t: dict, i: int):
        g = lambda n: t.get(f"l{i}.{n}")
        opt = lambda n: NONE if g(n) is None else g(n)
        self.attn_norm = (g("attn_norm.w"), opt("attn_norm.b"))  # [D], [D] or [0] (RMSNorm)
        self.ffn_norm = (g("ffn_norm.w"), opt("ffn_norm.b"))
        self.wqkv, self.bqkv = g("wqkv"), g("bqkv")            # Linear [(H+2Hkv)hd, D], [(H+2Hkv)hd]
        self.q_norm, self.k_norm = opt("q_norm"), opt("k_norm")  # [hd] (Qwen3) or [0]
        self.wo, self.bo = g("wo"), g("bo")                    # Linear [D, H hd], [D]
        self.w_gate_up, self.b_gate_up = g("w_gate_up"), g("b_gate_up")  # Linear [2F, D]
        self.w_up, self.b_up = g("w_up"), g("b_up")            # Linear [F, D]
        self.w_down, self.b_down = g("w_down"), g("b_down")    # Linear [D, F]


class RunState:
    """Scratch buffers for up to `rows` tokens per forward call (views [:M] are C-contiguous)."""

    def __init__(self, c: Config, rows: int, n_ctx: int):
        D, F = c.hidden_size, c.intermediate_size
        self.rows = rows
        self.x = np.zeros((rows, D), np.float32)                    # residual stream
        self.xn = np.zeros((rows, D), np.float32)                   # normed input of a block
        self.qkv = np.zeros((rows, c.q_dim + 2 * c.kv_dim), np.float32)
        self.att = np.zeros((rows, c.q_dim), np.float32)            # attention output (pre out-proj)
        self.o = np.zeros((rows, D), np.float32)                    # out-proj / mlp output
        self.o2 = np.zeros((rows, D), np.float32)                    # second branch (parallel residual)
        self.ff = np.zeros((rows, 2 * F if c.gated_mlp else F), np.float32)
        self.act = np.zeros((rows, F), np.float32)
        self.logits = np.zeros((1, c.vocab_size), np.float32)       # decode logits
        self.ids = np.zeros(rows, np.int64)
        self.scores = np.zeros((c.n_heads, n_ctx), np.float32)      # attention scores, one row per head
        # decode attention: one split of the cached positions per thread (at load time):
        # [S, H, hd + 2] = (sum of e*v, max, sum of e)
        self.attn_part = np.zeros((numba.get_num_threads(), c.n_heads, c.head_dim + 2), np.float32)


class Transformer:
    """Weights + KV cache + run state of one model; `forward` is the whole network."""

    def __init__(self, cfg: Config, tensors: dict, n_ctx: int):
        c = self.cfg = cfg
        self.tok_embd: Linear = tensors["tok_embd"]                # [V, D]
        self.pos_embd = tensors.get("pos_embd")                    # [P, D] (GPT-2)
        self.out_norm = (tensors["out_norm.w"], tensors.get("out_norm.b", NONE))
        self.lm_head: Linear = tensors.get("output", self.tok_embd)  # [V, D]
        self.layers = [Layer(tensors, i) for i in range(c.n_layers)]
        self.n_ctx = n_ctx
        self.cache = KVCache(c.n_layers, c.n_kv_heads, n_ctx, c.head_dim)
        self.state = RunState(c, min(n_ctx, PREFILL_CHUNK), n_ctx)
        self.scale = np.float32(1.0 / math.sqrt(c.head_dim))
        self.cos = self.sin = np.zeros((1, 1), np.float32)
        if c.rotary_dim:
            self.cos, self.sin = rope_tables(rope_inv_freq(c), n_ctx)   # [n_ctx, rot/2]
        self._dynamic = c.rotary_dim and (c.rope_scaling or {}).get("rope_type") == "dynamic"
        self._fused = self._fused_decode_args() if FUSED_DECODE else None

    def rope_depends_on_length(self, end: int) -> bool:
        """True when RoPE frequencies change with the sequence length (dynamic NTK past max_pos)."""
        return bool(self._dynamic) and end > self.cfg.max_position_embeddings

    # ---- small helpers: one token runs the serial row kernels (a parallel launch costs more
    # ---- than one row of work), several tokens the parallel ones
    def _norm(self, x, wb, out):
        if x.shape[0] == 1:
            norm_row(x[0], wb[0], wb[1], self.cfg.norm_eps, out[0])
        else:
            norm(x, wb[0], wb[1], self.cfg.norm_eps, out)

    def _add_norm(self, x, y, wb, out):
        """x += y (residual); out = norm(x)."""
        if x.shape[0] == 1:
            add_norm_row(x[0], y[0], wb[0], wb[1], self.cfg.norm_eps, out[0])
        else:
            add_norm(x, y, wb[0], wb[1], self.cfg.norm_eps, out)

    def _rope(self, end: int):
        """cos/sin tables; dynamic NTK scaling enlarges the base once the sequence outgrows
        max_position_embeddings (as transformers does, per forward call)."""
        c = self.cfg
        if self._dynamic and end > c.max_position_embeddings:
            return rope_tables(rope_inv_freq(c, seq_len=end), end)
        return self.cos, self.sin

    def _attention(self, L: Layer, qkv, kc, vc, p0, cos, sin, att, window):
        """q/k norm, RoPE, cache write and attention for M tokens at positions p0.."""
        c = self.cfg
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        if qkv.shape[0] == 1:
            decode_attention(qkv[0], kc, vc, p0, cos, sin, L.q_norm, L.k_norm, H, Hkv, hd,
                             c.rotary_dim, c.norm_eps, self.scale, window, self.state.scores,
                             self.state.attn_part, att[0])
            return
        if c.qk_norm:
            qk_rmsnorm(qkv, L.q_norm, L.k_norm, H, Hkv, hd, c.norm_eps)
        if c.rotary_dim:
            rope_qk(qkv, p0, cos, sin, H, Hkv, hd, c.rotary_dim)
        store_kv(qkv, kc, vc, p0, H, Hkv, hd)                     # cache rows p0..p0+M-1
        attention(qkv, kc, vc, p0, H, Hkv, hd, self.scale, window, self.state.scores, att)

    def _mlp(self, L: Layer, xn, out, M):
        s = self.state
        if self.cfg.gated_mlp:
            gu = s.ff[:M]
            L.w_gate_up(xn, gu)                               # [M, D] -> [M, 2F]
            if L.b_gate_up is not None:
                gu += L.b_gate_up
            act = s.act[:M]
            if M == 1:
                silu_mul_row(gu[0], act[0])                   # [2F] -> [F]
            else:
                silu_mul(gu, act)                             # [M, 2F] -> [M, F]
        else:
            act = s.ff[:M]
            L.w_up(xn, act)                                   # [M, D] -> [M, F]
            act += L.b_up
            if M == 1:
                (gelu_tanh_row if self.cfg.act == "gelu_tanh" else gelu_row)(act[0])
            else:
                (gelu_tanh if self.cfg.act == "gelu_tanh" else gelu)(act)
        L.w_down(act, out)                                    # [M, F] -> [M, D]
        if L.b_down is not None:
            out += L.b_down

    # ---- the network ---------------------------------------------------------------------
    def forward(self, ids: np.ndarray, rope_end: int = 0) -> np.ndarray:
        """Run M = len(ids) <= state.rows new tokens at positions cache.pos.., write their k/v
        into the cache, advance it, and return the final-normed hidden states f32[M, D].
        rope_end: the length of the whole sequence this call belongs to (a prompt prefilled in
        chunks), which dynamic NTK RoPE scales by."""
        c, s, cache = self.cfg, self.state, self.cache
        M = len(ids)
        p0 = cache.pos
        cache.check_room(M)
        x, xn, qkv, att, o = s.x[:M], s.xn[:M], s.qkv[:M], s.att[:M], s.o[:M]

        self.tok_embd.rows(ids, x)                            # [M] -> [M, D]
        if self.pos_embd is not None:
            x += self.pos_embd[p0:p0 + M]                     # GPT-2 learned positions
        cos, sin = self._rope(max(rope_end, p0 + M))
        self._norm(x, self.layers[0].attn_norm, xn)           # [M, D]

        for i, L in enumerate(self.layers):
            # next norm after this block: the next layer's attention norm, or the final norm
            next_norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.out_norm
            # -- attention branch (xn = attn_norm(x))
            L.wqkv(xn, qkv)                                   # [M, D] -> [M, (H + 2Hkv) hd]
            if L.bqkv is not None:
                qkv += L.bqkv
            self._attention(L, qkv, cache.k[i], cache.v[i], p0, cos, sin, att, c.window(i))  # -> [M, H hd]
            L.wo(att, o)                                      # [M, H hd] -> [M, D]
            if L.bo is not None:
                o += L.bo
            # -- MLP branch
            if c.parallel_residual:                           # x + attn(ln1 x) + mlp(ln2 x)
                self._norm(x, L.ffn_norm, xn)
                o2 = s.o2[:M]
                self._mlp(L, xn, o2, M)
                o += o2
            else:                                             # x += attn; x += mlp(ln2 x)
                self._add_norm(x, o, L.ffn_norm, xn)
                self._mlp(L, xn, o, M)
            self._add_norm(x, o, next_norm, xn)               # x += branch; xn = next norm(x)

        cache.pos += M
        cache.tokens.extend(int(t) for t in ids)
        return xn                                             # [M, D], final-normed

    def prefill(self, ids) -> np.ndarray:
        """Run a prompt (in chunks of state.rows) and return the logits f32[V] of its last token."""
        ids = np.asarray(ids, dtype=np.int64)
        self.cache.check_room(len(ids))
        end = self.cache.pos + len(ids)
        for a in range(0, len(ids), self.state.rows):
            h = self.forward(ids[a:a + self.state.rows], end)
        out = self.state.logits
        self.lm_head(h[-1:], out)                             # [1, D] -> [1, V]
        return out[0]

    def decode(self, token: int) -> np.ndarray:
        """One token at position cache.pos -> logits f32[V] (a buffer reused by the next call)."""
        s = self.state
        s.ids[0] = token
        if self._fused is None:
            h = self.forward(s.ids[:1])
        else:                                                 # same network, one Numba call
            cache = self.cache
            cache.check_room(1)
            self.tok_embd.rows(s.ids[:1], s.x[:1])
            cos, sin = self._rope(cache.pos + 1)
            decode_step(cache.pos, cos, sin, *self._fused)
            cache.pos += 1
            cache.tokens.append(int(token))
            h = s.xn[:1]
        self.lm_head(h, s.logits)                             # [1, D] -> [1, V]
        return s.logits[0]

    def _fused_decode_args(self):
        """decode_step's arguments after (pos, cos, sin), or None when this model needs the
        general forward (GELU or parallel-residual MLPs, learned positions, zero-padded or
        mixed-format matrices). The per-layer arrays travel as tables of data addresses and
        shapes (a Numba typed List of arrays costs ~2 s to build in every new process, a tuple
        of them a new compile per layer count); self._keep holds the arrays they point into."""
        c, s = self.cfg, self.state
        mats = [m for L in self.layers for m in (L.wqkv, L.wo, L.w_gate_up, L.w_down)]
        if (not c.gated_mlp or c.parallel_residual or self.pos_embd is not None or None in mats
                or len({m.fmt for m in mats}) != 1 or any(m.Kp != m.K for m in mats)):
            return None
        fmt = mats[0].fmt
        if fmt in ("q8_0", "q4_0"):
            wa = [m.arrays["qs"] for m in mats]
            wd = [m.arrays["d"].view(np.uint16) for m in mats]
        else:
            wa = [m.arrays["w"].view(np.uint16) if fmt == "f16" else m.arrays["w"] for m in mats]
            wd = [np.zeros((1, 1), np.uint16)] * len(mats)
        opt = lambda a: NONE if a is None else a
        vecs = []                                             # 10 per layer, see decode_step
        for L in self.layers:
            vecs += [L.attn_norm[0], L.attn_norm[1], L.ffn_norm[0], L.ffn_norm[1], opt(L.bqkv),
                     opt(L.bo), opt(L.b_gate_up), opt(L.b_down), L.q_norm, L.k_norm]
        vecs += [self.out_norm[0], self.out_norm[1]]
        arrays = wa + wd + vecs
        if not all(a.flags.c_contiguous for a in arrays) or any(v.dtype != np.float32 for v in vecs):
            return None
        self._keep = arrays
        addr = lambda a: a.ctypes.data if a.size else 0
        mtab = np.array([[addr(w), addr(d), w.shape[0], w.shape[1], d.shape[1]] for w, d in zip(wa, wd)],
                        np.int64)                             # [4L, 5]: weights, scales, N, cols, scale cols
        vtab = np.array([[addr(v), v.shape[0]] for v in vecs], np.int64)   # [10L + 2, 2]
        K = max(m.Kp for m in mats)
        xq, xd, xs = act_scratch(K)
        windows = np.array([c.window(i) for i in range(c.n_layers)], np.int64)
        return (wa[0][:0], 2 if fmt == "bf16" else 1, mtab, vtab, windows, s.x[0], s.xn[0], s.qkv[0],
                s.att[0], s.o[0], s.ff[0], s.act[0], xq, xd, xs, self.cache.k, self.cache.v, s.scores,
                s.attn_part, c.n_heads, c.n_kv_heads, c.head_dim, c.rotary_dim, c.norm_eps, self.scale,
                np.zeros(2 * (10 * c.n_layers + 1), np.int64), s.attn_part.shape[0])

    def all_logits(self, ids) -> np.ndarray:
        """Logits f32[len(ids), V] for every position of ids, on top of the current cache."""
        ids = np.asarray(ids, dtype=np.int64)
        self.cache.check_room(len(ids))
        out = np.empty((len(ids), self.cfg.vocab_size), np.float32)
        end = self.cache.pos + len(ids)
        for a in range(0, len(ids), self.state.rows):
            h = self.forward(ids[a:a + self.state.rows], end)
            self.lm_head(h, out[a:a + len(h)])
        return out


# ---- decode in one Numba call ------------------------------------------------------------------
# `forward` above is the network; for one token of a Llama-family model (gated SiLU MLP,
# sequential residual, one weight format for all layer matrices) decode_step runs exactly the
# same kernels in the same order, but as one Numba call and one parallel region per token
# instead of ~9 Python-level calls per layer (a few microseconds of dispatch each) and 5
# parallel launches per layer (~4 us each); SmolLM2 has 30 layers.

@intrinsic
def _ptr_as(typingctx, addr, like):
    """int64 address -> CPointer(like.dtype) (for numba.carray over a table of array addresses)."""
    ptr_t = types.CPointer(like.dtype)

    def codegen(ctx, builder, sig, args):
        return builder.inttoptr(args[0], ctx.get_value_type(ptr_t))
    return ptr_t(addr, like), codegen


@njit(cache=True, nogil=True, error_model="numpy")
def _vec(vtab, k, like):
    """Vector k of the table: f32[vtab[k, 1]] at address vtab[k, 0]."""
    return numba.carray(_ptr_as(vtab[k, 0], like), vtab[k, 1])


def _quant(W, mtab, j, x, xq, xd, xs):
    """Quantize the activation x for layer matrix j (int8 per block, as its GEMV expects)."""


@overload(_quant)
def _quant_typed(W, mtab, j, x, xq, xd, xs):
    dt = W.dtype
    if dt == types.int8:
        return lambda W, mtab, j, x, xq, xd, xs: quantize_act_q8v(x, xq, xd, xs)
    if dt == types.uint8:                                   # group size G = K / (scale columns)
        return lambda W, mtab, j, x, xq, xd, xs: quantize_act_q4(x, 2 * mtab[j, 3] // mtab[j, 4], xq, xd, xs)
    return lambda W, mtab, j, x, xq, xd, xs: None           # float formats read x as it is


def _rows(W, mtab, j, kind, x, xq, xd, xs, out, g0, g1):
    """Row groups g0..g1-1 (4 rows each) of out = W_j @ x for layer matrix j of mtab; W: an
    empty array of the weights' dtype (it selects the kernel)."""


@overload(_rows)
def _rows_typed(W, mtab, j, kind, x, xq, xd, xs, out, g0, g1):
    """One specialisation per weight dtype: f32, uint16 (fp16 / bf16 bits by kind), int8 (Q8_0),
    uint8 (Q4_0)."""
    dt = W.dtype
    if dt == types.float32:
        def f32(W, mtab, j, kind, x, xq, xd, xs, out, g0, g1):
            w = numba.carray(_ptr_as(mtab[j, 0], W), (mtab[j, 2], mtab[j, 3]))
            gemv_float_groups(x, w, out, 0, g0, g1)
        return f32
    if dt == types.uint16:
        def f16(W, mtab, j, kind, x, xq, xd, xs, out, g0, g1):
            w = numba.carray(_ptr_as(mtab[j, 0], W), (mtab[j, 2], mtab[j, 3]))
            if kind == 1:
                gemv_float_groups(x, w, out, 1, g0, g1)
            else:
                gemv_float_groups(x, w, out, 2, g0, g1)
        return f16
    if dt == types.int8 or dt == types.uint8:
        kern = gemv_q8_0_groups if dt == types.int8 else gemv_q4_0_groups

        def quant(W, mtab, j, kind, x, xq, xd, xs, out, g0, g1):
            w = numba.carray(_ptr_as(mtab[j, 0], W), (mtab[j, 2], mtab[j, 3]))
            d = numba.carray(_ptr_as(mtab[j, 1], _U16), (mtab[j, 2], mtab[j, 4]))
            kern(xq, xd, xs, w, d, out, g0, g1)
        return quant
    return None


_U16 = np.zeros(0, np.uint16)     # dtype carriers
_F32 = np.zeros(0, np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def _add(y, b):
    """y += b when b is not empty (an absent bias is f32[0])."""
    for t in range(b.shape[0]):
        y[t] += b[t]


# Phases of decode_step. Every phase has a task counter ctr[2ph] (the next task to take) and a
# done counter ctr[2ph + 1]. A thread takes tasks until none is left, then waits until all are
# done. No thread ever waits for a task that nobody can take, so it is correct for any number
# of threads and any schedule (one thread alone runs every task).

@njit(cache=True, nogil=True)
def _take(ctr, ph, n):
    """The next task of phase ph (0..n-1), or -1 when all have been taken."""
    k = atomic_add(ctr, 2 * ph, 1)
    return k if k < n else -1


@njit(cache=True, nogil=True)
def _finish(ctr, ph):
    atomic_add(ctr, 2 * ph + 1, 1)


@njit(cache=True, nogil=True)
def _wait(ctr, ph, n):
    """Until the n tasks of phase ph are done (their writes are visible after this)."""
    while atomic_load(ctr, 2 * ph + 1) < n:
        spin_pause()


@njit(cache=True, nogil=True, error_model="numpy")
def _matmul_phase(ctr, ph, nt, W, mtab, j, kind, x, xq, xd, xs, out):
    """out = W_j @ x (x already quantized for j) as nt tasks of contiguous rows: each thread
    streams one block of the matrix, as the prange GEMVs do (interleaved tasks of 16 rows defeat
    the prefetchers: 7-9 ms instead of 5-5.6 ms per SmolLM2 int4 token)."""
    ng = (mtab[j, 2] + 3) // 4
    k = _take(ctr, ph, nt)
    while k >= 0:
        _rows(W, mtab, j, kind, x, xq, xd, xs, out, k * ng // nt, (k + 1) * ng // nt)
        _finish(ctr, ph)
        k = _take(ctr, ph, nt)
    _wait(ctr, ph, nt)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def decode_step(p, cos, sin, W, kind, mtab, vtab, windows, x, xn, qkv, att, o, gu, act, xq, xd, xs,
                kc, vc, sc, part, H, Hkv, hd, rot, eps, scale, ctr, nt):
    """One token at position p through all layers, as `forward` does for M = 1, in ONE parallel
    region: nt threads share each matmul (a block of rows each) and the attention splits, and meet at the end of each
    step (10 per layer) instead of starting a parallel region per kernel (~4 us each, 5 per
    layer). The kernels are the same as forward's, so the logits are bit-identical.

    x: f32[D] holds the token's embedding and ends as the residual stream; xn: f32[D] ends as
    the final-normed hidden state. mtab: int64[4L, 5] the layer matrices, 4 per layer (wqkv, wo,
    w_gate_up, w_down): address of the weights, address of the fp16 block scales (quantized
    formats), N, stored columns, scale columns; W: an empty array of the weights' dtype.
    vtab: int64[10L + 2, 2] f32 vectors (address, length), 10 per layer (attn_norm w/b, ffn_norm
    w/b, bqkv, bo, b_gate_up, b_down, q_norm, k_norm; absent ones length 0), then the final
    norm's w/b. windows: int64[L] (0 = full). kc, vc: the KV cache f32[L, Hkv, n_ctx, hd].
    ctr: int64[2 (10L + 1)] phase counters. The rest: RunState row views and scratch."""
    L = windows.shape[0]
    f = _F32
    ctr[:] = 0
    for tid in prange(nt):
        for i in range(L):
            v, ph = 10 * i, 10 * i
            # -- attention branch. S1: the attention norm (the residual add of the previous
            # layer's MLP first), quantize xn for wqkv
            if _take(ctr, ph, 1) == 0:
                if i == 0:
                    norm_row(x, _vec(vtab, 0, f), _vec(vtab, 1, f), eps, xn)
                else:
                    _add(o, _vec(vtab, v - 3, f))                       # previous b_down
                    add_norm_row(x, o, _vec(vtab, v, f), _vec(vtab, v + 1, f), eps, xn)
                _quant(W, mtab, 4 * i, xn, xq, xd, xs)
                _finish(ctr, ph)
            _wait(ctr, ph, 1)
            _matmul_phase(ctr, ph + 1, nt, W, mtab, 4 * i, kind, xn, xq, xd, xs, qkv)   # [(H+2Hkv) hd]
            # S2: bias, q/k norm, RoPE, cache write
            if _take(ctr, ph + 2, 1) == 0:
                _add(qkv, _vec(vtab, v + 4, f))
                prep_decode(qkv, kc[i], vc[i], p, cos, sin, _vec(vtab, v + 8, f), _vec(vtab, v + 9, f),
                            H, Hkv, hd, rot, eps)
                _finish(ctr, ph + 2)
            _wait(ctr, ph + 2, 1)
            start, ns, chunk = decode_splits(p, windows[i], part.shape[0])
            k = _take(ctr, ph + 3, ns * H)                              # attention splits
            while k >= 0:
                attend_task(qkv, kc[i], vc[i], p, H, Hkv, hd, scale, sc, part, start, chunk, k)
                _finish(ctr, ph + 3)
                k = _take(ctr, ph + 3, ns * H)
            _wait(ctr, ph + 3, ns * H)
            if _take(ctr, ph + 4, 1) == 0:                              # S3: merge, quantize
                merge_parts(part, ns, H, hd, att)
                _quant(W, mtab, 4 * i + 1, att, xq, xd, xs)
                _finish(ctr, ph + 4)
            _wait(ctr, ph + 4, 1)
            _matmul_phase(ctr, ph + 5, nt, W, mtab, 4 * i + 1, kind, att, xq, xd, xs, o)   # [D]
            # -- MLP branch. S4: x += attn (+bias); xn = ffn_norm(x); quantize
            if _take(ctr, ph + 6, 1) == 0:
                _add(o, _vec(vtab, v + 5, f))
                add_norm_row(x, o, _vec(vtab, v + 2, f), _vec(vtab, v + 3, f), eps, xn)
                _quant(W, mtab, 4 * i + 2, xn, xq, xd, xs)
                _finish(ctr, ph + 6)
            _wait(ctr, ph + 6, 1)
            _matmul_phase(ctr, ph + 7, nt, W, mtab, 4 * i + 2, kind, xn, xq, xd, xs, gu)  # [2F]
            if _take(ctr, ph + 8, 1) == 0:                              # S5: SwiGLU, quantize
                _add(gu, _vec(vtab, v + 6, f))
                silu_mul_row(gu, act)
                _quant(W, mtab, 4 * i + 3, act, xq, xd, xs)
                _finish(ctr, ph + 8)
            _wait(ctr, ph + 8, 1)
            _matmul_phase(ctr, ph + 9, nt, W, mtab, 4 * i + 3, kind, act, xq, xd, xs, o)   # [D]
        # final: x += mlp (+bias); xn = final norm(x)
        if _take(ctr, 10 * L, 1) == 0:
            _add(o, _vec(vtab, 10 * L - 3, f))
            add_norm_row(x, o, _vec(vtab, 10 * L, f), _vec(vtab, 10 * L + 1, f), eps, xn)
            _finish(ctr, 10 * L)
