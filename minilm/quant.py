"""Weight formats as data: one table from format name to its storage, packer and kernels.

    format   storage (W is [N, K])                                  bits/weight
    f32      w f32[N, K]                                            32
    f16      w f16[N, K]            (computed in f32)               16
    bf16     w uint16[N, K]         (raw bf16 bits, f32 compute)    16
    q8_0     qs int8[N, K], d f16[N, K/32]      ggml Q8_0           8.5
    q4_0     qs uint8[N, K/2], d f16[N, K/G]    ggml Q4_0, G=32/64/128: 4 + 16/G
    q4_1 q5_0 q5_1 iq4_nl, q2_k q3_k q4_k q5_k q6_k iq4_xs
             raw uint8[N, K/block * bytes]      ggml's own block bytes   5 ... 2.625
                                                (kernels/ggml_quants.py)

A `Linear` holds one matrix in one format and computes out = x @ W.T with the format's GEMV
(decode: one row of x) or GEMM (prefill: many rows). A K that is not a multiple of the block is
zero-padded up to one (the padded columns meet zero activations, so the product is unchanged);
`Linear.K` is the logical width, `Linear.Kp` the stored one. `Linear.rows` dequantizes rows of W
(token embedding lookup).

`FORMATS` below is the traits table every other part reads (the executor by `fid`, GGUF import
and export by `ggml_type`, the summary and the benchmark by name and `bits`). User-level quant
levels (`minilm.load(..., quant=...)`) map to per-tensor formats in `LEVELS` / `parse_level()`.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .kernels import matmul as _mm
from .kernels import qmatmul as _qm


@dataclass(frozen=True)
class Format:
    """Everything minilm knows about one weight format (ggml's type traits, in one place).

    The numpy references (`quantize` when it is numpy, `unpack`, `dot_ref`) are the readable
    spec; the kernels (`gemv`/`gemm` for a `Linear`, `row_kernel` inside the executor) must agree
    with them (tests/test_formats.py loops over this table)."""
    name: str
    fid: int                     # id in the executor's matrix table (kernels/executor.py F_*)
    tag: type                    # numpy dtype naming this format in the executor's compile-time set
    block: int                   # K is padded to a multiple of this (q4_0: of its group)
    block_bytes: int             # bytes per block of `block` weights (weights + scales)
    ggml_type: int | None        # ggml / GGUF type id (None: no ggml equivalent)
    ggml_name: str | None
    act: str                     # what the row kernel reads: "f32", or "q8_0" (int8 blocks of 32)
    arrays: tuple                # names of the stored arrays
    pack: Callable               # (w f32[N, Kp], group, qw f32[Kp] | None) -> dict of arrays;
                                 # qw: importance of each input column (an imatrix), weighted search
    unpack: Callable             # numpy dequantize: dict of arrays (some rows) -> f32[rows, Kp]
    dot_ref: Callable            # numpy spec of the kernels' arithmetic: (arrays of ONE row, x f32[Kp]) -> float
    gemv: Callable               # (x f32[Kp], *arrays, out f32[N]) for a Linear (parallel)
    gemm: Callable               # (x f32[M, Kp], *arrays, out f32[M, N])
    row_kernel: Callable         # the executor's row-group kernel (kernels/*_groups)
    # Formats whose values are an affine grid (all quantized ones but IQ4_NL / IQ4_XS), for
    # quantizers that choose the integer codes themselves (GPTQ, calibrate.gptq_linear):
    grid: Callable | None = None     # arrays -> (s, o f32[N, Kp], q int32[N, Kp], (lo, hi)):
                                     # value = s * q + o, lo <= q <= hi
    codes: Callable | None = None    # (arrays, q int[N, Kp]) -> arrays with those codes, scales kept
    # Formats the executor runs from another layout, built once per matrix at load (Linear.exec_arrays):
    repack: Callable | None = None   # stored arrays -> the executor's arrays, or None (run them as stored)
    unrepack: Callable | None = None  # (executor's arrays, N, group, rows=None) -> the stored arrays (of rows)

    def bits(self, group: int = 32) -> float:
        """Bits per weight (q4_0: 4 + 16 / group)."""
        if self.name == "q4_0":
            return 4.0 + 16.0 / group
        return 8.0 * self.block_bytes / self.block

    def stored(self, N: int, Kp: int, group: int = 32) -> list[tuple[str, str, tuple]]:
        """The arrays a matrix [N, Kp] of this format stores: (name, safetensors dtype, shape)."""
        if self.arrays == ("raw",):
            return [("raw", "U8", (N, Kp // self.block * self.block_bytes))]
        if self.name == "q8_0":
            return [("qs", "I8", (N, Kp)), ("d", "F16", (N, Kp // 32))]
        if self.name == "q4_0":
            return [("qs", "U8", (N, Kp // 2)), ("d", "F16", (N, Kp // group))]
        return [("w", {"f32": "F32", "f16": "F16", "bf16": "U16"}[self.name], (N, Kp))]

    def row_arrays(self, lin: "Linear"):
        """(weights, scales) as the executor's matrix table reads them (scales: u16 fp16 bits;
        float formats have none)."""
        if self.arrays == ("raw",):
            return lin.exec_arrays(), np.zeros((1, 1), np.uint16)
        if self.name == "q4_0":                     # qmatmul.repack_q4_0's 16-row groups
            return lin.exec_arrays()
        a = lin.arrays
        if self.act == "f32":
            w = a["w"].view(np.uint16) if self.name == "f16" else a["w"]
            return w, np.zeros((1, 1), np.uint16)
        return a["qs"], a["d"].view(np.uint16)


def _bf16_bits(w):
    """f32 -> bf16 bits, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _q4_pack(w, group, qw=None):
    qs, d = _qm.quantize_q4_0(w, group) if qw is None else quantize_q4_0_weighted(w, group, qw)
    return {"qs": qs, "d": d}


