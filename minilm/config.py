"""One `Config` dataclass built from a Hugging Face config.json.

Each architecture family spells its hyper-parameters differently (n_embd vs hidden_size,
rope_theta vs rope_parameters, rotary_pct vs partial_rotary_factor, torch_dtype vs dtype...).
`Config.from_hf` normalises them into one vocabulary; nothing after this module looks at the
raw dict again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, UnsupportedModelError

# model_type -> family. The family decides tensor naming (weights.py) and the small switches below.
SUPPORTED = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "neox",
}


@dataclass
class Config:
    model_type: str
    family: str                 # "llama" | "gpt2" | "neox"
    vocab_size: int
    hidden_size: int            # D
    n_layers: int               # L
    n_heads: int                # H (query heads)
    n_kv_heads: int             # Hkv (GQA: H % Hkv == 0)
    head_dim: int               # hd
    intermediate_size: int      # F
    max_position_embeddings: int
    norm: str = "rms"           # "rms" | "layer"
    norm_eps: float = 1e-5
    act: str = "silu"           # "silu" (gated MLP) | "gelu" (erf) | "gelu_tanh" (gelu_new), plain MLP
    gated_mlp: bool = True      # SwiGLU-style gate*up
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False       # Qwen3: RMSNorm over head_dim on q and k before RoPE
    parallel_residual: bool = False  # NeoX: x + attn(ln1 x) + mlp(ln2 x)
    learned_pos: bool = False   # GPT-2: wpe table instead of RoPE
    rope_theta: float = 10000.0
    rotary_dim: int = 0         # dims of each head that are rotated (partial rotary); 0 = no RoPE
    rope_scaling: dict | None = None   # {"rope_type": "linear"|"dynamic"|"llama3", ...}
    layer_windows: list[int] = field(default_factory=list)  # per layer sliding window; 0/absent = full
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_hf(raw)
        except ModelLoadError as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        mt = raw.get("model_type")
        if mt not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
        family = SUPPORTED[mt]

        def get(*names, default=None, required=True):
            for n in names:
                if raw.get(n) is not None:
                    return raw[n]
            if required and default is None:
                raise ModelLoadError(f"config is missing {' / '.join(names)}")
            return default

        D = int(get("hidden_size", "n_embd"))
        L = int(get("num_hidden_layers", "n_layer"))
        H = int(get("num_attention_heads", "n_head"))
        Hkv = int(get("num_key_value_heads", default=H))
        for name, v in (("hidden_size", D), ("num_hidden_layers", L), ("num_attention_heads", H),
                        ("num_key_value_heads", Hkv)):
            if v < 1:
                raise ModelLoadError(f"{name}={v} must be a positive integer")
        hd = int(get("head_dim", default=D // H))
        if hd < 1:
            raise ModelLoadError(f"head_dim={hd} must be a positive integer")
        if H % Hkv:
            raise ModelLoadError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
        rope = raw.get("rope_parameters") or {}
        theta = float(get("rope_theta", "rotary_emb_base", default=rope.get("rope_theta", 10000.0)))
        partial = get("partial_rotary_factor", "rotary_pct",
                      default=rope.get("partial_rotary_factor", 1.0))
        scaling = raw.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type") or scaling.get("type")
            if kind in (None, "default"):
                scaling = None
            elif kind not in ("linear", "dynamic", "llama3"):
                raise ModelLoadError(f"rope_scaling type {kind!r} is not supported "
                                     "(supported: linear, dynamic, llama3)")
            else:
                scaling["rope_type"] = kind
                need = {"linear": ["factor"], "dynamic": ["factor"],
                        "llama3": ["factor", "original_max_position_embeddings"]}[kind]
                for k in need:
                    try:
                        float(scaling[k])
                    except (KeyError, TypeError, ValueError):
                        raise ModelLoadError(f"rope_scaling of type {kind!r} needs a numeric {k!r}") from None

        eos = raw.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        dtype = str(get("dtype", "torch_dtype", default="float32")).replace("torch.", "")

        c = dict(model_type=mt, family=family, vocab_size=int(get("vocab_size")),
                 hidden_size=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, head_dim=hd,
                 bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
                 torch_dtype=dtype, rope_theta=theta, rope_scaling=scaling,
                 tie_word_embeddings=bool(raw.get("tie_word_embeddings", family == "gpt2")))
        if family == "llama":
            c.update(intermediate_size=int(get("intermediate_size")),
                     max_position_embeddings=int(get("max_position_embeddings", default=2048)),
                     norm="rms", norm_eps=float(get("rms_norm_eps", default=1e-6)),
                     act="silu", gated_mlp=True,
                     qkv_bias=bool(raw.get("attention_bias", mt == "qwen2")),
                     o_bias=bool(raw.get("attention_bias", False)),
                     mlp_bias=bool(raw.get("mlp_bias", False)),
                     qk_norm=(mt == "qwen3"),
                     rotary_dim=int(hd * float(partial)))
            act = raw.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ModelLoadError(f"hidden_act {act!r} is not supported for {mt} (supported: silu)")
            sw = raw.get("sliding_window")
            types = raw.get("layer_types")
            if sw and isinstance(types, list) and len(types) == L:
                c["layer_windows"] = [int(sw) if t == "sliding_attention" else 0 for t in types]
            elif sw and mt == "mistral":
                c["layer_windows"] = [int(sw)] * L
            elif sw and raw.get("use_sliding_window"):      # Qwen2/3: layers from max_window_layers on
                first = int(raw.get("max_window_layers", 0) or 0)
                c["layer_windows"] = [int(sw) if i >= first else 0 for i in range(L)]
        elif family == "gpt2":
            inner = raw.get("n_inner")
            act = raw.get("activation_function", "gelu_new")
            acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
            if act not in acts:
                raise ModelLoadError(f"activation_function {act!r} is not supported for gpt2")
            if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
                raise ModelLoadError("gpt2 options scale_attn_by_inverse_layer_idx / "
                                     "reorder_and_upcast_attn are not supported")
            c.update(intermediate_size=int(inner) if inner else 4 * D,
                     max_position_embeddings=int(get("n_positions", "max_position_embeddings")),
                     norm="layer", norm_eps=float(get("layer_norm_epsilon", default=1e-5)),
                     act=acts[act], gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                     learned_pos=True, rotary_dim=0)
        elif family == "neox":
            act = raw.get("hidden_act", "gelu")
            acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh"}
            if act not in acts:
                raise ModelLoadError(f"hidden_act {act!r} is not supported for gpt_neox")
            rd = int(hd * float(partial))
            c.update(intermediate_size=int(get("intermediate_size")),
                     max_position_embeddings=int(get("max_position_embeddings", default=2048)),
                     norm="layer", norm_eps=float(get("layer_norm_eps", default=1e-5)),
                     act=acts[act], gated_mlp=False,
                     qkv_bias=bool(raw.get("attention_bias", True)),
                     o_bias=bool(raw.get("attention_bias", True)), mlp_bias=True,
                     parallel_residual=bool(raw.get("use_parallel_residual", True)),
                     rotary_dim=rd)
        cfg = cls(**c)
        if cfg.rotary_dim % 2:
            raise ModelLoadError(f"rotary dimension {cfg.rotary_dim} must be even")
        return cfg


def rope_inv_freq(cfg: Config, seq_len: int | None = None) -> "np.ndarray":
    """Inverse frequencies [rotary_dim/2] for RoPE, with the config's rope_scaling applied.

    Follows transformers' modeling_rope_utils: linear divides positions (here: frequencies) by
    factor; llama3 rescales low frequencies smoothly; dynamic (NTK) enlarges the base once the
    sequence is longer than max_position_embeddings (seq_len = positions seen in this call).
    """
    rd = cfg.rotary_dim
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type")
    if kind == "dynamic" and seq_len is not None:
        max_pos = cfg.max_position_embeddings          # as transformers' dynamic NTK does
        if seq_len > max_pos:
            f = float(sc["factor"])
            base = base * ((f * seq_len / max_pos) - (f - 1)) ** (rd / (rd - 2))
    inv = 1.0 / (base ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        lo = float(sc.get("low_freq_factor", 1.0))
        hi = float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wl = old_ctx / lo
        high_wl = old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
