"""The executor: one Numba function that runs a model plan (minilm/plan.py) for M tokens.

The plan is a table of steps, one row each (columns S_*; float parameters in a second table,
columns P_*). Operands are rows of three tables built once per model from the plan's names:
    btab  int64[nb, 3]  run-state buffers f32[rows, width]: (address, rows, width)
    mtab  int64[nm, 7]  matrices: (weights address, scales address, N, stored columns,
                        scale columns, format id, padded K)
    vtab  int64[nv, 2]  f32 vectors (norm weights, biases): (address, length); length 0 = absent
so nobody counts offsets by hand: plan.py writes each row from a named step.

`run_plan` runs the whole plan in ONE parallel region. Every step is cut into tasks (a block of
matrix rows, a token, an attention head or split; past ONE_TASK_ROWS rows a run of tokens, or of
the attention's (token, split, head) items: _grain); the threads take tasks from an atomic counter
and wait at the end of the step until all its tasks are done. Consecutive steps that have one
task each (the norms, activation quantizers and element-wise ops of one decode token, or of
the few rows of a batched decode: ONE_TASK_ROWS) run as one phase on the thread that takes it,
without a barrier in between. Decode is M = 1 (one token: every thread shares each matrix),
prefill is M > 1 (matrix rows x tokens, tokens, tokens x splits x heads). Rows carry their own
position and KV-cache slot (`pos`, `slot`), so a pass may also hold one token of each of several
sequences (the server's batched decode). The kernels are the ones in this package; decode and
prefill call the same row kernels in the same order of arithmetic, so row m of any pass has the
bits of decoding that token alone (speculative verification and batched decoding depend on it;
tests/test_decode_exact.py, tests/test_batch.py).

Correctness of the waits: a thread only waits for the tasks of the current step, and it takes
tasks until none is left before it waits, so any number of threads finishes (one alone runs
every task); all threads walk the same phase sequence (the task counts depend only on the
plan, M and the first row's position).

Weight formats: `fs` is a tuple of empty arrays whose dtypes name the formats the model uses
(quant.FORMATS[...].tag) and, in one record dtype with fields "op_<id>", the step kinds its plan
uses; the matrix dispatch is compiled only for those formats and `_task` only for those kinds, so
a model compiles (and caches) only the kernels it needs.

Compiling: `_task` (every step kernel; `_task_impl` generates its body for the plan's step kinds
and `_task_for` compiles that body itself, one cached function per set of kinds) is compiled once
per signature and called through its entry point from the parallel region `run_plan_jit` (see "the
run" below), so no wrapper level of the parallel region carries a copy of the kernels
(benchmarks/README.md, "Cold start", "First start in under 8 s"). The matrix and
activation-quantizer dispatch are cached functions of their own (`_mm_task`, `_quant_task`) so that on a first
run a helper process can compile them and the region while this one compiles the rest (`ahead_jobs`,
kernels/compile_ahead.py). Adding a step kind means: an OP_ constant, its
task count in `_ntasks`, its body in `_task_impl`, and the plan rows that use it; nothing else changes
(tests/test_plan.py adds one outside this module to show it).
"""
import functools

import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .activations import gelu_mul_row, gelu_row, gelu_tanh_row, silu_mul_row
from .attention import attend_task, decode_splits, merge_parts, prep_decode
from .matmul import gemm_float_groups, gemv_float_groups
from .norm import add_norm_row, head_rmsnorm, norm_row
from .qmatmul import (
    Q4_R,
    _quantize_act_q8v,
    gemm_q4_0_groups,
    gemm_q8_0_groups,
    gemv_q4_0_groups,
    gemv_q8_0_groups,
)
from .simd import _bf2f, _h2f, atomic_add, atomic_load, cpu_yield, sleep_us, spin_pause

# ---- step kinds --------------------------------------------------------------------------------
OP_NORM = 0        # dst = norm(src; w, b, eps)                               tasks: M
OP_ADD_NORM = 1    # src += src2; dst = norm(src; w, b, eps)                  tasks: M
OP_ADD = 2         # dst += src                                               tasks: M
OP_QUANT = 3       # quantize src rows for matrix mat (int8 blocks)           tasks: M (0 for float formats)
OP_MATMUL = 4      # dst = act(src @ W[mat].T (+ b)), act: I0 (ACT_*)         tasks: row blocks
OP_QKV = 5         # q/k norm (w, b = q/k norm weights), RoPE, k/v -> cache   tasks: M
OP_ATTEND = 6      # attention of the q heads of src over the cache -> parts  tasks: M x splits x H
OP_MERGE = 7       # merge each token's splits into dst                       tasks: M
OP_SILU_MUL = 8    # dst[:F] = silu(src[:F]) * src[F:2F], F = I0              tasks: M
OP_GELU = 9        # dst = gelu(dst) in place (I0: ACT_GELU / ACT_GELU_TANH)  tasks: M
                   #   (the plans fuse GELU into the matmul before it: ACT_GELU*)
OP_ADD_ROWS = 10   # dst[m] += table mat (f32 [P, D]) row pos[m]               tasks: M
OP_SCALE = 11      # dst *= scale (Granite multipliers, Gemma's sqrt(D))      tasks: M
OP_QK_NORM = 12    # RMSNorm of the whole q (w) and whole k (b) of src (OLMo 2) tasks: M
OP_GELU_MUL = 13   # dst[:F] = gelu_tanh(src[:F]) * src[F:2F], F = I0 (Gemma) tasks: M
OP_CONV = 14       # LFM2 gated short conv: src = [B | C | x] rows, hist = table mat  tasks: 1 (M = 1), channel blocks
OP_STATS = 15      # calibration, I0 = 0: w[i] += sum_m src[m, i]^2 (i < len(w))         tasks: 1
                   #   I0 = K: w[i K + j] += sum_m src[m, i] src[m, j] (X^T X, K x K)     tasks: row blocks of 16
N_OPS = 16

# a matmul step's I0: the activation applied to its output rows after the bias, by the task that
# wrote them (both threads, no extra phase over memory; GPT-2's / NeoX's plain GELU MLP)
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2

