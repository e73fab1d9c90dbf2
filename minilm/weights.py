"""Checkpoint tensors -> one canonical set of named arrays, whatever the architecture called them.

Canonical names (shapes with D hidden, F ffn, V vocab, H/Hkv heads, hd head dim):
    tok_embd            [V, D]
    pos_embd            [P, D]           GPT-2 only
    out_norm.w/.b       [D]
    output              [V, D]           absent when tied to tok_embd
    l{i}.attn_norm.w/.b [D]
    l{i}.wqkv           [(H + 2*Hkv)*hd, D]   q, k, v rows fused (one GEMV instead of three)
    l{i}.bqkv           [(H + 2*Hkv)*hd]
    l{i}.q_norm/k_norm  [hd]             Qwen3 only
    l{i}.wo, l{i}.bo    [D, H*hd], [D]
    l{i}.ffn_norm.w/.b  [D]
    l{i}.w_gate_up      [2F, D]          gated MLP: gate rows then up rows
    l{i}.w_up, b_up     [F, D], [F]      plain MLP
    l{i}.w_down, b_down [D, F], [D]
GPT-2's Conv1D weights are transposed here and NeoX's per-head fused qkv is reordered here;
after this module nothing knows which checkpoint format the weights came from.
`iter_canonical` yields one tensor at a time, so a quantizer can stream a whole checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import Config
from .errors import ModelLoadError
from .safetensors_io import SafetensorsFile, check_finite, to_f32


def shard_path(folder: Path, name, index: Path) -> Path:
    """A shard file named by the index, which must resolve inside `folder` (no absolute paths,
    no '..', no symlink that leads out)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelLoadError(f"{index}: weight_map values must be non-empty file names, got {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ModelLoadError(f"{index}: shard {name!r} is outside the model folder "
                             "(absolute paths and '..' are refused)")
    full = folder / p
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":          # hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    try:
        real = full.resolve()
    except (OSError, RuntimeError) as e:          # symlink loops
        raise ModelLoadError(f"{index}: shard {name!r} cannot be resolved ({e})") from None
    if not any(real == r or r in real.parents for r in roots):
        raise ModelLoadError(f"{index}: shard {name!r} resolves to {real}, outside the model folder {root}")
    return full


class CheckpointReader:
    """All safetensors shards of a folder behind one `get(name)` that returns f32 arrays.

    check_weights: float tensors are checked for NaN/Inf as they are read (one pass over the
    mapped data; NonFiniteWeightsError names the file and tensor)."""

    def __init__(self, folder: Path, check_weights: bool = True):
        self.folder = folder
        self.check_weights = check_weights
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                doc = json.loads(index.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as e:
                raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
            wm = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise ModelLoadError(f"{index}: not a valid safetensors index (needs a non-empty "
                                     "\"weight_map\" object of tensor name -> shard file)")
            for k, v in wm.items():
                if not isinstance(v, str):
                    raise ModelLoadError(f"{index}: weight_map[{k!r}] = {v!r}: must be a file name (string)")
            shard_names = sorted(set(wm.values()))
            paths = [shard_path(folder, s, index) for s in shard_names]
        else:
            paths = sorted(p for p in folder.glob("*.safetensors"))
            if not paths:
                raise ModelLoadError(f"{folder}: no *.safetensors weights found")
        self.files = [SafetensorsFile(p) for p in paths]
        self.where = {}
        for f in self.files:
            for n in f.names:
                if n in self.where:
                    raise ModelLoadError(f"{folder}: tensor {n!r} is stored twice "
                                         f"({self.where[n].path.name} and {f.path.name})")
                self.where[n] = f

    def has(self, name: str) -> bool:
        return name in self.where

    def raw(self, name: str):
        f = self.where.get(name)
        if f is None:
            raise ModelLoadError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return f

    def check_shape(self, name: str, shape: tuple) -> None:
        f = self.raw(name)
        if tuple(f.shape(name)) != tuple(shape):
            raise ModelLoadError(f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}, "
                                 f"expected {list(shape)} from config.json")
        dt = f.dtype(name)
        if dt not in ("F32", "F16", "BF16", "F64"):
            raise ModelLoadError(f"{f.path}: tensor {name!r} has dtype {dt}, expected a float type")

    def get(self, name: str, shape: tuple) -> np.ndarray:
        """Tensor `name` as float32 (a zero-copy memmap view when it is stored as F32)."""
        self.check_shape(name, shape)
        f = self.raw(name)
        dt = f.dtype(name)
        a = to_f32(f.get(name), dt)
        if self.check_weights:
            check_finite(a, f"{f.path}: tensor {name!r}")
        return a


class _ShapeOnly:
    """A CheckpointReader stand-in for `check_checkpoint`: `get` checks name, dtype and shape and
    returns an empty array (0 rows) instead of the data: nothing is read or allocated."""

    def __init__(self, reader: CheckpointReader):
        self.r = reader

    def has(self, name):
        return self.r.has(name)

    def get(self, name, shape):
        self.r.check_shape(name, shape)
        return np.empty((0,) + tuple(shape[1:]), np.float32)


