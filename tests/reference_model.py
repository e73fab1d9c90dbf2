"""A plain-numpy, float64 reference of the forward pass of the Hugging Face architectures minilm runs.

Written from the transformers modeling code (not from minilm): it reads config.json and the
safetensors files itself (the `safetensors` library's numpy API) and keeps every tensor under
its HF name. Architectures:

    llama / mistral / qwen2 / qwen3   RMSNorm, GQA, rotate-half RoPE (+ rope_scaling linear,
                                      dynamic, llama3), SwiGLU MLP, attention/mlp bias,
                                      qwen2 q/k/v bias, qwen3 q_norm/k_norm, sliding window
    gpt2                              LayerNorm, Conv1D weights [in, out], learned positions,
                                      gelu_new, tied lm head
    gpt_neox                          LayerNorm, fused qkv with per-head rows [H, 3, hd],
                                      partial rotary (rotary_pct), exact gelu, parallel or
                                      sequential residual
    granite                           embedding / residual / attention multipliers, logits_scaling
    olmo2                             post-norms only, q/k RMSNorm over the whole projection
    smollm3                           layers without RoPE (no_rope_layers / no_rope_layer_interval)
    gemma2 / gemma3_text              (1 + w) RMSNorms, four per layer, sqrt(D) embedding scale,
                                      GeGLU, query_pre_attn_scalar, sliding/global layers, Gemma 3
                                      local/global rope bases and per-head q/k norm, Gemma 2
                                      attention and final-logit soft-caps
    phi3                              fused qkv_proj / gate_up_proj, partial rotary, LongRoPE
                                      (short/long factors by sequence length, attention factor)
    lfm2                              gated short-convolution layers and GQA attention layers
                                      with q/k layernorm, SwiGLU w1/w3/w2

Usage:
    ref = RefModel(folder)
    logits = ref.logits(ids)                   # float64 [T, V], positions 0..T-1
    cache = ref.new_cache(); ref.forward(ids, cache)   # incremental, like a KV cache

`forward` with a cache follows transformers' generate(): keys are stored after RoPE, and with
dynamic NTK scaling the frequencies of each call come from that call's sequence length
(max position + 1), so cached keys keep the rotation they were computed with. Phi-3 with
LongRoPE drops its cache when the sequence crosses the original context (transformers'
Phi3ForCausalLM.prepare_inputs_for_generation) and runs the whole sequence again.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


# ---- reading a checkpoint --------------------------------------------------------------------
def _read_raw(path: Path, name: str, st_dtype: str) -> np.ndarray:
    """Fallback for dtypes numpy lacks (BF16): read the bytes by the safetensors header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    e = json.loads(raw[8:8 + n])[name]
    b, end = e["data_offsets"]
    data = raw[8 + n + b: 8 + n + end]
    assert st_dtype == "BF16", st_dtype
    bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(e["shape"])


def load_safetensors_folder(folder: Path) -> dict:
    """All tensors of a checkpoint folder (single file or index.json shards) as float64."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    out = {}
    for fn in files:
        path = folder / fn
        with safe_open(str(path), framework="np") as f:
            for k in f.keys():
                try:
                    a = f.get_tensor(k)
                except TypeError:      # bfloat16: numpy has no such dtype
                    a = _read_raw(path, k, "BF16")
                out[k] = np.asarray(a, dtype=np.float64)
    return out


# ---- small pieces ----------------------------------------------------------------------------
def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_erf(x):
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACTS = {"silu": silu, "swish": silu, "gelu": gelu_erf, "gelu_new": gelu_new,
        "gelu_pytorch_tanh": gelu_new, "gelu_fast": gelu_new}


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """x: [T, heads, hd]; rotates the first 2*len(inv_freq) dims (partial rotary leaves the rest)."""
    rd = 2 * len(inv_freq)
    ang = np.outer(positions, inv_freq)                       # [T, rd/2]
    emb = np.concatenate([ang, ang], axis=-1)[:, None, :]     # [T, 1, rd]
    xr, xp = x[..., :rd], x[..., rd:]
    xr = xr * np.cos(emb) + rotate_half(xr) * np.sin(emb)
    return np.concatenate([xr, xp], axis=-1)


def softmax(s, axis=-1):
    s = s - s.max(axis, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis, keepdims=True)


# ---- RoPE frequencies (transformers' modeling_rope_utils) ---------------------------------------
def rope_parameters(cfg: dict) -> dict:
    """theta, partial factor and scaling from old (rope_theta / rope_scaling / rotary_pct) or new
    (rope_parameters) spelling."""
    rp = dict(cfg.get("rope_parameters") or {})
    sc = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", cfg.get("rotary_emb_base", rp.get("rope_theta", 10000.0)))
    partial = cfg.get("partial_rotary_factor", cfg.get("rotary_pct", rp.get("partial_rotary_factor")))
    if partial is None:
        partial = 0.25 if cfg["model_type"] == "gpt_neox" else 1.0
    if not sc and rp.get("rope_type", "default") != "default":
        sc = rp
    kind = sc.get("rope_type", sc.get("type", "default")) if sc else "default"
    return {"theta": float(theta), "partial": float(partial), "type": kind, **{
        k: v for k, v in sc.items() if k not in ("rope_type", "type")}}


def default_inv_freq(base, dim):
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, old_context_len):
    """transformers `_compute_llama3_parameters`."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