# step table columns
S_OP, S_DST, S_SRC, S_SRC2, S_MAT, S_W, S_B, S_LAYER, S_I0 = range(9)
S_COLS = 9
# float parameter columns
P_EPS, P_SCALE, P_CAP = range(3)
P_COLS = 3
# matrix table columns
M_W, M_D, M_N, M_COLS, M_DCOLS, M_FMT, M_KP = range(7)
M_COLS_N = 7

# format ids (quant.FORMATS[name].fid); from F_RAW on: ggml's other formats as raw bytes
F_F32, F_F16, F_BF16, F_Q8_0, F_Q4_0, F_RAW = range(6)

# Up to this many rows (decode, a batched-decode pass, a speculative verify pass), the per-row
# steps (norms, activation quantization, RoPE and cache writes, element-wise ops, LFM2's conv)
# run as one task over all rows, so consecutive ones form one phase without barriers in
# between, as in a decode step; the arithmetic per row is the same either way. A barrier costs
# most on a loaded machine (a descheduled thread).
ONE_TASK_ROWS = 16


@intrinsic
def _ptr_as(typingctx, addr, like):
    """int64 address -> CPointer(like.dtype) (numba.carray over a table of array addresses)."""
    ptr_t = types.CPointer(like.dtype)

    def codegen(ctx, builder, sig, args):
        return builder.inttoptr(args[0], ctx.get_value_type(ptr_t))
    return ptr_t(addr, like), codegen


_F32 = np.zeros(0, np.float32)   # dtype carriers for _ptr_as
_U16 = np.zeros(0, np.uint16)
_I8 = np.zeros(0, np.int8)
_U8 = np.zeros(0, np.uint8)

_J = dict(cache=True, nogil=True, error_model="numpy")
_JC = dict(_J, no_cpython_wrapper=True, no_cfunc_wrapper=True)   # called from compiled code only


@njit(**_J)
def _buf(btab, b, M):
    """Buffer b as f32[M, width] (its first M rows)."""
    return numba.carray(_ptr_as(btab[b, 0], _F32), (btab[b, 1], btab[b, 2]))[:M]


@njit(**_JC)
def _vec(vtab, k):
    """Vector k as f32[len] (len 0: absent)."""
    return numba.carray(_ptr_as(vtab[k, 0], _F32), vtab[k, 1])


# ---- the phase protocol ------------------------------------------------------------------------
@njit(**_JC)
def _take(ctr, ph, n):
    """The next task of phase ph (0..n-1), or -1 when all have been taken."""
    k = atomic_add(ctr, 2 * ph, 1)
    return k if k < n else -1


@njit(**_JC)
def _finish(ctr, ph):
    atomic_add(ctr, 2 * ph + 1, 1)


SPIN, YIELD = 2000, 4000    # pause-spins, then sched_yield, before a waiting thread sleeps


@njit(**_JC)
def _wait(ctr, ph, n):
    """Until the n tasks of phase ph are done (their writes are visible after this). Spins with
    the PAUSE hint for the usual microsecond waits; past SPIN rounds (a thread of ours was
    descheduled: the machine is shared) it yields the core, past YIELD it sleeps 50 us per
    round, so a busy machine slows a token down instead of stalling it on two spinning threads."""
    i = 0
    while atomic_load(ctr, 2 * ph + 1) < n:
        if i < SPIN:
            spin_pause()
        elif i < YIELD:
            cpu_yield()
        else:
            sleep_us(50)
        i += 1


# ---- matrices ----------------------------------------------------------------------------------
@njit(**_J)
def _q8_groups(xq, xd, xs, qs, d, out, g0, g1):
    """gemv_q8_0_groups (inline="always") compiled once as a function of its own: the matrix
    dispatch calls it from its decode and prefill branches without a copy of its code in each."""
    gemv_q8_0_groups(xq, xd, xs, qs, d, out, g0, g1)


@njit(**_J)
def _q8_groups_rows(XQ, XD, XS, qs, d, out, M, g0, g1):
    """Row groups g0..g1-1 of M tokens: tiles of 4 rows x 4 tokens that unpack each weight chunk
    once (gemm_q8_0_groups), every token's row as decode computes it; the 4 rows of a group stay
    in L1 across the tiles. The loops and the inlined kernel are one function, so LLVM keeps the
    kernel's setup out of the per-tile loop."""
    gemm_q8_0_groups(XQ, XD, XS, qs, d, out, M, g0, g1)


@njit(**_J)
def _q4_groups(xq, xd, xs, qs, d, out, g0, g1):
    """gemv_q4_0_groups as a function of its own (as _q8_groups): 16-row groups of the il16
    layout (qmatmul.repack_q4_0, any group size), rows < out.shape[0] stored."""
    gemv_q4_0_groups(xq, xd, xs, qs, d, out, g0, g1)


@njit(**_J)
def _q4_groups_rows(XQ, XD, XS, qs, d, out, M, g0, g1):
    """16-row groups g0..g1-1 of M tokens (gemm_q4_0_groups: tiles of 4 tokens), every token's
    row as decode computes it."""
    gemm_q4_0_groups(XQ, XD, XS, qs, d, out, M, g0, g1)


@njit(**_JC)
def _act_row(act, d):
    """d = act(d) in place (ACT_*: a matmul step's epilogue, or an OP_GELU step)."""
    if act == ACT_GELU_TANH:
        gelu_tanh_row(d)
    elif act == ACT_GELU:
        gelu_row(d)


@njit(**_JC)
def _group_rows(fmt):
    """Rows per row group of a matrix of format fmt, the unit its tasks are cut in: 16 for Q4_0
    (the il16 layout), 4 for the others."""
    return Q4_R if fmt == F_Q4_0 else 4


def _mm_rows(fs, mtab, j, x, XQ, XD, XS, tile, M, out, g0, g1):
    """Row groups g0..g1-1 (_group_rows(fmt) rows each: 16 for Q4_0, 4 otherwise) of out[:M] = x[:M] @ W_j.T (quantized formats read the
    activations XQ/XD/XS that OP_QUANT wrote)."""


