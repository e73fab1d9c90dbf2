"""A model plan as data: `Step`s with named operands, and their lowering to the executor's tables.

`model.build_plan(cfg)` writes the network as a list of Steps (the forward pass, top to bottom).
`lower(steps, tensors, ...)` turns the names into the integer tables `kernels/executor.py` runs:
    buffers   run-state arrays f32[rows, width], by name ("x", "xn", "qkv", ...); each width is
              the widest any step writes or reads (a matrix whose K is zero-padded to its block
              reads its input buffer up to that padded width; the padded columns stay zero)
    matrices  `Linear`s (and f32 tables such as GPT-2's positions) by tensor name
    vectors   f32 vectors by tensor name (norm weights, biases, q/k norms); an absent tensor is
              row 0, the empty vector
Nothing here knows an architecture: that is model.py's plan; nothing here runs a kernel: that
is the executor.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .kernels import executor as X
from .quant import FORMATS, Linear

OPS = {"norm": X.OP_NORM, "add_norm": X.OP_ADD_NORM, "add": X.OP_ADD, "quant": X.OP_QUANT,
       "matmul": X.OP_MATMUL, "qkv": X.OP_QKV, "attend": X.OP_ATTEND, "merge": X.OP_MERGE,
       "silu_mul": X.OP_SILU_MUL, "gelu": X.OP_GELU, "add_rows": X.OP_ADD_ROWS,
       "scale": X.OP_SCALE, "qk_norm": X.OP_QK_NORM, "gelu_mul": X.OP_GELU_MUL,
       "conv": X.OP_CONV, "stats": X.OP_STATS}


def register_step_kind(name: str, task) -> int:
    """A new kind of step, run per token by `task` (see executor.register_step_kind): the plan
    can then name it like the built-in kinds. Returns its id."""
    if name in OPS:
        raise ValueError(f"step kind {name!r} exists")
    op_id = max(max(OPS.values()) + 1, X.N_OPS)
    X.register_step_kind(op_id, task)
    OPS[name] = op_id
    return op_id


@dataclass(frozen=True)
class Step:
    """One step of the plan. Buffers (dst, src, src2) name run-state arrays; mat names a matrix,
    w and b name vectors (absent tensors are allowed: an absent bias is no bias)."""
    op: str
    dst: str | None = None
    src: str | None = None
    src2: str | None = None
    mat: str | None = None
    w: str | None = None
    b: str | None = None
    layer: int = 0
    i0: int = 0              # op-specific integer: attention window, GELU kind, SwiGLU width, RoPE table,
                             # a matmul's activation (ACTS)
    eps: float = 0.0
    scale: float = 0.0
    cap: float = 0.0         # attention score soft-cap (0: none)

    def __str__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)[1:]
                 if getattr(self, f.name) not in (None, 0, 0.0)]
        return f"{self.op}({', '.join(parts)})"


ACTS = {None: X.ACT_NONE, "gelu": X.ACT_GELU, "gelu_tanh": X.ACT_GELU_TANH}


def matmul(dst: str, src: str, mat: str, bias: str | None = None, act: str | None = None) -> list[Step]:
    """dst = act(src @ W.T (+ bias)): quantize the input once for W's format, then the product;
    act (None, "gelu", "gelu_tanh") is applied to each block of output rows by the thread that
    computed it, right after its bias."""
    return [Step("quant", src=src, mat=mat), Step("matmul", dst=dst, src=src, mat=mat, b=bias, i0=ACTS[act])]


RESIDUAL = "residual:"      # stats vectors of the residual stream (with_stats), by norm weight


def with_stats(steps: list[Step], full: dict | None = None) -> list[Step]:
    """The plan with a `stats` step before every matmul's input quantization: it adds the column
    sums of squares of the matmul's input rows into the vector "imatrix:<matrix>" (calibration,
    the statistics of llama.cpp's imatrix). full: {matrix: K} of the matrices that collect the
    whole K x K X^T X instead (a vector of K * K). After every norm of the residual stream x, its
    column sums of squares go into "imatrix:residual:<norm weight>" (the stream's mean square
    where each reader reads it: calibrate.embedding_hessian)."""
    full = full or {}
    out = []
    for st in steps:
        if st.op == "quant":
            out.append(Step("stats", src=st.src, w=f"imatrix:{st.mat}", i0=full.get(st.mat, 0)))
        out.append(st)
        if st.op in ("norm", "add_norm") and st.src == "x" and st.w:   # the residual stream a norm reads
            out.append(Step("stats", src="x", w=f"imatrix:{RESIDUAL}{st.w}"))
    return out


@dataclass
class Lowered:
    """The executor's view of a plan (see kernels/executor.py for the columns)."""
    steps: np.ndarray        # int64[S, S_COLS]
    fpar: np.ndarray         # float64[S, P_COLS]
    mtab: np.ndarray         # int64[nm, M_COLS_N]
    vtab: np.ndarray         # int64[nv, 2]
    widths: dict             # buffer name -> width
    buffer_names: list       # row order of btab
    fs: tuple                # one empty array per weight format used (its dtype tag), and one whose
                             # record dtype names the step kinds used ("op_<id>" fields)
    kmax: int                # widest quantized-activation row
    keep: list               # arrays the tables point into (kept alive)