def _q8_pack(w, group, qw=None):
    qs, d = _qm.quantize_q8_0(w) if qw is None else quantize_q8_0_weighted(w, qw)
    return {"qs": qs, "d": d}


def _check_qw(w, qw):
    """Importance weights f32[K] for w f32[N, K]: finite, >= 0 (ValueError otherwise)."""
    qw = np.ascontiguousarray(qw, np.float32).reshape(-1)
    if qw.shape[0] != w.shape[1]:
        raise ValueError(f"importance weights have {qw.shape[0]} entries, the matrix has {w.shape[1]} columns")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError("importance weights must be finite and >= 0")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    return qw


def _sym_search(x, wt, lo, hi, amax_div, trials):
    """Weighted symmetric scale search over blocks x f32[nb, n] with weights wt f32[nb, n]:
    for each trial inverse scale t (amax_div + 0.1 i) / max|x|, L = clip(round(x t), lo, hi) and
    the least-squares scale d = sum(w x L) / sum(w L^2); keep the trial of least weighted error
    sum w (x - d L)^2 (= maximal (sum w x L)^2 / sum w L^2). -> (d f32[nb], L int32[nb, n])."""
    amax = np.abs(x).max(axis=1)
    safe = np.where(amax > 0, amax, np.float32(1)).astype(np.float32)
    best = np.full(x.shape[0], -1.0, np.float64)
    d = np.zeros(x.shape[0], np.float32)
    L = np.zeros(x.shape, np.int32)
    for i in range(-trials, trials + 1):
        t = ((np.float32(amax_div) + np.float32(0.1) * np.float32(i)) / safe).astype(np.float32)
        Lt = np.clip(np.rint(x * t[:, None]), lo, hi)
        slx = (wt * x * Lt).sum(axis=1, dtype=np.float64)
        sl2 = (wt * Lt * Lt).sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(sl2 > 0, slx * slx / sl2, 0.0)
            dt = np.where(sl2 > 0, slx / sl2, 0.0)
        better = score > best
        best = np.where(better, score, best)
        d = np.where(better, dt, d).astype(np.float32)
        L = np.where(better[:, None], Lt.astype(np.int32), L)
    d = np.where(amax > 0, d, np.float32(0)).astype(np.float32)
    return d, L


def _imatrix_weights(xb, qwb, sigma2):
    """ggml's importance weight per element: qw * sqrt(sigma2 + x^2)."""
    return (qwb * np.sqrt(sigma2 + xb * xb)).astype(np.float32)