def _named(fn, tag):
    """fn, renamed after what it computes (tag). Numba names compiled code after the function's
    qualified name plus a per-process counter, so closures generated for different formats in two
    processes can get the same symbol in the on-disk cache; a process that then loads both runs
    one in place of the other (garbage logits from the second model). A name that says what the
    closure computes makes equal symbols mean equal code."""
    fn.__qualname__ = f"{fn.__qualname__}[{tag}]"
    return fn


def _mangle_records_by_content():
    """Numba mangles a record type by a per-process serial number, not by its fields, so the
    executor compiled for one format set (fs: record tags) in one process and for another set in
    a second process can carry the same symbol names in the cache, and a third process that loads
    both links the second to the first's code. Mangle records by their full name (fields, types,
    offsets) instead; this only renames symbols."""
    from numba.core.types import npytypes
    if not getattr(npytypes.Record, "_minilm_by_content", False):
        npytypes.Record.mangling_args = property(lambda self: (type(self).__name__, (self.name,)))
        npytypes.Record._minilm_by_content = True


_mangle_records_by_content()


def _tags(fs):
    """The format tags of fs: numpy dtypes as Numba types; raw ggml formats are record dtypes
    named after the format (quant.FORMATS[...].tag)."""
    return {t.dtype for t in fs.types} if isinstance(fs, types.BaseTuple) else {fs.dtype}


def _raw_formats(fs):
    """(fid, ggml_quants.TypeSpec) of the raw ggml formats in fs, by format id."""
    from minilm.quant import FORMATS
    names = [n for t in _tags(fs) if isinstance(t, types.Record) for n in t.fields if n in FORMATS]
    if not names:
        return []
    from . import ggml_quants
    specs = sorted((FORMATS[n].fid, ggml_quants.SPECS[FORMATS[n].ggml_name]) for n in names)
    for _, spec in specs:                    # only the formats this model uses compile
        ggml_quants.compile_format(spec, executor=True)
    return specs


def _raw_chain(specs, kind):
    """A Numba function dispatching on the format id over the given raw formats:
    kind "rows": (fid, raw, XQ, XD, XS, M, out, g0, g1) -> row groups g0..g1-1 for M tokens;
    kind "act": (fid, x, xq, xd, xs) -> the format's activation quantizer on one row."""
    if not specs:
        if kind == "rows":
            return njit(lambda fid, raw, XQ, XD, XS, M, out, g0, g1: None)
        return njit(lambda fid, x, xq, xd, xs: None)
    (fid, spec), rest = specs[0], _raw_chain(specs[1:], kind)
    tag = "-".join(str(f) for f, _ in specs)        # the formats this link and the rest dispatch
    if kind == "rows":
        rows, mrows = spec.exec_gemv_groups, spec.exec_gemm_groups    # on Linear.exec_arrays's layout

        def one(f, raw, XQ, XD, XS, M, out, g0, g1):
            if f == fid:
                if M == 1:
                    rows(XQ[0], XD[0], XS[0], raw, out[0], g0, g1)
                else:                            # the format's GEMM (bit-identical to its rows)
                    mrows(XQ, XD, XS, raw, out, M, g0, g1)
            else:
                rest(f, raw, XQ, XD, XS, M, out, g0, g1)
        return njit(_named(one, tag))
    act = spec.act_quant

    def one_act(f, x, xq, xd, xs):
        if f == fid:
            act(x, xq, xd, xs)
        else:
            rest(f, x, xq, xd, xs)
    return njit(_named(one_act, tag))


@overload(_mm_rows, jit_options=dict(fastmath=True))
def _mm_rows_impl(fs, mtab, j, x, XQ, XD, XS, tile, M, out, g0, g1):
    """Compiled once per set of formats (fs: tuple of empty arrays, one dtype tag per format)."""
    tags = _tags(fs)
    raw_rows = _raw_chain(_raw_formats(fs), "rows")
    has_raw = bool(_raw_formats(fs))
    has_f32 = types.float32 in tags
    has_f16 = types.uint16 in tags
    has_bf16 = types.int16 in tags
    has_q8 = types.int8 in tags
    has_q4 = types.uint8 in tags

    def impl(fs, mtab, j, x, XQ, XD, XS, tile, M, out, g0, g1):
        fmt = mtab[j, M_FMT]
        N = mtab[j, M_N]
        if has_f32:
            if fmt == F_F32:
                w = numba.carray(_ptr_as(mtab[j, M_W], _F32), (N, mtab[j, M_COLS]))
                if M == 1:
                    gemv_float_groups(x[0], w, out[0], 0, g0, g1)
                else:                                # each token as decode computes it
                    gemm_float_groups(x, w, out, 0, M, g0, g1)
                return
        if has_f16 or has_bf16:
            if fmt == F_F16 or fmt == F_BF16:
                kind = 1 if fmt == F_F16 else 2
                w16 = numba.carray(_ptr_as(mtab[j, M_W], _U16), (N, mtab[j, M_COLS]))
                if M == 1:
                    if kind == 1:                    # KIND must be a compile-time constant
                        gemv_float_groups(x[0], w16, out[0], 1, g0, g1)
                    else:
                        gemv_float_groups(x[0], w16, out[0], 2, g0, g1)
                else:
                    K = w16.shape[1]
                    flat = tile.reshape(-1)
                    for g in range(g0, g1):          # 4 rows -> an f32 tile (exact), then each token
                        r0 = 4 * g                   # as decode computes it (gemm_float_groups)
                        nr = min(4, N - r0)
                        t = flat[:nr * K].reshape(nr, K)
                        for r in range(nr):
                            if kind == 1:
                                for k in range(K):
                                    t[r, k] = _h2f(w16[r0 + r, k])
                            else:
                                for k in range(K):
                                    t[r, k] = _bf2f(w16[r0 + r, k])
                        gemm_float_groups(x, t, out[:, r0:r0 + nr], 0, M, 0, 1)
                return
        if has_q8:
            if fmt == F_Q8_0:
                qs = numba.carray(_ptr_as(mtab[j, M_W], _I8), (N, mtab[j, M_COLS]))
                d = numba.carray(_ptr_as(mtab[j, M_D], _U16), (N, mtab[j, M_DCOLS]))
                if M == 1:                           # one stream of rows (prefetch runs ahead)
                    _q8_groups(XQ[0], XD[0], XS[0], qs, d, out[0], g0, g1)
                else:
                    _q8_groups_rows(XQ, XD, XS, qs, d, out, M, g0, g1)
                return
        if has_q4:
            if fmt == F_Q4_0:
                ng = (N + Q4_R - 1) // Q4_R          # il16 groups (qmatmul.repack_q4_0)
                q4 = numba.carray(_ptr_as(mtab[j, M_W], _U8), (ng, mtab[j, M_COLS]))
                d4 = numba.carray(_ptr_as(mtab[j, M_D], _U16), (ng, mtab[j, M_DCOLS]))
                if M == 1:
                    _q4_groups(XQ[0], XD[0], XS[0], q4, d4, out[0][:N], g0, g1)
                else:
                    _q4_groups_rows(XQ, XD, XS, q4, d4, out[:, :N], M, g0, g1)
                return
        if has_raw:
            if fmt >= F_RAW:
                raw = numba.carray(_ptr_as(mtab[j, M_W], _U8), (N, mtab[j, M_COLS]))
                raw_rows(fmt, raw, XQ, XD, XS, M, out, g0, g1)
    return impl


