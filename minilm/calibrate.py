"""Importance-weighted quantization from a calibration text (llama.cpp's imatrix, in minilm).

    collect_imatrix(model, text)   run the float model over the text in chunks (each from position
                                   0, as llama-imatrix does) with the plan's `stats` steps
                                   (plan.with_stats: every matmul input adds its column sums of
                                   x^2; the lm head's input is summed here from the final-normed
                                   rows) -> {matrix name: f32[K] mean of x^2 per input column};
                                   full=True: the whole input covariance f32[K, K] instead
    quantize_tensors(model, quant, imatrix)   the model's float matrices quantized to `quant` (a
                                   level or a mix preset) with those weights as every format's qw;
                                   with covariances, block by block with GPTQ's error feedback
                                   (gptq_linear), each block still the format's own quantizer
`load(..., calibration=)` collects covariances when they fit in GPTQ_MAX_BYTES (small models),
else the imatrix alone.
    save_imatrix / load_imatrix    the vectors as a file: llama.cpp's GGUF imatrix (llama-imatrix's
                                   default, what llama-quantize --imatrix reads), its legacy .dat, or
                                   minilm's safetensors (canonical names); minilm/imatrix_io.py

A tied embedding takes the lm head's statistics (the matrix is the head's), and with covariances
also its lookup role's (tied_embedding_hessians); an untied token embedding is a lookup table (no
matmul input): unweighted as llama.cpp does, or with covariances GPTQ with embedding_hessian.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

CHUNK = 512           # tokens per calibration chunk (llama-imatrix's default context)
MAX_TOKENS = 8192     # tokens read from the text at most
GPTQ_MAX_BYTES = 1 << 29   # collect full input covariances (GPTQ) when they take at most this much


class Imatrix(dict):
    """{canonical matrix name: f32[K] mean x^2 (or f32[K, K] covariance)} with the token count and
    chunk length they came from (what llama.cpp's imatrix files record), and `residual`: the
    residual stream's mean square x^2 where each norm reads it (for embedding_hessian; not saved
    to imatrix files), and `token_freq`: each token id's share of the calibration inputs (for a
    tied embedding: tied_embedding_hessians; not saved either)."""

    def __init__(self, vectors: dict, n_tokens: int, chunk: int = CHUNK, residual: dict | None = None,
                 token_freq: np.ndarray | None = None):
        super().__init__(vectors)
        self.n_tokens, self.chunk = int(n_tokens), int(chunk)
        self.residual = dict(residual or {})   # norm weight -> mean square of the residual stream it reads
        self.token_freq = token_freq           # f64[V]: each token's share of the calibration tokens


def calibration_text(text_or_path) -> str:
    """A calibration text: a path to a UTF-8 text file, or the text itself (a str that is not
    an existing file). Errors name the file."""
    if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                                 and len(text_or_path) < 4096 and Path(text_or_path).is_file()):
        p = Path(text_or_path)
        if not p.is_file():
            raise ValueError(f"calibration file {p}: not found")
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"calibration file {p}: cannot be read as UTF-8 text ({e})") from None
    if not isinstance(text_or_path, str):
        raise ValueError(f"calibration={text_or_path!r}: must be a text or a path to a text file")
    return text_or_path


def hessian_bytes(model) -> int:
    """Bytes of the K x K input covariances of every matrix of `model` (f32)."""
    from .quant import Linear
    return 4 * sum(t.K * t.K for t in {id(t): t for t in model.tensors.values()}.values() if isinstance(t, Linear))


def collect_imatrix(model, text: str, max_tokens: int = MAX_TOKENS, chunk: int = CHUNK,
                    full: bool = False) -> dict:
    """{canonical matrix name: f32[K] mean of x^2 over the calibration tokens} for every matrix
    of the float `model` (an `LM`) run over `text` (see the module docstring). full: the whole
    input covariance f32[K, K] (mean of x x^T; its diagonal is the imatrix) for GPTQ-style
    quantization (`quantize_tensors`)."""
    from .model import Transformer
    from .plan import RESIDUAL
    ids = model.tokenizer.encode(text)[:max_tokens]
    chunk = min(chunk, model.config.max_position_embeddings)
    if len(ids) < 2:
        raise ValueError(f"calibration text gives {len(ids)} token(s); it needs at least 2 (use a longer text)")
    net = Transformer(model.config, model.tensors, min(chunk, len(ids)), kv_quant="f32", stats=True, full=full)
    D = model.config.hidden_size
    head = np.zeros((D, D) if full else D, np.float64)
    for a in range(0, len(ids), chunk):
        part = np.asarray(ids[a:a + chunk], np.int64)
        net.cache.reset()
        for b in range(0, len(part), net.state.rows):
            h = net.forward(part[b:b + net.state.rows], len(part)).astype(np.float64)  # [rows, D], final-normed
            head += h.T @ h if full else (h ** 2).sum(0)                # the lm head's input
    n = float(len(ids))
    out, residual = {}, {}
    for name, v in net.stats.items():
        if name.startswith(RESIDUAL):
            residual[name[len(RESIDUAL):]] = float(np.sum(v, dtype=np.float64)) / (n * v.shape[0])
            continue
        K = model.tensors[name].K
        out[name] = (v / n).astype(np.float32).reshape((K, K) if full else (K,))
    head_name = "output" if "output" in model.tensors else "tok_embd"
    out[head_name] = (head / n).astype(np.float32)
    freq = np.bincount(np.asarray(ids, np.int64), minlength=model.config.vocab_size) / n
    return Imatrix(out, len(ids), chunk, residual, freq)


def gptq_linear(w: np.ndarray, fmt: str, group: int, H: np.ndarray, name: str = "", damp: float = 0.01):
    """Quantize w f32[N, K] to `fmt` with GPTQ's error feedback (Frantar et al. 2022) around the
    format's own quantizer (weighted by diag(H)), so the ggml block layouts and their scale
    searches stay as they are; the layer's output error on inputs of covariance H (f32[K, K]) is
    what the feedback lowers: after a column's rounding error E, W_R -= E U_GG^-1 U_GR, U the
    upper Cholesky factor of H^-1. -> `Linear`.

    Formats with an affine grid (Format.grid: every quantized format but IQ4_NL / IQ4_XS): block by
    block, the format's quantizer chooses the block's scales from the block's values as the
    feedback left them, then the codes are chosen column by column on that grid, each column's
    rounding error spread over the columns after it (inside the block and, once the block is
    done, beyond it), and the block is stored with exactly those codes. The IQ4 formats (a
    non-uniform grid): columns fixed 32 at a time, each step taking its columns from the block
    quantized anew, the block stored as the quantization of the values fixed in it."""
    from .quant import FALLBACK, FORMATS, Linear
    N, K = w.shape
    if K % FORMATS[fmt].block and fmt in FALLBACK:                   # as Linear.quantize
        fmt = FALLBACK[fmt]
    f = FORMATS[fmt]
    blk = group if fmt == "q4_0" else f.block
    Hd = np.array(H, np.float64)
    dead = np.diag(Hd) <= 0
    Hd[dead, dead] = 1.0
    Hd += damp * float(np.mean(np.diag(Hd))) * np.eye(K)
    try:
        U = np.linalg.cholesky(np.linalg.inv(Hd)).T                     # H^-1 = U^T U, U upper
    except np.linalg.LinAlgError:
        return Linear.quantize(w, fmt, group, name=name, qw=np.clip(np.diag(H), 0, None))
    W = np.array(w, np.float64)
    W[:, dead] = 0.0
    qw = np.diag(Hd).astype(np.float32)
    parts = []
    quant = lambda a, b: Linear.quantize(np.ascontiguousarray(W[:, a:b], np.float32), fmt, group,
                                         name=name, qw=qw[a:b])
    for s0 in range(0, K, blk):
        s1 = min(s0 + blk, K)
        lin = quant(s0, s1)                           # the block's scales, from its values now
        if f.grid is not None and lin.Kp == s1 - s0:
            s, o, q, (lo, hi) = f.grid(lin.arrays)
            s, o = s.astype(np.float64), o.astype(np.float64)
            q = np.array(q, np.int32)
            E = np.zeros((N, s1 - s0))
            for j in range(s1 - s0):                  # column by column on the block's grid
                c = s0 + j
                live = s[:, j] != 0
                with np.errstate(divide="ignore", invalid="ignore"):
                    qj = np.clip(np.rint((W[:, c] - o[:, j]) / np.where(live, s[:, j], 1.0)), lo, hi)
                q[:, j] = np.where(live, qj, q[:, j])
                E[:, j] = (W[:, c] - (s[:, j] * q[:, j] + o[:, j])) / U[c, c]
                W[:, c + 1:s1] -= np.outer(E[:, j], U[c, c + 1:s1])
            if s1 < K:
                W[:, s1:] -= E @ U[s0:s1, s1:]
            lin = Linear(fmt, N, s1 - s0, f.codes(lin.arrays, q))
        else:                                         # IQ4 / a padded block: 32-column steps
            step = min(32, blk)
            T = np.zeros((N, s1 - s0), np.float64)    # the block's values as fixed step by step
            for a in range(s0, s1, step):
                b = min(a + step, s1)
                lin = quant(s0, s1)                   # the whole block, as the format blocks it
                Q = f.unpack(lin.arrays)[:, a - s0:b - s0].astype(np.float64)
                T[:, a - s0:b - s0] = Q
                if b < K:
                    W[:, b:] -= (W[:, a:b] - Q) @ np.linalg.solve(U[a:b, a:b], U[a:b, b:])
            if s1 - s0 > step:                        # one block from the values fixed in it
                W[:, s0:s1] = T
                lin = quant(s0, s1)
        parts.append(lin)
    arrays = {k: np.ascontiguousarray(np.concatenate([p.arrays[k] for p in parts], axis=1)) for k in parts[0].arrays}
    return Linear(fmt, N, K, arrays, sum(p.Kp for p in parts))


# the matrices that read the residual stream, each after its norm (pre-norm architectures):
# (norm weight, matrix) per layer, and the final norm before the lm head
_RESIDUAL_READERS = (("attn_norm.w", "wqkv"), ("ffn_norm.w", "w_gate_up"), ("ffn_norm.w", "w_up"))


def _reader_hessian(model, residual: dict) -> tuple[np.ndarray, int, bool]:
    """(H f64[D, D], readers summed, by_rms): sum over the residual stream's readers (norm g,
    matrix W) of (W diag g)^T (W diag g) / (mean h^2 where the norm reads the stream), by_rms True;
    when a reader's mean square is missing, each reader scaled to unit trace instead (by_rms
    False). The lm head reads the stream through the final norm: `output`, or a tied `tok_embd`."""
    from .quant import FORMATS, Linear
    cfg, T = model.config, model.tensors
    pairs = [(f"l{i}.{n}", f"l{i}.{w}") for i in range(cfg.n_layers) for n, w in _RESIDUAL_READERS]
    pairs.append(("out_norm.w", "output" if "output" in T else "tok_embd"))
    pairs = [(g, m) for g, m in pairs if T.get(g) is not None and isinstance(T.get(m), Linear)
             and T[m].K == cfg.hidden_size]
    by_rms = bool(pairs) and all(residual.get(g, 0) > 0 for g, _ in pairs)
    H, n = np.zeros((cfg.hidden_size, cfg.hidden_size)), 0
    for norm, mat in pairs:
        lin = T[mat]
        A = FORMATS[lin.fmt].unpack(lin.arrays)[:, :lin.K].astype(np.float64) * np.asarray(T[norm], np.float64)[None, :]
        M = A.T @ A                                                    # [D, D]
        tr = float(np.trace(M))
        if tr > 0 and np.isfinite(tr):
            H += M / residual[norm] if by_rms else M / tr
            n += 1
    return H, n, by_rms


def embedding_hessian(model, residual: dict | None = None) -> np.ndarray | None:
    """f64[D, D] of unit trace: how the network sees an error e in a row of an untied token
    embedding, for GPTQ on the embedding (a lookup table: no matmul input, so no imatrix). The
    row enters the residual stream, which every layer reads through a norm (x = g * h / rms(h))
    and a matrix W; e costs ||W diag(g) e||^2 / rms(h)^2 there. Summed over the readers that is
    e^T H e. residual {norm weight: mean of h^2 where that norm reads the stream}
    (Imatrix.residual, from the calibration run): each reader weighted by 1 / that mean square,
    so the first layers, which read the embedding rows while the stream is still small, count as
    much as they do in the network (on the 256-wide proxy the first attention's 1/rms^2 is ~40x
    the later readers'). Without it (or a reader missing from it) each reader is scaled to unit
    trace instead. None when the model has no such readers (post-norm layouts)."""
    H, n, _ = _reader_hessian(model, residual or {})
    tr = float(np.trace(H))
    return H / tr if n and tr > 0 and np.isfinite(tr) else None


def tied_embedding_hessians(model, head: np.ndarray, imatrix):
    """(rows, f64[D, D]) pairs, an iterator: the Hessians of a tied token embedding's rows, which
    serve two roles. GPTQ lowers each matrix's squared output error per position on the
    calibration inputs; this matrix has two outputs. As the lm head, row n's error e costs
    e^T C e at every position (C the final-normed input's covariance, `head`). As the lookup,
    row t's error enters the residual stream (times embed_scale) at the positions whose input is
    t (a share p_t of them, Imatrix.token_freq) and costs there what its readers' outputs
    change, e^T R e (R: embed_scale^2 times the readers' Hessian of embedding_hessian before its
    trace scaling, each reader by 1 / the stream's mean square, the head itself one of them
    through the final norm). Per position row t costs
    e^T (C + p_t R) e: both roles in the same unit, no free constant. Rows with equal p_t share
    one Hessian. None (the head's C alone, as before) when the residual statistics or token
    frequencies are missing (e.g. an imatrix read from a file) or the model has no such readers."""
    freq = getattr(imatrix, "token_freq", None)
    R, n, by_rms = _reader_hessian(model, getattr(imatrix, "residual", None) or {})
    V = model.tensors["tok_embd"].N
    if freq is None or len(freq) < V or not n or not by_rms:
        return None
    C = np.asarray(head, np.float64)
    R = R * model.config.embed_scale ** 2          # the row enters the stream scaled (Gemma: sqrt(D))
    freq = np.asarray(freq[:V], np.float64)
    return ((np.flatnonzero(freq == p), C + p * R) for p in np.unique(freq))   # one at a time: D x D each


def gptq_rows(w: np.ndarray, fmt: str, group: int, groups, name: str = ""):
    """gptq_linear on row groups (rows, H) (an iterable), each with its own Hessian -> one `Linear`."""
    from .quant import Linear
    N, K = w.shape
    parts = [(rows, gptq_linear(np.ascontiguousarray(w[rows]), fmt, group, H, name)) for rows, H in groups]
    lin0 = parts[0][1]
    if sorted(np.concatenate([r for r, _ in parts]).tolist()) != list(range(N)) or \
            any(p.fmt != lin0.fmt or p.Kp != lin0.Kp for _, p in parts):
        raise ValueError(f"{name}: row groups must cover every row once, in one format")
    arrays = {k: np.empty((N,) + a.shape[1:], a.dtype) for k, a in lin0.arrays.items()}
    for rows, p in parts:
        for k in arrays:
            arrays[k][rows] = p.arrays[k]
    return Linear(lin0.fmt, N, K, arrays, lin0.Kp)


def quantize_tensors(model, quant: str | None, imatrix: dict | None, group_size: int | None = None,
                     embed_quant: str | None = None, formats: dict | None = None):
    """The float `model`'s tensors in the formats of `quant`, each matrix quantized with its
    imatrix vector as importance weights (None: unweighted) -> (tensors, sources.Target).
    formats: {canonical matrix: format} that win over the level's (e.g. the types of a llama.cpp
    file, to compare at the same bits). `loader.quantize_loaded` makes the `LM` of them."""
    from .quant import FORMATS, Linear
    from .sources import convert, level_target
    cfg = model.config
    for name, t in model.tensors.items():
        if isinstance(t, Linear) and t.fmt not in ("f32", "f16", "bf16"):
            raise ValueError(f"calibration needs a float model: tensor {name} is {t.fmt}; "
                             "calibrate the original checkpoint")
    target = level_target(cfg, quant, group_size, embed_quant)
    if formats:
        target = replace(target, formats={**(target.formats or {}), **formats})
    imatrix = imatrix or {}
    full = any(v.ndim == 2 for v in imatrix.values())
    tensors = {}
    for name, t in model.tensors.items():
        st, fmt = imatrix.get(name), target.fmt(name)
        if full and st is None and name == "tok_embd":          # untied embedding: see embedding_hessian
            st = embedding_hessian(model, getattr(imatrix, "residual", None))
        if st is not None and st.ndim == 2 and isinstance(t, Linear) and fmt not in (None, "f32", "f16", "bf16"):
            w = FORMATS[t.fmt].unpack(t.arrays)[:, :t.K].astype(np.float32)
            groups = tied_embedding_hessians(model, st, imatrix) if name == "tok_embd" and "output" not in model.tensors else None
            tensors[name] = (gptq_rows(w, fmt, target.group, groups, name) if groups     # tied: both roles
                             else gptq_linear(w, fmt, target.group, st, name))         # covariance: GPTQ
        else:
            qw = np.diagonal(st) if st is not None and st.ndim == 2 else st
            tensors[name] = convert(t, name, fmt, target.group, model.source, qw=qw)
    return tensors, target


def save_imatrix(imatrix: dict, path, n_tokens: int | None = None, cfg=None, dataset: str = "") -> Path:
    """Write the vectors (of full covariances, their diagonals: a file read back quantizes without
    GPTQ). The layout follows the suffix: .safetensors: minilm's (canonical names; metadata
    minilm.imatrix); .dat: llama.cpp's legacy binary; anything else (.gguf): llama.cpp's GGUF
    imatrix, which llama-quantize --imatrix reads. The llama.cpp layouts need the model's config
    `cfg` (tensor names) and record n_tokens (default: imatrix.n_tokens, else 1) and dataset."""
    from . import imatrix_io
    from .safetensors_io import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_tokens = n_tokens if n_tokens is not None else getattr(imatrix, "n_tokens", 1)
    if path.suffix == ".safetensors":
        meta = {"minilm.imatrix": json.dumps({"version": 1, "tokens": n_tokens})}
        save_file({k: np.ascontiguousarray(np.diagonal(v) if v.ndim == 2 else v, np.float32)
                   for k, v in imatrix.items()}, path, metadata=meta)
        return path
    if cfg is None:
        raise ValueError(f"imatrix file {path}: llama.cpp's layouts need the model's config (tensor names)")
    chunk = getattr(imatrix, "chunk", CHUNK)
    if path.suffix == ".dat":
        return imatrix_io.write_legacy(path, imatrix, cfg, n_tokens, chunk, dataset)
    return imatrix_io.write_gguf(path, imatrix, cfg, n_tokens, chunk, [dataset] if dataset else [])


def load_imatrix(path, cfg) -> dict:
    """Read an imatrix file, checked against the model `cfg`: llama.cpp's GGUF imatrix or legacy
    .dat (by content: llama-imatrix's files, llama.cpp tensor names) or minilm's safetensors file
    (`save_imatrix`). Every vector names a matrix of the model, has its input width, finite values
    >= 0; errors name the file and the entry."""
    from . import imatrix_io
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"imatrix file {path}: not found")
    if imatrix_io.is_gguf(path):
        return imatrix_io.read_gguf(path, cfg)
    if not imatrix_io.is_safetensors(path):
        return imatrix_io.read_legacy(path, cfg)
    return _load_safetensors_imatrix(path, cfg)


def _load_safetensors_imatrix(path: Path, cfg) -> dict:
    from .safetensors_io import SafetensorsFile
    from .weights import canonical_shapes, is_matrix
    try:
        f = SafetensorsFile(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a file that is no safetensors at all
        raise ModelLoadError(f"imatrix file {path}: not a minilm imatrix (safetensors) file ({e})") from None
    shapes = canonical_shapes(cfg)
    out = {}
    for name in f.names:
        if name not in shapes or not is_matrix(name):
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} names no matrix of this model "
                                 f"({cfg.model_type}, {cfg.n_layers} layers)")
        K = shapes[name][1]
        if f.dtype(name) != "F32" or tuple(f.shape(name)) != (K,):
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} is {f.dtype(name)}{list(f.shape(name))}, "
                                 f"expected F32[{K}] (the matrix's input width)")
        v = np.asarray(f.get(name), np.float32)
        if not np.isfinite(v).all() or (v < 0).any():
            raise ModelLoadError(f"imatrix file {path}: vector {name!r} has values that are not finite and >= 0")
        out[name] = v
    return out
