"""Text embeddings from a causal LM: pooled final-normed hidden states.

    vecs = model.embed(["first text", "second text"], pooling="mean", normalize=True)   # f32[2, hidden]

Each input runs from position 0 with a fresh KV cache (through `Transformer.forward`, in chunks
of `state.rows` tokens), so an input's vector does not depend on what ran before or on the other
inputs. `pooling="mean"` averages the hidden states of all its tokens, `"last"` takes the last
token's (for models trained to put the summary there). `normalize=True` scales each vector to
unit L2 norm. The cache is reset afterwards, so generation that follows starts from scratch
rather than from a stale prefix.

Inputs: a string, a list of strings, a list of token ids, or a list of such lists. Empty input
and inputs longer than the context are errors naming the index (never truncated silently).
"""
from __future__ import annotations

import numpy as np

POOLINGS = ("mean", "last")


class EmbeddingError(ValueError):
    """Bad embedding input; `param` names the field ("input", "input[3]", "pooling")."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x)


def encode_inputs(model, texts, param: str = "input") -> list[list[int]]:
    """Token ids per input, checked: non-empty, ids in the vocabulary, within the context."""
    if isinstance(texts, str) or _is_ids(texts):
        texts = [texts]
    if isinstance(texts, np.ndarray):
        texts = [texts.tolist()] if texts.ndim == 1 else texts.tolist()
    if not isinstance(texts, (list, tuple)):
        raise EmbeddingError(f"{param}: expected a string, a list of strings or a list of token ids, "
                             f"got {type(texts).__name__}", param)
    if not texts:
        raise EmbeddingError(f"{param}: empty (give at least one input)", param)
    V, n_ctx = model.config.vocab_size, model.n_ctx
    out = []
    for i, t in enumerate(texts):
        where = f"{param}[{i}]"
        if isinstance(t, str):
            if not t:
                raise EmbeddingError(f"{where}: empty string", where)
            ids = model.tokenizer.encode(t)
        elif _is_ids(t):
            bad = [x for x in t if not 0 <= x < V]
            if bad:
                raise EmbeddingError(f"{where}: token id {bad[0]} outside [0, {V})", where)
            ids = [int(x) for x in t]
        else:
            raise EmbeddingError(f"{where}: expected a non-empty string or list of token ids, got "
                                 f"{type(t).__name__ if not isinstance(t, (list, tuple)) else 'an empty or mixed list'}",
                                 where)
        if not ids:
            raise EmbeddingError(f"{where}: no tokens", where)
        if len(ids) > n_ctx:
            raise EmbeddingError(f"{where}: {len(ids)} tokens, longer than the model's context of {n_ctx} "
                                 f"tokens (inputs are never truncated; shorten or split it)", where,
                                 "context_length_exceeded")
        out.append(ids)
    return out


def embed_ids(model, inputs: list[list[int]], pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """f32[n, hidden]: one pooled vector per id list (each run from position 0)."""
    if pooling not in POOLINGS:
        raise EmbeddingError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}", "pooling")
    if not isinstance(normalize, bool):
        raise EmbeddingError(f"normalize={normalize!r}: must be True or False", "normalize")
    net = model.net
    rows = net.state.rows
    D = model.config.hidden_size
    out = np.zeros((len(inputs), D), np.float32)                 # [n, D]
    busy = getattr(net, "busy", None)                             # one call at a time per model
    if busy is not None:
        with busy:
            return _embed_run(net, inputs, pooling, normalize, rows, out)
    return _embed_run(net, inputs, pooling, normalize, rows, out)


def _embed_run(net, inputs, pooling, normalize, rows, out) -> np.ndarray:
    D = out.shape[1]
    try:
        for i, ids in enumerate(inputs):
            net.cache.reset()
            a = np.asarray(ids, dtype=np.int64)                  # [T]
            acc = np.zeros(D, np.float64)                        # [D] sum over tokens (mean)
            for s in range(0, len(a), rows):
                h = net.forward(a[s:s + rows], rope_end=len(a))  # [M, D] view of a scratch buffer
                if pooling == "mean":
                    acc += h.sum(axis=0, dtype=np.float64)
                else:
                    acc[:] = h[-1]
            v = acc / len(a) if pooling == "mean" else acc
            if normalize:
                n = np.linalg.norm(v)
                v = v / n if n > 0 else v
            out[i] = v
    finally:
        net.cache.reset()                                        # no stale prefix for generate()
    return out


def embed(model, texts, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """f32[n, hidden] embeddings of `texts` (see the module docstring)."""
    return embed_ids(model, encode_inputs(model, texts), pooling, normalize)