def inv_freq_for(cfg: dict, head_dim: int, seq_len: int) -> np.ndarray:
    """Inverse frequencies for a forward call whose largest position is seq_len - 1."""
    rp = rope_parameters(cfg)
    dim = int(head_dim * rp["partial"])
    base = rp["theta"]
    kind = rp["type"]
    if kind == "dynamic":   # transformers `_compute_dynamic_ntk_parameters` (+ dynamic_rope_update)
        max_pos = cfg["max_position_embeddings"]
        if seq_len > max_pos:
            factor = rp["factor"]
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(base, dim)
    inv = default_inv_freq(base, dim)
    if kind == "linear":    # positions / factor == frequencies / factor
        return inv / rp["factor"]
    if kind == "llama3":
        return llama3_inv_freq(inv, rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"],
                               rp["original_max_position_embeddings"])
    if kind != "default":
        raise NotImplementedError(kind)
    return inv


# ---- attention ---------------------------------------------------------------------------------
def causal_attention(q, k, v, p0, scale, window=None, softcap=None):
    """q: [T, H, hd] at positions p0..p0+T-1; k, v: [S, Hkv, hd] at positions 0..S-1 (S = p0 + T).
    Query at position p sees keys j <= p (and p - j < window with a sliding window); softcap:
    scores = softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    T, H, hd = q.shape
    S, Hkv, _ = k.shape
    group = H // Hkv
    qpos = p0 + np.arange(T)[:, None]
    kpos = np.arange(S)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= (qpos - kpos) < window
    out = np.zeros((T, H, v.shape[-1]))
    for h in range(H):
        g = h // group
        s = q[:, h, :] @ k[:, g, :].T * scale                    # [T, S]
        if softcap:
            s = np.tanh(s / softcap) * softcap
        s = np.where(allowed, s, -np.inf)
        out[:, h, :] = softmax(s) @ v[:, g, :]
    return out


# ---- the model -------------------------------------------------------------------------------
class RefModel:
    def __init__(self, folder):
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = load_safetensors_folder(folder)
        c = self.cfg
        self.mt = c["model_type"]
        if self.mt == "gpt2":
            self.D, self.L, self.H = c["n_embd"], c["n_layer"], c["n_head"]
            self.Hkv = self.H
            self.hd = self.D // self.H
            self.pre = "transformer." if "transformer.wte.weight" in self.w else ""
            self.vocab = c["vocab_size"]
        else:
            self.D, self.L, self.H = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
            self.Hkv = c.get("num_key_value_heads") or self.H
            self.hd = c.get("head_dim") or self.D // self.H
            self.vocab = c["vocab_size"]
        # per-layer sliding window (transformers semantics)
        self.windows = [None] * self.L
        if self.mt == "mistral" and c.get("sliding_window"):
            self.windows = [c["sliding_window"]] * self.L
        elif self.mt in ("qwen2", "qwen3") and c.get("use_sliding_window") and c.get("sliding_window"):
            types = c.get("layer_types") or [
                "sliding_attention" if i >= c.get("max_window_layers", 28) else "full_attention"
                for i in range(self.L)]
            self.windows = [c["sliding_window"] if t == "sliding_attention" else None for t in types]
        elif self.mt in ("gemma2", "gemma3_text") and c.get("sliding_window"):
            types = c.get("layer_types")
            if types is None and self.mt == "gemma2":
                types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.L)]
            elif types is None:
                pat = c.get("sliding_window_pattern", 6)
                types = ["sliding_attention" if (i + 1) % pat else "full_attention" for i in range(self.L)]
            self.windows = [c["sliding_window"] if t == "sliding_attention" else None for t in types]

    # cache: per layer [k (S, Hkv, hd), v (S, Hkv, hd)]; "pos" = positions filled
    def new_cache(self) -> dict:
        return {"pos": 0, "k": [None] * self.L, "v": [None] * self.L, "ids": [], "long": False}

    def logits(self, ids) -> np.ndarray:
        return self.forward(ids, self.new_cache())

    def forward(self, ids, cache) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if self.mt == "phi3" and cache["pos"]:
            orig = self._longrope_orig()
            if orig and (cache["pos"] + n > orig) != cache["long"]:   # the cache is dropped
                ids = np.concatenate([np.asarray(cache["ids"], np.int64), ids])
                cache.update(self.new_cache())
        fam = {"gpt2": self._gpt2, "gpt_neox": self._neox, "lfm2": self._lfm2}.get(self.mt)
        if fam is None:
            fam = self._llama if self.mt in ("llama", "mistral", "qwen2", "qwen3") else self._decoder
        out = fam(ids, cache)
        cache["pos"] += len(ids)
        cache["ids"] = list(cache["ids"]) + [int(t) for t in ids]
        return out[len(out) - n:]

    @staticmethod
    def _append(cache, i, k, v):
        if cache["k"][i] is None:
            cache["k"][i], cache["v"][i] = k, v
        else:
            cache["k"][i] = np.concatenate([cache["k"][i], k])
            cache["v"][i] = np.concatenate([cache["v"][i], v])
        return cache["k"][i], cache["v"][i]

    def _lin(self, x, name, bias=True):
        y = x @ self.w[name + ".weight"].T
        if bias and name + ".bias" in self.w:
            y = y + self.w[name + ".bias"]
        return y

    # -- llama, mistral, qwen2, qwen3
    def _llama(self, ids, cache):
        c, w = self.cfg, self.w
        T, p0 = len(ids), cache["pos"]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        eps = c.get("rms_norm_eps", 1e-6)
        act = ACTS[c.get("hidden_act", "silu")]
        pos = p0 + np.arange(T)
        inv = inv_freq_for(c, hd, p0 + T)
        x = w["model.embed_tokens.weight"][ids]
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = self._lin(h, p + "self_attn.q_proj").reshape(T, H, hd)
            k = self._lin(h, p + "self_attn.k_proj").reshape(T, Hkv, hd)
            v = self._lin(h, p + "self_attn.v_proj").reshape(T, Hkv, hd)
            if self.mt == "qwen3":
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
            q = apply_rope(q, pos, inv)
            k = apply_rope(k, pos, inv)
            K, Vv = self._append(cache, i, k, v)
            a = causal_attention(q, K, Vv, p0, hd ** -0.5, self.windows[i])
            x = x + self._lin(a.reshape(T, H * hd), p + "self_attn.o_proj")
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            g = self._lin(h, p + "mlp.gate_proj")
            u = self._lin(h, p + "mlp.up_proj")
            x = x + self._lin(act(g) * u, p + "mlp.down_proj")
        x = rms_norm(x, w["model.norm.weight"], eps)
        if not c.get("tie_word_embeddings", False) and "lm_head.weight" in w:
            return self._lin(x, "lm_head", bias=False)
        return x @ w["model.embed_tokens.weight"].T

    # -- gpt2
    def _gpt2(self, ids, cache):
        c, w, pre = self.cfg, self.w, self.pre
        T, p0 = len(ids), cache["pos"]
        H, hd, D = self.H, self.hd, self.D
        eps = c.get("layer_norm_epsilon", 1e-5)
        act = ACTS[c.get("activation_function", "gelu_new")]
        scale = hd ** -0.5 if c.get("scale_attn_weights", True) else 1.0

        def conv1d(x, name):            # Conv1D: weight [in, out]
            return x @ w[name + ".weight"] + w[name + ".bias"]

        x = w[pre + "wte.weight"][ids] + w[pre + "wpe.weight"][p0 + np.arange(T)]
        for i in range(self.L):
            p = f"{pre}h.{i}."
            h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = conv1d(h, p + "attn.c_attn")
            q, k, v = (a.reshape(T, H, hd) for a in np.split(qkv, 3, axis=-1))
            K, Vv = self._append(cache, i, k, v)
            a = causal_attention(q, K, Vv, p0, scale)
            x = x + conv1d(a.reshape(T, D), p + "attn.c_proj")
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            x = x + conv1d(act(conv1d(h, p + "mlp.c_fc")), p + "mlp.c_proj")
        x = layer_norm(x, w[pre + "ln_f.weight"], w[pre + "ln_f.bias"], eps)
        head = w.get("lm_head.weight") if not c.get("tie_word_embeddings", True) else None
        return x @ (head if head is not None else w[pre + "wte.weight"]).T

    # -- gpt_neox
    def _neox(self, ids, cache):
        c, w = self.cfg, self.w
        T, p0 = len(ids), cache["pos"]
        H, hd, D = self.H, self.hd, self.D
        eps = c.get("layer_norm_eps", 1e-5)
        act = ACTS[c.get("hidden_act", "gelu")]
        pos = p0 + np.arange(T)
        inv = inv_freq_for(c, hd, p0 + T)
        x = w["gpt_neox.embed_in.weight"][ids]
        for i in range(self.L):
            p = f"gpt_neox.layers.{i}."
            h = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
            qkv = self._lin(h, p + "attention.query_key_value").reshape(T, H, 3 * hd)  # per head q|k|v
            q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
            q = apply_rope(q, pos, inv)
            k = apply_rope(k, pos, inv)
            K, Vv = self._append(cache, i, k, v)
            a = causal_attention(q, K, Vv, p0, hd ** -0.5)
            attn = self._lin(a.reshape(T, D), p + "attention.dense")

            def mlp(xx):
                h2 = layer_norm(xx, w[p + "post_attention_layernorm.weight"],
                                w[p + "post_attention_layernorm.bias"], eps)
                return self._lin(act(self._lin(h2, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")

            if c.get("use_parallel_residual", True):
                x = x + attn + mlp(x)
            else:
                x = x + attn
                x = x + mlp(x)
        x = layer_norm(x, w["gpt_neox.final_layer_norm.weight"], w["gpt_neox.final_layer_norm.bias"], eps)
        head = w.get("embed_out.weight") if not c.get("tie_word_embeddings", False) else None
        return x @ (head if head is not None else w["gpt_neox.embed_in.weight"]).T

    # -- granite, olmo2, smollm3, gemma2, gemma3_text, phi3 (transformers' modeling_<arch>.py)
    def _longrope_orig(self):
        c = self.cfg
        sc = c.get("rope_scaling") or {}
        rp = c.get("rope_parameters") or {}
        kind = sc.get("rope_type", sc.get("type")) or rp.get("rope_type")
        if kind not in ("longrope", "su"):
            return 0
        return (sc.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
                or c.get("original_max_position_embeddings") or c["max_position_embeddings"])

    def _rope_for_layer(self, i, seq_len):
        """(inverse frequencies, cos/sin multiplier) of layer i for a call of seq_len positions,
        or None for a layer without RoPE."""
        c, mt, hd = self.cfg, self.mt, self.hd
        if mt == "smollm3":
            use = c.get("no_rope_layers")
            if use is None:
                every = c.get("no_rope_layer_interval", 4)
                use = [int((j + 1) % every != 0) for j in range(self.L)]
            if not use[i]:
                return None
        if mt == "gemma3_text":
            rp = c.get("rope_parameters") or {}
            sliding = self.windows[i] is not None
            if "full_attention" in rp:
                r = rp["sliding_attention" if sliding else "full_attention"]
                inv = default_inv_freq(r["rope_theta"], hd)
                if r.get("rope_type", "default") == "linear":
                    inv = inv / r["factor"]
                return inv, 1.0
            if sliding:
                return default_inv_freq(c.get("rope_local_base_freq", 10000.0), hd), 1.0
            return inv_freq_for(c, hd, seq_len), 1.0
        if mt == "phi3" and self._longrope_orig():
            sc = dict(c.get("rope_parameters") or {})
            sc.update(c.get("rope_scaling") or {})
            theta = c.get("rope_theta", sc.get("rope_theta", 10000.0))
            partial = c.get("partial_rotary_factor", sc.get("partial_rotary_factor", 1.0))
            dim = int(hd * partial)
            orig = self._longrope_orig()
            factor = c["max_position_embeddings"] / orig
            att = sc.get("attention_factor")
            if att is None:
                att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
            ext = np.asarray(sc["long_factor"] if seq_len > orig else sc["short_factor"], np.float64)
            return 1.0 / (ext * theta ** (np.arange(0, dim, 2) / dim)), att
        return inv_freq_for(c, hd, seq_len), 1.0

    def _decoder(self, ids, cache):
        c, w, mt = self.cfg, self.w, self.mt
        T, p0 = len(ids), cache["pos"]
        H, Hkv, hd, D = self.H, self.Hkv, self.hd, self.D
        eps = c.get("rms_norm_eps", 1e-6)
        gemma = mt in ("gemma2", "gemma3_text")
        one = 1.0 if gemma else 0.0                      # Gemma's RMSNorm scales by (1 + w)
        nrm = lambda x, name: rms_norm(x, one + w[name + ".weight"], eps)
        act = gelu_new if gemma else ACTS[c.get("hidden_act", "silu")]
        scale = hd ** -0.5
        if mt == "granite":
            scale = c.get("attention_multiplier", scale)
        if gemma:
            scale = c.get("query_pre_attn_scalar", hd) ** -0.5
        cap = c.get("attn_logit_softcapping") if mt == "gemma2" else None
        pos = p0 + np.arange(T)
        x = w["model.embed_tokens.weight"][ids]
        if mt == "granite":
            x = x * c.get("embedding_multiplier", 1.0)
        if gemma:
            x = x * float(np.float32(math.sqrt(D)))     # sqrt(D) in the (f32) weights' dtype
        res = c.get("residual_multiplier", 1.0) if mt == "granite" else 1.0
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = x if mt == "olmo2" else nrm(x, p + "input_layernorm")
            if mt == "phi3":
                qkv = self._lin(h, p + "self_attn.qkv_proj")
                q, k, v = np.split(qkv, [H * hd, (H + Hkv) * hd], axis=-1)
            else:
                q, k, v = (self._lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
            if mt == "olmo2":                           # over the whole projection
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
            q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
            if mt == "gemma3_text":                     # per head
                q = nrm(q, p + "self_attn.q_norm")
                k = nrm(k, p + "self_attn.k_norm")
            rope = self._rope_for_layer(i, p0 + T)
            if rope is not None:
                inv, att = rope
                rd = 2 * len(inv)
                q = apply_rope(q, pos, inv)
                k = apply_rope(k, pos, inv)
                q[..., :rd] *= att
                k[..., :rd] *= att
            K, Vv = self._append(cache, i, k, v)
            a = causal_attention(q, K, Vv, p0, scale, self.windows[i], cap)
            o = self._lin(a.reshape(T, H * hd), p + "self_attn.o_proj")
            if gemma or mt == "olmo2":
                o = nrm(o, p + "post_attention_layernorm")
            x = x + o * res
            if gemma:
                h = nrm(x, p + "pre_feedforward_layernorm")
            elif mt == "olmo2":
                h = x
            else:
                h = nrm(x, p + "post_attention_layernorm")
            if mt == "phi3":
                gu = self._lin(h, p + "mlp.gate_up_proj")
                g, u = np.split(gu, 2, axis=-1)
            else:
                g, u = self._lin(h, p + "mlp.gate_proj"), self._lin(h, p + "mlp.up_proj")
            m = self._lin(act(g) * u, p + "mlp.down_proj")
            if gemma or mt == "olmo2":
                m = nrm(m, p + "post_feedforward_layernorm")
            x = x + m * res
        x = nrm(x, "model.norm")
        tie = c.get("tie_word_embeddings", mt != "olmo2" and mt != "phi3")
        head = w.get("lm_head.weight") if not tie else None
        lg = x @ (head if head is not None else w["model.embed_tokens.weight"]).T
        if mt == "granite":
            lg = lg / c.get("logits_scaling", 1.0)
        if mt == "gemma2" and c.get("final_logit_softcapping"):
            fc = c["final_logit_softcapping"]
            lg = np.tanh(lg / fc) * fc
        if mt == "phi3":
            cache["long"] = p0 + T > (self._longrope_orig() or 10 ** 12)
        return lg

    # -- lfm2 (transformers' modeling_lfm2.py: Lfm2ShortConv, Lfm2Attention, Lfm2MLP)
    def _lfm2(self, ids, cache):
        c, w = self.cfg, self.w
        T, p0 = len(ids), cache["pos"]
        H, Hkv, hd, D = self.H, self.Hkv, self.hd, self.D
        eps = c.get("norm_eps", 1e-5)
        Lc = c.get("conv_L_cache", 3)
        types = c.get("layer_types")
        if types is None:
            idx = c.get("full_attn_idxs")
            idx = list(range(self.L)) if idx is None else idx
            types = ["full_attention" if i in idx else "conv" for i in range(self.L)]
        pos = p0 + np.arange(T)
        inv = inv_freq_for(c, hd, p0 + T)
        x = w["model.embed_tokens.weight"][ids]
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "operator_norm.weight"], eps)
            if types[i] == "conv":
                bcx = self._lin(h, p + "conv.in_proj")                  # [T, 3D]
                B, C, xx = bcx[:, :D], bcx[:, D:2 * D], bcx[:, 2 * D:]
                bx, _ = self._append(cache, i, B * xx, B * xx)          # [p0 + T, D] conv inputs
                ker = w[p + "conv.conv.weight"][:, 0, :]                # [D, Lc]
                pad = np.concatenate([np.zeros((Lc - 1, D)), bx])       # causal: zeros before 0
                conv = np.stack([sum(ker[:, j] * pad[p0 + t + j] for j in range(Lc)) for t in range(T)])
                if p + "conv.conv.bias" in w:
                    conv = conv + w[p + "conv.conv.bias"]
                o = self._lin(C * conv, p + "conv.out_proj")
            else:
                q = self._lin(h, p + "self_attn.q_proj").reshape(T, H, hd)
                k = self._lin(h, p + "self_attn.k_proj").reshape(T, Hkv, hd)
                v = self._lin(h, p + "self_attn.v_proj").reshape(T, Hkv, hd)
                q = rms_norm(q, w[p + "self_attn.q_layernorm.weight"], eps)
                k = rms_norm(k, w[p + "self_attn.k_layernorm.weight"], eps)
                q, k = apply_rope(q, pos, inv), apply_rope(k, pos, inv)
                K, Vv = self._append(cache, i, k, v)
                a = causal_attention(q, K, Vv, p0, hd ** -0.5)
                o = self._lin(a.reshape(T, H * hd), p + "self_attn.out_proj")
            x = x + o
            h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
            ff = p + "feed_forward."
            x = x + self._lin(silu(self._lin(h, ff + "w1")) * self._lin(h, ff + "w3"), ff + "w2")
        x = rms_norm(x, w["model.embedding_norm.weight"], eps)
        head = w.get("lm_head.weight") if not c.get("tie_word_embeddings", True) else None
        return x @ (head if head is not None else w["model.embed_tokens.weight"]).T

    # -- greedy
    def greedy(self, ids, n_new: int) -> list[int]:
        """Greedy continuation with an incremental cache (as transformers' generate)."""
        cache = self.new_cache()
        lg = self.forward(ids, cache)[-1]
        out = []
        for _ in range(n_new):
            t = int(np.argmax(lg))
            out.append(t)
            lg = self.forward([t], cache)[-1]
        return out