def _matrix_row(name: str, t) -> tuple[list[int], list]:
    """mtab row and the arrays it points into, for a Linear or an f32 table."""
    addr = lambda a: a.ctypes.data if a.size else 0
    if isinstance(t, Linear):
        f = FORMATS[t.fmt]
        w, d = f.row_arrays(t)
        for a in (w, d):
            if not a.flags.c_contiguous:
                raise ValueError(f"tensor {name}: arrays must be C-contiguous")
        return [addr(w), addr(d), t.N, w.shape[1], d.shape[1], f.fid, t.Kp], [w, d]
    a = np.ascontiguousarray(t, np.float32)                   # f32 table [P, D]
    return [addr(a), 0, a.shape[0], a.shape[1], 0, FORMATS["f32"].fid, a.shape[1]], [a]


def lower(steps: list[Step], tensors: dict, base_widths: dict) -> Lowered:
    """Name -> table rows. base_widths: the logical width of every buffer (model.py knows them)."""
    mats: dict[str, int] = {}
    mrows, keep = [], []
    vecs: dict[str, int] = {}
    vrows = [[0, 0]]                                          # row 0: the empty vector
    widths = dict(base_widths)
    fmts = set()

    def mat_index(name):
        if name not in mats:
            t = tensors.get(name)
            if t is None:
                raise KeyError(f"plan needs matrix {name!r}, which the model does not have")
            row, arrs = _matrix_row(name, t)
            mats[name] = len(mrows)
            mrows.append(row)
            keep.extend(arrs)
            fmts.add(t.fmt if isinstance(t, Linear) else "f32")
        return mats[name]

    def vec_index(name):
        if name is None or tensors.get(name) is None:
            return 0
        if name not in vecs:
            a = tensors[name]
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1 and a.flags.c_contiguous):
                a = np.ascontiguousarray(a, np.float32).reshape(-1)
            keep.append(a)
            vecs[name] = len(vrows)
            vrows.append([a.ctypes.data if a.size else 0, a.shape[0]])
        return vecs[name]

    kmax = 32
    srows, frows = [], []
    for st in steps:
        j = mat_index(st.mat) if st.mat is not None else -1
        if st.op in ("matmul", "quant") and j >= 0:
            kp = mrows[j][6]
            widths[st.src] = max(widths.get(st.src, 0), kp)  # the input is read up to the padded K
            kmax = max(kmax, kp)
        srows.append([OPS[st.op], -1, -1, -1, j, vec_index(st.w), vec_index(st.b), st.layer, st.i0])
        frows.append([st.eps, st.scale, st.cap])
    names = sorted(widths)
    for row, st in zip(srows, steps):
        for col, buf in ((X.S_DST, st.dst), (X.S_SRC, st.src), (X.S_SRC2, st.src2)):
            if buf is not None:
                if buf not in widths:
                    raise KeyError(f"plan step {st} uses buffer {buf!r}, which has no width")
                row[col] = names.index(buf)
    fs = tuple(np.zeros(0, FORMATS[f].tag) for f in sorted(fmts, key=lambda f: FORMATS[f].fid))
    kinds = sorted({OPS[st.op] for st in steps}              # the executor compiles only these
                   | ({X.OP_GELU} if any(st.op == "matmul" and st.i0 for st in steps) else set()))  # a GELU epilogue
    fs += (np.zeros(0, np.dtype([(f"op_{o}", np.uint8) for o in kinds])),)
    return Lowered(np.array(srows, np.int64).reshape(-1, X.S_COLS), np.array(frows, np.float64).reshape(-1, X.P_COLS),
                   np.array(mrows, np.int64).reshape(-1, X.M_COLS_N), np.array(vrows, np.int64),
                   widths, names, fs, kmax, keep)