def quantize_q4_0_weighted(w, group, qw):
    """Q4_0 (group 32/64/128) with importance weights qw f32[K]: ggml's imatrix path for Q4_0
    (weights qw * sqrt(sigma2 + x^2), sigma2 = mean x^2 of the row, and a weighted scale search
    over 19 trial scales; here the scale is also fitted after each trial's rounding).
    -> (qs uint8[N, K/2], d f16[N, K/G]), byte-compatible with ggml Q4_0 (nibble - 8) * d."""
    w = np.ascontiguousarray(w, np.float32)
    qw = _check_qw(w, qw)
    N, K = w.shape
    G = group
    x = w.reshape(N * (K // G), G)
    sigma2 = np.repeat((w * w).mean(axis=1), K // G)[:, None]
    wt = _imatrix_weights(x, np.broadcast_to(qw.reshape(1, K), (N, K)).reshape(-1, G), sigma2)
    # ggml's convention: the block's largest |x| maps to -8 (the one code with no +8 partner)
    mx = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    sgn = np.where(mx < 0, np.float32(1), np.float32(-1))       # flip so the extreme is negative
    d, L = _sym_search(x * sgn[:, None], wt, -8, 7, 8.0, 9)
    d = (d * sgn).astype(np.float32)
    return _q4_nibbles(L.reshape(N, K), G), d.reshape(N, K // G).astype(np.float16)


def _q4_nibbles(q, G):
    """Q4_0 codes int[N, K] in -8..7 -> qs uint8[N, K/2]: per group of G, byte l = q[l] + 8 | (q[G/2 + l] + 8) << 4."""
    N, K = q.shape
    u = (q + 8).astype(np.uint8).reshape(N, K // G, G)
    return (u[:, :, :G // 2] | (u[:, :, G // 2:] << 4)).astype(np.uint8).reshape(N, K // 2)


def _checked_codes(q, lo, hi):
    q = np.asarray(q)
    if q.min(initial=lo) < lo or q.max(initial=hi) > hi:
        raise ValueError(f"codes outside [{lo}, {hi}]")
    return q


def _q8_grid(a):
    s = np.repeat(a["d"].astype(np.float32), 32, axis=1)
    return s, np.zeros_like(s), a["qs"].astype(np.int32), (-127, 127)


def _q4_grid(a):
    qs, d = a["qs"], a["d"]
    G = 2 * qs.shape[1] // d.shape[1]
    b = qs.reshape(qs.shape[0], -1, G // 2)
    q = np.concatenate([(b & 0x0F).astype(np.int32), (b >> 4).astype(np.int32)], axis=2).reshape(qs.shape[0], -1) - 8
    s = np.repeat(d.astype(np.float32), G, axis=1)
    return s, np.zeros_like(s), q, (-8, 7)


def quantize_q8_0_weighted(w, qw):
    """Q8_0 with importance weights qw f32[K] (ggml's Q8_0 ignores an imatrix; minilm searches
    the scale as for Q4_0: 19 trial scales around max|x| / 127, least-squares refit, least
    weighted error). -> (qs int8[N, K], d f16[N, K/32]), byte-compatible with ggml Q8_0."""
    w = np.ascontiguousarray(w, np.float32)
    qw = _check_qw(w, qw)
    N, K = w.shape
    x = w.reshape(-1, 32)
    sigma2 = np.repeat((w * w).mean(axis=1), K // 32)[:, None]
    wt = _imatrix_weights(x, np.broadcast_to(qw.reshape(1, K), (N, K)).reshape(-1, 32), sigma2)
    d, L = _sym_search(x, wt, -127, 127, 127.0, 9)
    return L.astype(np.int8).reshape(N, K), d.reshape(N, K // 32).astype(np.float16)


def quantize_act_ref(x):
    """ggml's Q8_0 activation blocks, numpy: x f32[K] -> (q int32[K/32, 32], d f32[K/32]),
    d = amax / 127, q = round(x / d) (half to even, as the kernels' vector rounding)."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    d = (np.abs(b).max(1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    return np.round(b * idd[:, None]).astype(np.int32), d


def _float_dot(a, x):
    w = a["w"]
    w = (w.astype(np.uint32) << 16).view(np.float32) if w.dtype == np.uint16 else w
    return float(np.dot(np.asarray(w, np.float64).reshape(-1), np.asarray(x, np.float64)))


def _q8_dot(a, x):
    """sum over blocks b of d_w[b] * d_x[b] * sum(qs * xq) (integer sums, as the kernel)."""
    xq, xd = quantize_act_ref(x)
    qs = a["qs"].reshape(-1, 32).astype(np.int64)
    isum = (qs * xq).sum(1)                                       # exact integers
    dw = a["d"].reshape(-1).astype(np.float32)
    return float((isum * dw.astype(np.float64) * xd.astype(np.float64)).sum())


def _q4_dot(a, x):
    """Q4_0 with group G: weights (nibble - 8) * d_w[group]; activation int8 blocks of 32."""
    xq, xd = quantize_act_ref(x)
    qs = a["qs"].reshape(-1)
    d = a["d"].reshape(-1).astype(np.float64)
    K = 2 * qs.shape[0]
    G = K // d.shape[0]
    g = qs.reshape(-1, G // 2)
    q = np.concatenate([(g & 0x0F).astype(np.int64) - 8, (g >> 4).astype(np.int64) - 8], 1).reshape(-1, 32)
    isum = (q * xq).sum(1)                                        # per 32-block
    dw = np.repeat(d, G // 32)
    return float((isum * dw * xd.astype(np.float64)).sum())


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("f32", 0, np.float32, 1, 4, 0, "F32", "f32", ("w",),
           lambda w, g, qw=None: {"w": np.ascontiguousarray(w, dtype=np.float32)}, lambda a: a["w"],
           _float_dot, _mm.gemv_f32, _mm.gemm_f32, _mm.gemv_float_groups),
    Format("f16", 1, np.uint16, 1, 2, 1, "F16", "f32", ("w",),
           lambda w, g, qw=None: {"w": np.ascontiguousarray(w, dtype=np.float16)},
           lambda a: a["w"].astype(np.float32),
           lambda a, x: _float_dot({"w": a["w"].astype(np.float32)}, x),
           _qm.gemv_f16, _qm.gemm_f16, _mm.gemv_float_groups),
    Format("bf16", 2, np.int16, 1, 2, 30, "BF16", "f32", ("w",),
           lambda w, g, qw=None: {"w": _bf16_bits(w)}, lambda a: (a["w"].astype(np.uint32) << 16).view(np.float32),
           _float_dot, _qm.gemv_bf16, _qm.gemm_bf16, _mm.gemv_float_groups),
    Format("q8_0", 3, np.int8, 32, 34, 8, "Q8_0", "q8_0", ("qs", "d"),
           _q8_pack, lambda a: _qm.dequantize_q8_0_ref(a["qs"], a["d"]),
           _q8_dot, _qm.gemv_q8_0, _qm.gemm_q8_0, _qm.gemv_q8_0_groups, _q8_grid,
           lambda a, q: {"qs": _checked_codes(q, -127, 127).astype(np.int8), "d": a["d"]}),
    Format("q4_0", 4, np.uint8, 32, 18, 2, "Q4_0", "q8_0", ("qs", "d"),
           _q4_pack, lambda a: _qm.dequantize_q4_0_ref(a["qs"], a["d"]),
           _q4_dot, _qm.gemv_q4_0, _qm.gemm_q4_0, _qm.gemv_q4_0_groups, _q4_grid,
           lambda a, q: {"qs": _q4_nibbles(_checked_codes(q, -8, 7), 2 * a["qs"].shape[1] // a["d"].shape[1]),
                         "d": a["d"]},
           lambda a: _qm.repack_q4_0(a["qs"], a["d"]),                    # 16 rows interleaved per block
           lambda e, N, g, rows=None: dict(zip(("qs", "d"), _qm.unrepack_q4_0(*e, N, g, rows)))),
]}


# ggml's other block formats (kernels/ggml_quants.py), stored as the GGUF tensor's own bytes,
# raw uint8[N, (K / block) * block_bytes]. Their kernels compile on first use, per format
# (ggml_quants.compile_format): a model compiles the kernels of its own formats only.
def _gq():
    from .kernels import ggml_quants
    return ggml_quants


def _raw_format(fid, name, gname, gtype, block, nbytes, act) -> Format:
    spec = lambda: _gq().SPECS[gname]

    def unpack(a):
        raw = a["raw"]
        return spec().dequantize_ref(raw, raw.shape[1] // nbytes * block)
    affine = not gname.startswith("IQ")          # ggml_quants TypeSpec.grid / codes / limits
    return Format(name, fid, np.dtype([(name, np.uint8)]), block, nbytes, gtype, gname, act, ("raw",),
                  lambda w, g, qw=None: {"raw": spec().quantize_ref(w, qw)}, unpack,
                  lambda a, x: float(spec().dot_ref(a["raw"].reshape(-1), x)),
                  lambda x, raw, out: spec().gemv(x, raw, out),
                  lambda x, raw, out: spec().gemm(x, raw, out),
                  None,                       # the executor takes SPECS[ggml_name].exec_gemv_groups
                  (lambda a: spec().grid(a["raw"], a["raw"].shape[1] // nbytes * block) + (spec().limits,))
                  if affine else None,
                  (lambda a, q: {"raw": spec().codes(a["raw"], q)}) if affine else None,
                  lambda a: None if spec().repack is None else spec().repack(a["raw"]),   # e.g. Q4_K's row groups
                  lambda e, N, g, rows=None: {"raw": spec().unrepack(e, rows)})


for _i, _r in enumerate([("q4_1", "Q4_1", 3, 32, 20, "q8_1"), ("q5_0", "Q5_0", 6, 32, 22, "q8_0"),
                         ("q5_1", "Q5_1", 7, 32, 24, "q8_1"), ("q2_k", "Q2_K", 10, 256, 84, "q8_K"),
                         ("q3_k", "Q3_K", 11, 256, 110, "q8_K"), ("q4_k", "Q4_K", 12, 256, 144, "q8_K"),
                         ("q5_k", "Q5_K", 13, 256, 176, "q8_K"), ("q6_k", "Q6_K", 14, 256, 210, "q8_K"),
                         ("iq4_nl", "IQ4_NL", 20, 32, 18, "q8_0"), ("iq4_xs", "IQ4_XS", 23, 256, 136, "q8_K")]):
    FORMATS[_r[0]] = _raw_format(5 + _i, *_r)
RAW_FIRST_FID = 5              # formats from here on are raw ggml bytes (kernels/executor.py)

# A matrix whose K is not a multiple of a 256-block format's block takes another format, as
# llama.cpp's quantizer does (llama-quant.cpp tensor_type_fallback, commit 0c1e570: Q2_K and Q3_K
# take Q4_0 there; older llama.cpp took IQ4_NL); the model summary lists them.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "iq4_xs": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1",
            "q6_k": "q8_0"}

assert len({f.fid for f in FORMATS.values()}) == len(FORMATS) and len({f.tag for f in FORMATS.values()}) == len(FORMATS)
GGML_TO_FMT = {f.ggml_name: f.name for f in FORMATS.values() if f.ggml_name}

# quant level -> (format of layer matrices, format of token embedding / lm head, group size)
LEVELS = {
    "f32": ("f32", "f32", 32),
    "f16": ("f16", "f16", 32),
    "bf16": ("bf16", "bf16", 32),
    "int8": ("q8_0", "f16", 32),      # embedding/head f16: see README (accuracy at near-ties)
    "int4": ("q4_0", "q8_0", 32),
    "int4-g64": ("q4_0", "q8_0", 64),
    "int4-g128": ("q4_0", "q8_0", 128),
    # ggml's block formats by their own names (layer matrices; embedding / head in Q8_0). The
    # 256-block ones fall back per matrix as llama.cpp does when K is not a multiple of 256.
    # q2_k is llama.cpp's Q2_K mix (mixes.PRESETS, with q4_k_m ...), not a uniform level.
    **{n: (n, "q8_0", 32) for n in ("q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k",
                                     "iq4_nl", "iq4_xs")},
    "q8_0": ("q8_0", "q8_0", 32),     # llama.cpp's Q8_0 file: every matrix Q8_0
    "q4_0": ("q4_0", "q8_0", 32),     # int4 by ggml's name
}


# llama.cpp's mix presets (their per-tensor rules: minilm/mixes.py): name -> (base ggml type,
# llama.cpp's LLAMA_FTYPE_MOSTLY_* value, written as the GGUF's general.file_type)
PRESETS = {
    "q2_k": ("q2_k", 10), "q3_k_s": ("q3_k", 11), "q3_k_m": ("q3_k", 12), "q3_k_l": ("q3_k", 13),
    "q4_k_s": ("q4_k", 14), "q4_k_m": ("q4_k", 15), "q5_k_s": ("q5_k", 16), "q5_k_m": ("q5_k", 17),
}


def is_level(quant) -> bool:
    """A quant label minilm knows: a level of LEVELS or a llama.cpp mix preset (PRESETS)."""
    return isinstance(quant, str) and (quant in LEVELS or quant in PRESETS)


def parse_level(quant: str | None, group_size: int | None = None, embed: str | None = None):
    """quant level name (+ overrides) -> (matrix format, embedding format, group)."""
    q = quant or "f32"
    if q not in LEVELS:
        if q in PRESETS:
            raise ValueError(f"quant={quant!r}: a llama.cpp mix preset has per-tensor formats, not one "
                             "matrix format (use sources.level_target)")
        raise ValueError(f"quant={quant!r}: unknown quantization (supported: {', '.join(LEVELS)}; "
                         f"llama.cpp mixes: {', '.join(PRESETS)})")
    mat, emb, g = LEVELS[q]
    if group_size is not None:
        if mat != "q4_0":
            if group_size != 32:
                raise ValueError(f"group_size={group_size}: only int4 has a group size option (int8 blocks are 32)")
        elif group_size not in (32, 64, 128):
            raise ValueError(f"group_size={group_size!r}: must be 32, 64 or 128")
        g = group_size
    if embed is not None:
        emb = {"int8": "q8_0", "int4": "q4_0"}.get(embed, embed)
        if emb not in FORMATS:
            raise ValueError(f"embed quant {embed!r}: unknown (supported: f32, f16, bf16, int8, int4)")
    return mat, emb, g


def _release_mapped(a: np.ndarray) -> None:
    """Drop the pages of `a` from this process when it is a view of a file mapping (a GGUF, mapped
    copy-on-write): madvise MADV_DONTNEED on the whole pages inside it, so they leave the resident
    set (reads would fault the file's bytes back in). Only for bytes the caller no longer reads
    through `a`. Anything else, or a platform without madvise, is left as it is."""
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    if not isinstance(b, mmap.mmap):
        return
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    try:
        base = np.frombuffer(b, dtype=np.uint8).ctypes.data  # the mapping's first byte (page-aligned)
        lo = -(-(a.ctypes.data - base) // page) * page        # the whole pages inside `a`, as offsets
        hi = (a.ctypes.data + a.nbytes - base) // page * page
        if hi > lo:
            b.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):                             # a closed mapping, or madvise refused
        pass


class Linear:
    """W [N, K] stored in `fmt` (arrays C-contiguous, possibly memory-mapped)."""

    __slots__ = ("fmt", "N", "K", "Kp", "_arrays", "_args", "_gemv", "_gemm", "_xpad", "_gemv_pre", "_exec", "_g")

    def __init__(self, fmt: str, N: int, K: int, arrays: dict, Kp: int | None = None):
        self.fmt, self.N, self.K, self.Kp, self.arrays = fmt, N, K, Kp or K, arrays
        f = FORMATS[fmt]
        self._args = tuple(arrays.values())
        self._gemv, self._gemm = f.gemv, f.gemm
        self._gemv_pre = self._args
        self._g = self.Kp // arrays["d"].shape[1] if fmt == "q4_0" else f.block
        if fmt not in ("f32", "q4_0") and f.arrays != ("raw",):   # the Numba kernel itself, views and scratch bound once
            self._gemv, self._gemv_pre = _qm.gemv_bound(fmt, self._args)
        self._xpad = np.zeros((1, self.Kp), np.float32) if self.Kp != K else None
        self._exec = None

    def exec_arrays(self):
        """The matrix as the executor runs it, built here once per Linear: Q4_0 as (qi, di) of
        qmatmul.repack_q4_0 (16 rows interleaved per block); a raw ggml format in its repacked
        layout where it has one (ggml_quants TypeSpec.repack, e.g. Q4_K's row-group chunks), else
        the ggml bytes themselves. A repacked matrix is held once: the ggml bytes are let go (an
        in-memory copy freed, a file mapping's pages handed back) and `arrays` rebuilds them from
        the repacked copy where they are still needed (export, save, embedding rows)."""
        if self._exec is None:
            f, a = FORMATS[self.fmt], self._arrays
            e = f.repack(a) if f.repack is not None else None
            if e is None:                               # a raw ggml format run from its own bytes
                self._exec = a["raw"]
            else:
                self._exec = e
                self._arrays = self._args = self._gemv_pre = None
                for v in a.values():
                    _release_mapped(v)
        return self._exec

    @property
    def arrays(self) -> dict:
        """Name -> stored array (see FORMATS). A matrix whose in-memory arrays exec_arrays
        dropped after repacking them gives ggml's bytes rebuilt from the repacked copy (a new
        array on each access: export, save; the embedding lookup rebuilds only its rows)."""
        if self._arrays is None:
            return FORMATS[self.fmt].unrepack(self._exec, self.N, self._g)
        return self._arrays

    @arrays.setter
    def arrays(self, v: dict) -> None:
        self._arrays = v

    @classmethod
    def quantize(cls, w: np.ndarray, fmt: str = "f32", group: int = 32, name: str = "",
                 qw: np.ndarray | None = None) -> "Linear":
        """Pack an f32 [N, K] matrix (NaN/Inf rejected for quantized formats, naming the tensor).
        qw: f32[K] importance of each input column (calibration; an imatrix), or None."""
        f = FORMATS[fmt]
        N, K = w.shape
        if K % f.block and fmt in FALLBACK:          # as llama.cpp: another format for this width
            fmt = FALLBACK[fmt]
            f = FORMATS[fmt]
        blk = group if fmt == "q4_0" else f.block
        Kp = -(-K // blk) * blk
        if Kp != K:
            wp = np.zeros((N, Kp), np.float32)
            wp[:, :K] = w
            w = wp
        if qw is not None:
            qw = np.asarray(qw, np.float32).reshape(-1)
            if qw.shape[0] != K:
                raise ValueError(f"tensor {name or '?'}: importance weights have {qw.shape[0]} entries, "
                                 f"the matrix has {K} columns")
            if Kp != K:                               # padded columns: zero weights, any weight
                qw = np.concatenate([qw, np.full(Kp - K, qw.mean() if K else 1.0, np.float32)])
        try:
            arrays = f.pack(w, group, qw)
        except ValueError as e:
            raise ValueError(f"tensor {name or '?'}: {e}") from None
        return cls(fmt, N, K, arrays, Kp)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """x: f32[M, K] -> out: f32[M, N]."""
        if self._xpad is not None:                      # odd K: zero-padded copy of x
            if x.shape[0] == 1:
                self._xpad[0, :self.K] = x[0]
                x = self._xpad
            else:
                xp = np.zeros((x.shape[0], self.Kp), np.float32)
                xp[:, :self.K] = x
                x = xp
        if self.fmt == "q4_0":                          # on the repacked copy (exec_arrays)
            e = self.exec_arrays()
            if x.shape[0] == 1:
                if self._gemv_pre is None:
                    self._gemv, self._gemv_pre = _qm.gemv_bound("q4_0", e)
                self._gemv(x[0], *self._gemv_pre, out[0])
            else:
                _qm.gemm_q4_0.kernel(x, *_qm._gemm_act(x.shape[0], self.Kp), *e, out)
            return
        args = self._args if self._args is not None else tuple(self.arrays.values())
        if x.shape[0] == 1:
            self._gemv(x[0], *(self._gemv_pre if self._gemv_pre is not None else args), out[0])
        else:
            self._gemm(x, *args, out)

    def rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out: f32[len(ids), K] <- rows `ids` of W as float32 (embedding lookup)."""
        if self.fmt == "f32" and self.Kp == self.K:
            np.take(self.arrays["w"], ids, axis=0, out=out)
        elif self._arrays is None:                      # repacked only: rebuild just these rows
            f = FORMATS[self.fmt]
            out[:] = f.unpack(f.unrepack(self._exec, self.N, self._g, ids))[:, :self.K]
        else:
            sub = {k: a[ids] for k, a in self.arrays.items()}
            out[:] = FORMATS[self.fmt].unpack(sub)[:, :self.K]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (the file's bytes, also when the executor runs a repacked copy)."""
        if self._arrays is None:
            return round(self.N * self.Kp * FORMATS[self.fmt].bits(self._g) / 8)
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def group(self) -> int:
        return self._g

    @property
    def type_name(self) -> str:
        return f"q4_0/g{self.group}" if self.fmt == "q4_0" and self.group != 32 else self.fmt

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.N * self.K)