def _quant_row(fs, mtab, j, x, xq, xd, xs):
    """Quantize one activation row for matrix j: int8 blocks as its row kernel expects."""


@overload(_quant_row)
def _quant_row_impl(fs, mtab, j, x, xq, xd, xs):
    raw_act = _raw_chain(_raw_formats(fs), "act")

    def impl(fs, mtab, j, x, xq, xd, xs):
        fmt = mtab[j, M_FMT]
        Kp = mtab[j, M_KP]
        if fmt == F_Q8_0:
            _quantize_act_q8v(x[:Kp], xq[:Kp], xd, xs)
        elif fmt == F_Q4_0:                  # the il16 kernels read natural-order Q8 blocks
            _quantize_act_q8v(x[:Kp], xq[:Kp], xd, xs)
        elif fmt >= F_RAW:
            raw_act(fmt, x[:Kp], xq[:Kp], xd, xs)
    return impl


@njit(**_JC)
def _mm_task(fs, mtab, j, x, XQ, XD, XS, tile, M, out, g0, g1):
    """_mm_rows as a cached function of its own: the matrix kernels compile apart from the other
    step kernels, so a helper process can compile them while this one compiles the rest
    (ahead_jobs); _task links the compiled code as it linked the overload before."""
    _mm_rows(fs, mtab, j, x, XQ, XD, XS, tile, M, out, g0, g1)


@njit(**_JC)
def _quant_task(fs, mtab, j, x, xq, xd, xs):
    """_quant_row as a cached function of its own (as _mm_task)."""
    _quant_row(fs, mtab, j, x, xq, xd, xs)


@njit(**_JC)
def _is_quantized(fmt):
    return fmt >= F_Q8_0


# ---- LFM2's gated short convolution -------------------------------------------------------------
@njit(fastmath=True, **_J)
def _conv_rows(bcx, hist, w, b, Lc, pos, slot, n_ctx, M, out, c0, c1):
    """Channels c0..c1-1 of M tokens (token m: position pos[m] of sequence slot[m]):
    hist[r + p] <- B * x (the conv input of position p, kept in the cache; r = slot * n_ctx, the
    slot's rows), out[m] <- C * (bias + sum_j w[c, j] hist[r + p - Lc + 1 + j]), a causal
    depthwise convolution of length Lc (positions before 0 are zeros). bcx: f32[M, 3D] (B, C, x);
    hist: f32[n_slots * n_ctx, D]; w: f32[D * Lc]; b: f32[D] or f32[0]; out: f32[M, >= D].
    Tokens run in order (token m reads the rows earlier tokens of its sequence wrote), channels
    independently."""
    D = hist.shape[1]
    n = c1 - c0
    for m in range(M):
        p = pos[m]
        r0 = slot[m] * n_ctx
        x = bcx[m]
        h = hist[r0 + p, c0:c1]
        xb = x[c0:c1]
        xx = x[2 * D + c0:2 * D + c1]
        for c in range(n):
            h[c] = xb[c] * xx[c]
        o = out[m, c0:c1]
        if b.shape[0] > 0:
            for c in range(n):
                o[c] = b[c0 + c]
        else:
            for c in range(n):
                o[c] = 0.0
        for t in range(Lc):
            q = p - Lc + 1 + t
            if q >= 0:
                r = hist[r0 + q, c0:c1]
                for c in range(n):
                    o[c] += w[(c0 + c) * Lc + t] * r[c]
        xc = x[D + c0:D + c1]
        for c in range(n):
            o[c] *= xc[c]


# ---- new step kinds from outside this module -----------------------------------------------------
# op id (>= N_OPS) -> an njit task function f(s, k, M, pos, steps, fpar, btab, mtab, vtab) run for
# task k = 0..M-1 (one per token, at position pos[k]) of step s. The built-in kinds above do not change when one is
# added: `_task` passes unknown ids to `_ext_task`, compiled from this table.
EXTENSIONS: dict = {}


def register_step_kind(op_id: int, task) -> None:
    """Add a per-token step kind to the executor (tests/test_plan.py adds one this way). Call it
    before the model that uses it is built: a _task whose plan uses an added kind compiles anew
    and is not cached (so a cached _task without the new kind is never loaded)."""
    if op_id < N_OPS or op_id in EXTENSIONS:
        raise ValueError(f"step kind id {op_id} is taken (built-in kinds are 0..{N_OPS - 1})")
    EXTENSIONS[op_id] = task
    _task_for.cache_clear()         # a kind set with extensions compiles anew, uncached (_task_for)
    _ENTRIES.clear()                # addresses of the old compilation
    _BY_CALL.clear()


def _ext_task(op, s, k, M, pos, steps, fpar, btab, mtab, vtab):
    """Run task k of extension step s (see EXTENSIONS)."""


def _ext_chain(items):
    if not items:
        return njit(lambda op, s, k, M, pos, steps, fpar, btab, mtab, vtab: None)
    (oid, fn), rest = items[0], _ext_chain(items[1:])

    def one(op, s, k, M, pos, steps, fpar, btab, mtab, vtab):
        if op == oid:
            fn(s, k, M, pos, steps, fpar, btab, mtab, vtab)
        else:
            rest(op, s, k, M, pos, steps, fpar, btab, mtab, vtab)
    return njit(_named(one, "-".join(str(o) for o, _ in items)))