def check_checkpoint(reader: CheckpointReader, cfg: Config) -> None:
    """Every tensor the config implies is present with its shape and a float dtype, before any
    weight is read or converted: a config claiming more layers or a larger vocabulary than the
    files hold fails here, naming the first missing or mis-shaped tensor."""
    for _, get in iter_canonical(_ShapeOnly(reader), cfg):
        try:
            get()
        except ModelLoadError:
            raise
        except ValueError:      # reordering an empty stand-in array: the shapes were checked above
            pass


def iter_canonical(reader: CheckpointReader, cfg: Config) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Yield (canonical name, loader) pairs; calling the loader returns the f32 array."""
    fam = {"llama": _llama, "gpt2": _gpt2, "neox": _neox}[cfg.family]
    yield from fam(reader, cfg)


def _cat(*arrs):
    return np.ascontiguousarray(np.concatenate(arrs, axis=0), dtype=np.float32)


def _llama(r: CheckpointReader, c: Config):
    D, F, V, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.q_dim, c.kv_dim
    yield "tok_embd", lambda: r.get("model.embed_tokens.weight", (V, D))
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        yield f"l{i}.attn_norm.w", lambda p=p: r.get(p + "input_layernorm.weight", (D,))
        yield f"l{i}.wqkv", lambda p=p: _cat(r.get(p + "self_attn.q_proj.weight", (q, D)),
                                             r.get(p + "self_attn.k_proj.weight", (kv, D)),
                                             r.get(p + "self_attn.v_proj.weight", (kv, D)))
        if c.qkv_bias:
            yield f"l{i}.bqkv", lambda p=p: _cat(r.get(p + "self_attn.q_proj.bias", (q,)),
                                                 r.get(p + "self_attn.k_proj.bias", (kv,)),
                                                 r.get(p + "self_attn.v_proj.bias", (kv,)))
        if c.qk_norm:
            yield f"l{i}.q_norm", lambda p=p: r.get(p + "self_attn.q_norm.weight", (hd,))
            yield f"l{i}.k_norm", lambda p=p: r.get(p + "self_attn.k_norm.weight", (hd,))
        yield f"l{i}.wo", lambda p=p: r.get(p + "self_attn.o_proj.weight", (D, q))
        if c.o_bias:
            yield f"l{i}.bo", lambda p=p: r.get(p + "self_attn.o_proj.bias", (D,))
        yield f"l{i}.ffn_norm.w", lambda p=p: r.get(p + "post_attention_layernorm.weight", (D,))
        yield f"l{i}.w_gate_up", lambda p=p: _cat(r.get(p + "mlp.gate_proj.weight", (F, D)),
                                                  r.get(p + "mlp.up_proj.weight", (F, D)))
        yield f"l{i}.w_down", lambda p=p: r.get(p + "mlp.down_proj.weight", (D, F))
        if c.mlp_bias:
            yield f"l{i}.b_gate_up", lambda p=p: _cat(r.get(p + "mlp.gate_proj.bias", (F,)),
                                                      r.get(p + "mlp.up_proj.bias", (F,)))
            yield f"l{i}.b_down", lambda p=p: r.get(p + "mlp.down_proj.bias", (D,))
    yield "out_norm.w", lambda: r.get("model.norm.weight", (D,))
    if not c.tie_word_embeddings:
        yield "output", lambda: r.get("lm_head.weight", (V, D))


def _gpt2(r: CheckpointReader, c: Config):
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    pre = "transformer." if r.has("transformer.wte.weight") else ""
    T = lambda a: np.ascontiguousarray(a.T, dtype=np.float32)  # Conv1D stores [in, out]
    yield "tok_embd", lambda: r.get(pre + "wte.weight", (V, D))
    yield "pos_embd", lambda: r.get(pre + "wpe.weight", (c.max_position_embeddings, D))
    for i in range(c.n_layers):
        p = f"{pre}h.{i}."
        yield f"l{i}.attn_norm.w", lambda p=p: r.get(p + "ln_1.weight", (D,))
        yield f"l{i}.attn_norm.b", lambda p=p: r.get(p + "ln_1.bias", (D,))
        yield f"l{i}.wqkv", lambda p=p: T(r.get(p + "attn.c_attn.weight", (D, 3 * D)))
        yield f"l{i}.bqkv", lambda p=p: r.get(p + "attn.c_attn.bias", (3 * D,))
        yield f"l{i}.wo", lambda p=p: T(r.get(p + "attn.c_proj.weight", (D, D)))
        yield f"l{i}.bo", lambda p=p: r.get(p + "attn.c_proj.bias", (D,))
        yield f"l{i}.ffn_norm.w", lambda p=p: r.get(p + "ln_2.weight", (D,))
        yield f"l{i}.ffn_norm.b", lambda p=p: r.get(p + "ln_2.bias", (D,))
        yield f"l{i}.w_up", lambda p=p: T(r.get(p + "mlp.c_fc.weight", (D, F)))
        yield f"l{i}.b_up", lambda p=p: r.get(p + "mlp.c_fc.bias", (F,))
        yield f"l{i}.w_down", lambda p=p: T(r.get(p + "mlp.c_proj.weight", (F, D)))
        yield f"l{i}.b_down", lambda p=p: r.get(p + "mlp.c_proj.bias", (D,))
    yield "out_norm.w", lambda: r.get(pre + "ln_f.weight", (D,))
    yield "out_norm.b", lambda: r.get(pre + "ln_f.bias", (D,))
    if not c.tie_word_embeddings:
        yield "output", lambda: r.get("lm_head.weight", (V, D))


def _neox(r: CheckpointReader, c: Config):
    D, F, V, H, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.n_heads, c.head_dim

    def qkv_w(p):
        # NeoX fuses per head: rows are [H, 3 (q,k,v), hd]; reorder to all q, all k, all v.
        w = r.get(p + "attention.query_key_value.weight", (3 * D, D))
        return np.ascontiguousarray(w.reshape(H, 3, hd, D).transpose(1, 0, 2, 3).reshape(3 * D, D))

    def qkv_b(p):
        b = r.get(p + "attention.query_key_value.bias", (3 * D,))
        return np.ascontiguousarray(b.reshape(H, 3, hd).transpose(1, 0, 2).reshape(3 * D))

    yield "tok_embd", lambda: r.get("gpt_neox.embed_in.weight", (V, D))
    for i in range(c.n_layers):
        p = f"gpt_neox.layers.{i}."
        yield f"l{i}.attn_norm.w", lambda p=p: r.get(p + "input_layernorm.weight", (D,))
        yield f"l{i}.attn_norm.b", lambda p=p: r.get(p + "input_layernorm.bias", (D,))
        yield f"l{i}.wqkv", lambda p=p: qkv_w(p)
        if c.qkv_bias:
            yield f"l{i}.bqkv", lambda p=p: qkv_b(p)
        yield f"l{i}.wo", lambda p=p: r.get(p + "attention.dense.weight", (D, D))
        if c.o_bias:
            yield f"l{i}.bo", lambda p=p: r.get(p + "attention.dense.bias", (D,))
        yield f"l{i}.ffn_norm.w", lambda p=p: r.get(p + "post_attention_layernorm.weight", (D,))
        yield f"l{i}.ffn_norm.b", lambda p=p: r.get(p + "post_attention_layernorm.bias", (D,))
        yield f"l{i}.w_up", lambda p=p: r.get(p + "mlp.dense_h_to_4h.weight", (F, D))
        yield f"l{i}.b_up", lambda p=p: r.get(p + "mlp.dense_h_to_4h.bias", (F,))
        yield f"l{i}.w_down", lambda p=p: r.get(p + "mlp.dense_4h_to_h.weight", (D, F))
        yield f"l{i}.b_down", lambda p=p: r.get(p + "mlp.dense_4h_to_h.bias", (D,))
    yield "out_norm.w", lambda: r.get("gpt_neox.final_layer_norm.weight", (D,))
    yield "out_norm.b", lambda: r.get("gpt_neox.final_layer_norm.bias", (D,))
    if not c.tie_word_embeddings:
        yield "output", lambda: r.get("embed_out.weight", (V, D))


MATRIX_NAMES = ("tok_embd", "output", "wqkv", "wo", "w_gate_up", "w_up", "w_down")


def canonical_shapes(cfg: Config) -> dict[str, tuple]:
    """Canonical tensor name -> logical shape for `cfg` (what iter_canonical yields, without a
    checkpoint): matrices [N, K] (stored as `Linear`s in pre-quantized folders), vectors [n]."""
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.q_dim, cfg.kv_dim
    layer_norm = cfg.norm == "layer"
    s = {"tok_embd": (V, D)}
    if cfg.learned_pos:
        s["pos_embd"] = (cfg.max_position_embeddings, D)
    for i in range(cfg.n_layers):
        p = f"l{i}."
        s[p + "attn_norm.w"] = (D,)
        if layer_norm:
            s[p + "attn_norm.b"] = (D,)
        s[p + "wqkv"] = (q + 2 * kv, D)
        if cfg.qkv_bias:
            s[p + "bqkv"] = (q + 2 * kv,)
        if cfg.qk_norm:
            s[p + "q_norm"] = (hd,)
            s[p + "k_norm"] = (hd,)
        s[p + "wo"] = (D, q)
        if cfg.o_bias:
            s[p + "bo"] = (D,)
        s[p + "ffn_norm.w"] = (D,)
        if layer_norm:
            s[p + "ffn_norm.b"] = (D,)
        if cfg.gated_mlp:
            s[p + "w_gate_up"] = (2 * F, D)
            if cfg.mlp_bias:
                s[p + "b_gate_up"] = (2 * F,)
        else:
            s[p + "w_up"] = (F, D)
            if cfg.mlp_bias:
                s[p + "b_up"] = (F,)
        s[p + "w_down"] = (D, F)
        if cfg.mlp_bias:
            s[p + "b_down"] = (D,)
    s["out_norm.w"] = (D,)
    if layer_norm:
        s["out_norm.b"] = (D,)
    if not cfg.tie_word_embeddings:
        s["output"] = (V, D)
    return s


def is_matrix(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in MATRIX_NAMES