@overload(_ext_task)
def _ext_task_impl(op, s, k, M, pos, steps, fpar, btab, mtab, vtab):
    chain = _ext_chain(sorted(EXTENSIONS.items()))
    return lambda op, s, k, M, pos, steps, fpar, btab, mtab, vtab: chain(op, s, k, M, pos, steps, fpar, btab, mtab, vtab)


# ---- steps -------------------------------------------------------------------------------------
@njit(**_JC)
def _ntasks(steps, s, mtab, M, pos, nt, nparts, H):
    op = steps[s, S_OP]
    if op == OP_MATMUL:
        if M == 1:
            return nt
        j = steps[s, S_MAT]
        R = _group_rows(mtab[j, M_FMT])
        return min((mtab[j, M_N] + R - 1) // R, 4 * nt)
    if op == OP_QUANT:
        if not _is_quantized(mtab[steps[s, S_MAT], M_FMT]):
            return 0
        return 1 if M <= ONE_TASK_ROWS else M
    if op == OP_ATTEND:                      # a row's tasks past its own splits do nothing
        _, ns, _ = decode_splits(pos[M - 1], steps[s, S_I0], nparts)
        return ((M - 1) * nparts + ns) * H
    if op == OP_CONV:
        return 1 if M <= ONE_TASK_ROWS else nt
    if op == OP_STATS:
        return 1 if steps[s, S_I0] == 0 else (steps[s, S_I0] + 15) // 16
    return 1 if M <= ONE_TASK_ROWS else M      # per-row steps


# Past ONE_TASK_ROWS rows (a prompt chunk), the per-row steps and the attention are cut into about
# this many tasks per thread, each a run of rows (of (token, split, head) items for the attention)
# rather than one item, so that a step costs a few atomic operations on the counters both threads
# write and a few indirect calls instead of one per item (a 128-token SmolLM2 prefill has about
# 2500 such items a layer). What an item computes does not depend on which task runs it, so
# every row keeps decode's bits.
TASKS_PER_THREAD = 8


@njit(**_JC)
def _grain(steps, s, M, nt, n):
    """How many of step s's n items one task runs (_task): 1 up to ONE_TASK_ROWS rows and for the
    matrices (their items are already blocks of rows), LFM2's conv and the calibration sums."""
    op = steps[s, S_OP]
    if M <= ONE_TASK_ROWS or op == OP_MATMUL or op == OP_CONV or op == OP_STATS:
        return 1
    return max(1, n // (TASKS_PER_THREAD * nt))


@njit(**_JC)
def _task_rows(steps, s, M):
    """How many rows one task of a one-task step covers: its M rows for per-row steps (M <=
    ONE_TASK_ROWS), 1 for the steps whose tasks are cut otherwise (a matrix's row groups, the
    attention's splits, LFM2's channels, calibration sums over all rows), whose one task is the whole step."""
    op = steps[s, S_OP]
    return 1 if op == OP_MATMUL or op == OP_ATTEND or op == OP_CONV or op == OP_STATS else M


def _step_kinds(fs):
    """The step kinds fs names (plan.lower adds a record whose fields are "op_<id>" for the kinds
    its plan uses), or every kind when it names none."""
    for t in _tags(fs):
        if isinstance(t, types.Record) and any(n.startswith("op_") for n in t.fields):
            return {int(n[3:]) for n in t.fields if n.startswith("op_")}
    return set(range(N_OPS)) | set(EXTENSIONS)


def _task_impl(ops):
    """The body of _task for the step kinds ops: only those kinds' kernels compile (not LFM2's
    conv, GELU, calibration statistics ... for a Llama)."""
    has_matmul = OP_MATMUL in ops
    has_quant = OP_QUANT in ops
    has_norm = OP_NORM in ops
    has_add_norm = OP_ADD_NORM in ops
    has_add = OP_ADD in ops
    has_qkv = OP_QKV in ops
    has_attend = OP_ATTEND in ops
    has_merge = OP_MERGE in ops
    has_silu_mul = OP_SILU_MUL in ops
    has_gelu = OP_GELU in ops
    has_scale = OP_SCALE in ops
    has_qk_norm = OP_QK_NORM in ops
    has_gelu_mul = OP_GELU_MUL in ops
    has_conv = OP_CONV in ops
    has_add_rows = OP_ADD_ROWS in ops
    has_stats = OP_STATS in ops
    has_ext = any(o >= N_OPS for o in ops)

    def impl(fs, steps, fpar, s, kt, tid, nt, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc,
             XQ, XD, XS, tiles, sc, part, H, Hkv, hd, rot):
        # task kt runs items kt g .. kt g + g - 1 of the step's n (_grain): one item up to
        # ONE_TASK_ROWS rows and for the matrices; the attention's in reverse order (the last tokens,
        # which attend to the most rows, first, so the tasks left at the end of the step are short)
        nitems = _ntasks(steps, s, mtab, M, pos, nt, part.shape[1], H)
        gr = _grain(steps, s, M, nt, nitems)
        i0, i1 = kt, kt + 1
        if gr > 1:
            i0, i1 = kt * gr, min(nitems, kt * gr + gr)
        rev = gr > 1 and steps[s, S_OP] == OP_ATTEND
        for it in range(i0, i1):
            k = nitems - 1 - it if rev else it
            op = steps[s, S_OP]
            if has_norm:
                if op == OP_NORM:
                    norm_row(_buf(btab, steps[s, S_SRC], M)[k], _vec(vtab, steps[s, S_W]), _vec(vtab, steps[s, S_B]),
                             fpar[s, P_EPS], _buf(btab, steps[s, S_DST], M)[k])
                    continue
            if has_add_norm:
                if op == OP_ADD_NORM:
                    add_norm_row(_buf(btab, steps[s, S_SRC], M)[k], _buf(btab, steps[s, S_SRC2], M)[k],
                                 _vec(vtab, steps[s, S_W]), _vec(vtab, steps[s, S_B]), fpar[s, P_EPS],
                                 _buf(btab, steps[s, S_DST], M)[k])
                    continue
            if has_add:
                if op == OP_ADD:
                    d = _buf(btab, steps[s, S_DST], M)[k]
                    x = _buf(btab, steps[s, S_SRC], M)[k]
                    for i in range(d.shape[0]):
                        d[i] += x[i]
                    continue
            if has_qkv:
                if op == OP_QKV:
                    L = steps[s, S_LAYER]
                    t = steps[s, S_I0]                       # RoPE table (columns t*rot/2..) or -1: no RoPE
                    h2 = rot // 2
                    c0 = max(t, 0) * h2
                    sl = slot[k]
                    prep_decode(_buf(btab, steps[s, S_SRC], M)[k], kc[L, sl], vc[L, sl], pos[k], cos[:, c0:c0 + h2],
                                sin[:, c0:c0 + h2], _vec(vtab, steps[s, S_W]), _vec(vtab, steps[s, S_B]), H, Hkv, hd,
                                rot if t >= 0 else 0, fpar[s, P_EPS])
                    continue
            if has_attend:
                if op == OP_ATTEND:
                    L = steps[s, S_LAYER]
                    window = steps[s, S_I0]
                    q = _buf(btab, steps[s, S_SRC], M)
                    scale = np.float32(fpar[s, P_SCALE])
                    cap = np.float32(fpar[s, P_CAP])
                    per = part.shape[1] * H                  # tasks per token: its splits x heads, as decode
                    m = k // per
                    attend_task(q[m], kc[L, slot[m]], vc[L, slot[m]], pos[m], window, H, Hkv, hd, scale, sc[tid], part[m],
                                k - m * per, cap)
                    continue
            if has_merge:
                if op == OP_MERGE:
                    _, ns, _ = decode_splits(pos[k], steps[s, S_I0], part.shape[1])
                    merge_parts(part[k], ns, H, hd, _buf(btab, steps[s, S_DST], M)[k])
                    continue
            if has_silu_mul:
                if op == OP_SILU_MUL:
                    F = steps[s, S_I0]                       # the buffer may be wider (zero-padded K)
                    silu_mul_row(_buf(btab, steps[s, S_SRC], M)[k], _buf(btab, steps[s, S_DST], M)[k][:F])
                    continue
            if has_gelu:
                if op == OP_GELU:
                    _act_row(steps[s, S_I0], _buf(btab, steps[s, S_DST], M)[k])
                    continue
            if has_scale:
                if op == OP_SCALE:
                    d = _buf(btab, steps[s, S_DST], M)[k]
                    f = np.float32(fpar[s, P_SCALE])
                    for i in range(d.shape[0]):
                        d[i] *= f
                    continue
            if has_qk_norm:
                if op == OP_QK_NORM:
                    x = _buf(btab, steps[s, S_SRC], M)[k]
                    e = fpar[s, P_EPS]
                    head_rmsnorm(x, 0, H * hd, _vec(vtab, steps[s, S_W]), e)
                    head_rmsnorm(x, H * hd, Hkv * hd, _vec(vtab, steps[s, S_B]), e)
                    continue
            if has_gelu_mul:
                if op == OP_GELU_MUL:
                    F = steps[s, S_I0]
                    gelu_mul_row(_buf(btab, steps[s, S_SRC], M)[k], _buf(btab, steps[s, S_DST], M)[k][:F])
                    continue
            if has_conv:
                if op == OP_CONV:
                    j = steps[s, S_MAT]
                    D = mtab[j, M_COLS]
                    hist = numba.carray(_ptr_as(mtab[j, M_W], _F32), (mtab[j, M_N], D))
                    n = 1 if M <= ONE_TASK_ROWS else nt
                    _conv_rows(_buf(btab, steps[s, S_SRC], M), hist, _vec(vtab, steps[s, S_W]), _vec(vtab, steps[s, S_B]),
                               steps[s, S_I0], pos, slot, kc.shape[3], M, _buf(btab, steps[s, S_DST], M), k * D // n,
                               (k + 1) * D // n)
                    continue
            if has_add_rows:
                if op == OP_ADD_ROWS:
                    j = steps[s, S_MAT]
                    t = numba.carray(_ptr_as(mtab[j, M_W], _F32), (mtab[j, M_N], mtab[j, M_COLS]))
                    d = _buf(btab, steps[s, S_DST], M)[k]
                    r = t[pos[k]]
                    for i in range(d.shape[0]):
                        d[i] += r[i]
                    continue
            if has_stats:
                if op == OP_STATS:
                    x = _buf(btab, steps[s, S_SRC], M)
                    v = _vec(vtab, steps[s, S_W])
                    K = steps[s, S_I0]
                    if K == 0:                               # one task: the vector is shared by all rows
                        for i in range(v.shape[0]):
                            acc = 0.0                        # float64 over the rows
                            for m in range(M):
                                acc += x[m, i] * x[m, i]
                            v[i] += acc
                    else:                                    # rows 16k..16k+15 of X^T X (disjoint per task)
                        for i in range(16 * k, min(16 * k + 16, K)):
                            for j in range(K):
                                acc = 0.0
                                for m in range(M):
                                    acc += x[m, i] * x[m, j]
                                v[i * K + j] += acc
                    continue
            # The matrix kinds come last: Numba types (and compiles) the callees in this order, and on a
            # first run a helper process compiles _mm_task and _quant_task meanwhile (ahead_jobs).
            if has_matmul:
                if op == OP_MATMUL:
                    j = steps[s, S_MAT]
                    R = _group_rows(mtab[j, M_FMT])
                    ng = (mtab[j, M_N] + R - 1) // R
                    n = nt if M == 1 else min(ng, 4 * nt)
                    g0 = k * ng // n
                    g1 = (k + 1) * ng // n
                    out = _buf(btab, steps[s, S_DST], M)
                    _mm_task(fs, mtab, j, _buf(btab, steps[s, S_SRC], M), XQ, XD, XS, tiles[tid], M, out, g0, g1)
                    b = _vec(vtab, steps[s, S_B])
                    act = steps[s, S_I0]
                    if b.shape[0] > 0 or act != ACT_NONE:    # bias, activation on this task's rows
                        r0, r1 = R * g0, min(R * g1, mtab[j, M_N])
                        for m in range(M):
                            o = out[m]
                            if b.shape[0] > 0:
                                for r in range(r0, r1):
                                    o[r] += b[r]
                            if has_gelu:
                                _act_row(act, o[r0:r1])
                    continue
            if has_quant:
                if op == OP_QUANT:
                    x = _buf(btab, steps[s, S_SRC], M)
                    _quant_task(fs, mtab, steps[s, S_MAT], x[k], XQ[k], XD[k], XS[k])
                    continue
            if has_ext:
                _ext_task(op, s, k, M, pos, steps, fpar, btab, mtab, vtab)
    return impl


@functools.lru_cache(maxsize=None)
def _task_for(ops: frozenset):
    """_task for the step kinds ops: `_task_impl(ops)` compiled as a cached function of its own,
    one per set of kinds (its closure's flags are part of Numba's cache key, its name says which
    kinds). Not a wrapper calling a per-fs overload: Numba would link the overload's code into the
    wrapper's module and LLVM would optimise it and emit its machine code twice (~1 s of a first
    start). Kinds added from outside (EXTENSIONS) are not in the cache key, so a _task that
    runs one is not cached."""
    cache = not any(o >= N_OPS for o in ops)
    tag = "ops" + "-".join(str(o) for o in sorted(ops))
    return njit(**dict(_JC, cache=cache))(_named(_task_impl(ops), tag))


def _task(fs_type):
    """The _task dispatcher for a format set's Numba type (task k of step s, run by thread tid:
    _task_impl's arguments)."""
    return _task_for(frozenset(_step_kinds(fs_type)))


# ---- the run: one parallel region calling the compiled _task through its address -------------
# The parallel region (a parfor: its gufunc and two wrappers around it, each one LLVM module) does
# not link _task's code: Numba would otherwise link every step kernel into each of those modules
# and LLVM would optimise and generate machine code for all of it four more times (about 60 % of a
# cold start; benchmarks/README.md, "Cold start"). _task is compiled once per signature (its own
# on-disk cache entry) and called through its address, an indirect call per task.

def _sig_key(argtypes) -> int:
    """A 64-bit key of a _task signature (tuple of Numba types), the same in every process."""
    import hashlib
    h = hashlib.blake2b(repr(tuple(str(t) for t in argtypes)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


@intrinsic
def _task_key(typingctx, args):
    """The _sig_key of the types of the tuple args (a compile-time constant)."""
    key = _sig_key(args.types)

    def codegen(ctx, builder, sig, llargs):
        return ir.Constant(ir.IntType(64), key)
    return types.int64(args), codegen


@intrinsic
def _call_task(typingctx, addr, key, args):
    """_task(*args) through addr, the entry point of _task compiled for exactly the types of args
    (run_plan_jit checks `key` against them before its parallel region; a mismatch here traps)."""
    argtypes = list(args.types)
    want = _sig_key(argtypes)

    def codegen(ctx, builder, sig, llargs):
        bad = builder.icmp_signed("!=", llargs[1], ir.Constant(ir.IntType(64), want))
        with cgutils.if_unlikely(builder, bad):
            builder.call(builder.module.declare_intrinsic("llvm.trap", fnty=ir.FunctionType(ir.VoidType(), [])), [])
        fnty = ctx.call_conv.get_function_type(types.none, argtypes)
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        vals = [builder.extract_value(llargs[2], i) for i in range(len(argtypes))]
        status, _ = ctx.call_conv.call_function(builder, fn, types.none, argtypes, vals)
        with cgutils.if_unlikely(builder, status.is_error):
            ctx.call_conv.return_status_propagate(builder, status)
        return ctx.get_dummy_value()
    return types.none(addr, key, args), codegen


@njit(parallel=True, **_J)
def run_plan_jit(task, key, fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles,
                 sc, part, H, Hkv, hd, rot, ctr):
    """run_plan's parallel region; task: the address of _task compiled for the types of these
    arguments (_task_entry), key: that signature's _sig_key. Returns 1 without running anything
    when key is not the key of this call's task signature, else 0."""
    S = steps.shape[0]
    nt = tiles.shape[0]
    nparts = part.shape[1]
    M = np.int64(M)
    H, Hkv, hd, rot = np.int64(H), np.int64(Hkv), np.int64(hd), np.int64(rot)
    z = np.int64(0)
    if key != _task_key((fs, steps, fpar, z, z, z, z, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD,
                         XS, tiles, sc, part, H, Hkv, hd, rot)):
        return 1
    ctr[:] = 0
    for t in prange(nt):
        tid = np.int64(t)
        ph = np.int64(0)
        s = np.int64(0)
        while s < S:
            n = _ntasks(steps, s, mtab, M, pos, nt, nparts, H)
            if n == 0:
                s += 1
                continue
            if n == 1:                       # a run of one-task steps: one phase, one thread
                e = s + 1
                while e < S and _ntasks(steps, e, mtab, M, pos, nt, nparts, H) <= 1:
                    e += 1
                if _take(ctr, ph, np.int64(1)) == 0:
                    for s2 in range(s, e):
                        if _ntasks(steps, s2, mtab, M, pos, nt, nparts, H) == 1:
                            for k in range(_task_rows(steps, s2, M)):
                                _call_task(task, key, (fs, steps, fpar, np.int64(s2), np.int64(k), tid, nt, btab,
                                                       mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles,
                                                       sc, part, H, Hkv, hd, rot))
                    _finish(ctr, ph)
                _wait(ctr, ph, np.int64(1))
                s = e
            else:
                g = _grain(steps, s, M, nt, n)
                n = (n + g - 1) // g         # tasks of g items each (_task)
                k = _take(ctr, ph, n)
                while k >= 0:
                    _call_task(task, key, (fs, steps, fpar, s, np.int64(k), tid, nt, btab, mtab, vtab, M, pos, slot,
                                           cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part, H, Hkv, hd, rot))
                    _finish(ctr, ph)
                    k = _take(ctr, ph, n)
                _wait(ctr, ph, n)
                s += 1
            ph += 1
    return 0


_ENTRIES: dict = {}   # _task signature -> (address, key). A lookup cache whose entries never change
_BY_CALL: dict = {}   # (id(fs), kc dtype, vc dtype) -> the same entries (no typeof per call)
# (once made; register_step_kind empties both): threads that race on a miss compute the same entry.


def _task_sig(fs, steps, fpar, btab, mtab, vtab, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part):
    """_task's signature for run_plan's arguments (as run_plan_jit passes them on)."""
    ty, i64 = numba.typeof, types.int64
    return (ty(fs), ty(steps), ty(fpar), i64, i64, i64, i64, ty(btab), ty(mtab), ty(vtab), i64, ty(pos), ty(slot),
            ty(cos), ty(sin), ty(kc), ty(vc), ty(XQ), ty(XD), ty(XS), ty(tiles), ty(sc), ty(part), i64, i64, i64, i64)


def _task_entry(fs, steps, fpar, btab, mtab, vtab, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part):
    """(address, key) of _task compiled (or loaded from the on-disk cache) for these arguments."""
    sig = _task_sig(fs, steps, fpar, btab, mtab, vtab, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part)
    e = _ENTRIES.get(sig)
    if e is None:
        task = _task(sig[0])
        task.compile(sig)
        cres = task.overloads[sig]
        e = _ENTRIES[sig] = (cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name), _sig_key(sig))
    return e


def _compiled(disp, sig) -> bool:
    """Whether dispatcher disp has sig (a tuple of Numba types) compiled in this process or in
    its on-disk cache (Numba's cache index; False when that cannot be read)."""
    if tuple(sig) in disp.overloads:
        return True
    try:
        c = disp._cache
        return bool(c._enabled) and c._index_key(tuple(sig), disp.targetctx.codegen()) in c._cache_file._load_index()
    except Exception:                   # another Numba's cache internals: say "not known to be cached"
        return False


def ahead_jobs(fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part,
               H, Hkv, hd, rot, ctr) -> list:
    """What a helper process can compile for run_plan on these arguments while this process
    compiles _task (kernels/compile_ahead.py): [(name, dispatcher, signature)], in the order this
    process needs them: the matrix kernels and activation quantizers (_task's last callees), then
    the parallel region. The signatures are the types _task_impl calls them with
    (tests/test_compile_ahead.py checks that they are)."""
    ty, i64 = numba.typeof, types.int64
    f32_2d = types.Array(types.float32, 2, "C")          # _buf(...): a C-contiguous f32 carray
    row = lambda t: t.copy(ndim=t.ndim - 1)              # a[k] of a C-contiguous array a
    quant = (ty(fs), ty(mtab), i64, row(f32_2d), row(ty(XQ)), row(ty(XD)), row(ty(XS)))
    mm = (ty(fs), ty(mtab), i64, f32_2d, ty(XQ), ty(XD), ty(XS), row(ty(tiles)), i64, f32_2d, i64, i64)
    region = tuple(ty(a) for a in (0, 0, fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD,
                                   XS, tiles, sc, part, H, Hkv, hd, rot, ctr))
    return [("matmul", _mm_task, mm), ("quant", _quant_task, quant), ("region", run_plan_jit, region)]


def never_ran() -> bool:
    """Whether no model has run on this Numba on-disk cache (its index of the parallel region is
    absent): a first start, known before a model's argument types are. False when the cache is
    off or unreadable."""
    import os
    try:
        c = run_plan_jit._cache
        return bool(c._enabled) and not os.path.exists(c._cache_file._index_path)
    except Exception:                   # another Numba's cache internals: not known
        return False


def compiled(fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part,
             H, Hkv, hd, rot, ctr) -> bool:
    """Whether run_plan on these arguments finds the executor compiled (in this process or in
    Numba's on-disk cache); False: its first call compiles it (tens of seconds on a small CPU)."""
    tsig = _task_sig(fs, steps, fpar, btab, mtab, vtab, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part)
    args = (0, 0, fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part,
            H, Hkv, hd, rot, ctr)
    return _compiled(_task(tsig[0]), tsig) and _compiled(run_plan_jit, tuple(numba.typeof(a) for a in args))


def run_plan(fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part,
             H, Hkv, hd, rot, ctr):
    """Run the plan for M token rows (see the module docstring): row m is position pos[m] of the
    sequence in KV-cache slot slot[m] (int64[M] each), so one pass holds consecutive tokens of one
    sequence (prefill), one token of each of several sequences (batched decode), or a mix; a
    sequence's rows come in position order. Every row's result is the same whichever rows share
    its pass (attention: decode's splits and merge per row; matrices: decode's row kernels).

    kc, vc: the KV cache [L, n_slots, Hkv, n_ctx, W] (rows in its storage type: kvrows.py; LFM2's
    conv history: a matrix of n_slots * n_ctx rows); cos, sin: RoPE tables f32[n_pos, R * rot/2]
    (R tables side by side: a qkv step's I0 picks one, -1 none);
    XQ int8[R, Kmax], XD, XS f32[R, Kmax/32]: the quantized activations of the current matmul;
    tiles f32[T, 4, Kmax]: per-thread dequantized rows (16-bit formats, M > 1);
    sc f32[>= T, n_ctx]: attention scores (a row per thread); part f32[>= M, S, H, hd + 2]: each
    token's attention splits (decode_splits: the same for a token in any pass);
    ctr int64[>= 2 * steps]: phase counters. T = the number of threads the state was sized for.
    H, Hkv, hd, rot and M: integers.
    """
    args = (fs, steps, fpar, btab, mtab, vtab, M, pos, slot, cos, sin, kc, vc, XQ, XD, XS, tiles, sc, part,
            H, Hkv, hd, rot, ctr)
    fast = (id(fs), getattr(kc, "dtype", None), getattr(vc, "dtype", None))
    e = _BY_CALL.get(fast)
    if e is not None and run_plan_jit(e[0], e[1], *args) == 0:
        return
    e = _BY_CALL[fast] = _task_entry(fs, steps, fpar, btab, mtab, vtab, pos, slot, cos, sin, kc, vc, XQ, XD, XS,
                                     tiles, sc, part)
    if run_plan_jit(e[0], e[1], *args) != 0:
        raise RuntimeError("executor: the compiled task does not match run_plan's argument types (a bug)")
