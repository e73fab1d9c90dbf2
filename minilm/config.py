"""One `Config` dataclass built from a Hugging Face config.json.

Each architecture family spells its hyper-parameters differently (n_embd vs hidden_size,
rope_theta vs rope_parameters, rotary_pct vs partial_rotary_factor, torch_dtype vs dtype...).
`Config.from_hf` normalises them into one vocabulary; nothing after this module looks at the
raw dict again.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
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

# Upper bounds for sizes read from a config: far above any model minilm can run on a device, low
# enough that no product of them overflows int64 or asks numpy for an absurd allocation before the
# weights are compared with the config.
MAX_VOCAB = 1 << 31
MAX_LAYERS = 4096
MAX_HIDDEN = 1 << 18          # hidden_size, intermediate_size
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_POSITIONS = 1 << 31


def _int(name: str, v, lo: int = 1, hi: int | None = None) -> int:
    """A config integer: a JSON int (not a bool, float, string or list) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ModelLoadError(f"{name}={v!r}: must be an integer, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ModelLoadError(f"{name}={v}: must be {rng}")
    return v


def _float(name: str, v, lo: float | None = None, lo_open: bool = True, hi: float | None = None) -> float:
    """A config number: finite, not a bool or string; > lo (>= lo when lo_open is False), <= hi."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ModelLoadError(f"{name}={v!r}: must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ModelLoadError(f"{name}={v}: must be finite")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ModelLoadError(f"{name}={v}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise ModelLoadError(f"{name}={v}: must be <= {hi}")
    return v


def _bool(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ModelLoadError(f"{name}={v!r}: must be true or false, got {type(v).__name__}")
    return bool(v)


def _token_id(name: str, v) -> int | None:
    if v is None:
        return None
    return _int(name, v, lo=0, hi=MAX_VOCAB - 1)


def token_ids(name: str, v) -> list[int]:
    """eos_token_id style values: null, one id, or a list of ids -> list of ints (named errors)."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [_int(f"{name}[{i}]", e, lo=0, hi=MAX_VOCAB - 1) for i, e in enumerate(v) if e is not None]
    return [_int(name, v, lo=0, hi=MAX_VOCAB - 1)]


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

    def validate(self) -> "Config":
        """Check every field's type and range, and the sizes against each other (one pass over
        the normalised config; from_hf calls it). Raises ModelLoadError naming the field, so no
        value from a file can make a kernel index outside its arrays or allocate absurd sizes."""
        if self.family not in ("llama", "gpt2", "neox"):
            raise ModelLoadError(f"family={self.family!r}: unknown")
        _int("vocab_size", self.vocab_size, hi=MAX_VOCAB)
        _int("hidden_size", self.hidden_size, hi=MAX_HIDDEN)
        _int("num_hidden_layers", self.n_layers, hi=MAX_LAYERS)
        _int("num_attention_heads", self.n_heads, hi=MAX_HEADS)
        _int("num_key_value_heads", self.n_kv_heads, hi=MAX_HEADS)
        _int("head_dim", self.head_dim, hi=MAX_HEAD_DIM)
        _int("intermediate_size", self.intermediate_size, hi=MAX_HIDDEN)
        _int("max_position_embeddings", self.max_position_embeddings, hi=MAX_POSITIONS)
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(f"num_attention_heads={self.n_heads} is not a multiple of "
                                 f"num_key_value_heads={self.n_kv_heads}")
        if self.family in ("gpt2", "neox") and self.n_heads * self.head_dim != self.hidden_size:
            raise ModelLoadError(f"hidden_size={self.hidden_size} is not num_attention_heads={self.n_heads} "
                                 f"x head_dim={self.head_dim} ({self.model_type} needs hidden_size divisible "
                                 "by the number of heads)")
        if self.family in ("gpt2", "neox") and self.n_kv_heads != self.n_heads:
            raise ModelLoadError(f"num_key_value_heads={self.n_kv_heads}: {self.model_type} has no grouped-query "
                                 f"attention (must equal num_attention_heads={self.n_heads})")
        if self.norm not in ("rms", "layer"):
            raise ModelLoadError(f"norm={self.norm!r}: unknown")
        if self.act not in ("silu", "gelu", "gelu_tanh"):
            raise ModelLoadError(f"act={self.act!r}: unknown")
        eps_key = "rms_norm_eps" if self.norm == "rms" else "layer_norm_eps"
        _float(eps_key, self.norm_eps, lo=0.0, hi=1.0)
        for k in ("gated_mlp", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "parallel_residual",
                  "learned_pos", "tie_word_embeddings"):
            _bool(k, getattr(self, k))
        _float("rope_theta", self.rope_theta, lo=0.0)
        rd = _int("rotary_dim (head_dim x partial_rotary_factor)", self.rotary_dim, lo=0, hi=self.head_dim)
        if rd % 2:
            raise ModelLoadError(f"rotary dimension {rd} (head_dim x partial_rotary_factor) must be even")
        if self.family == "gpt2" and rd:
            raise ModelLoadError("gpt2 uses learned positions, not RoPE")
        if self.family != "gpt2" and rd == 0:
            raise ModelLoadError("partial_rotary_factor gives 0 rotary dimensions")
        if rd == 2 and (self.rope_scaling or {}).get("rope_type") == "dynamic":
            raise ModelLoadError("rope_scaling 'dynamic' needs a rotary dimension of at least 4")
        if self.rope_scaling is not None:
            sc = self.rope_scaling
            if not isinstance(sc, dict):
                raise ModelLoadError(f"rope_scaling={sc!r}: must be an object")
            kind = sc.get("rope_type")
            _float("rope_scaling.factor", sc.get("factor"), lo=0.0)
            if kind == "dynamic" and float(sc["factor"]) < 1.0:
                raise ModelLoadError(f"rope_scaling.factor={sc['factor']}: must be >= 1 for 'dynamic'")
            if kind == "llama3":
                _float("rope_scaling.original_max_position_embeddings",
                       sc.get("original_max_position_embeddings"), lo=0.0)
                lo = _float("rope_scaling.low_freq_factor", sc.get("low_freq_factor", 1.0), lo=0.0)
                hi = _float("rope_scaling.high_freq_factor", sc.get("high_freq_factor", 4.0), lo=0.0)
                if hi <= lo:
                    raise ModelLoadError(f"rope_scaling.high_freq_factor={hi} must be > low_freq_factor={lo}")
        if not isinstance(self.layer_windows, list) or (self.layer_windows and len(self.layer_windows) != self.n_layers):
            raise ModelLoadError(f"sliding window list has {len(self.layer_windows)} entries for "
                                 f"{self.n_layers} layers")
        for i, w in enumerate(self.layer_windows):
            _int(f"sliding_window (layer {i})", w, lo=0, hi=MAX_POSITIONS)
        _token_id("bos_token_id", self.bos_token_id)
        if not isinstance(self.eos_token_ids, list):
            raise ModelLoadError(f"eos_token_id={self.eos_token_ids!r}: must be a list of ids")
        for i, e in enumerate(self.eos_token_ids):
            _int(f"eos_token_id[{i}]", e, lo=0, hi=MAX_VOCAB - 1)
        return self

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
        except RecursionError:
            raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_hf(raw)
        except ModelLoadError as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Normalise a config.json dict; every value is type- and range-checked (ModelLoadError
        naming the key), then `validate` checks the whole config."""
        if not isinstance(raw, dict):
            raise ModelLoadError(f"expected a JSON object, got {type(raw).__name__}")
        mt = raw.get("model_type")
        if not isinstance(mt, str) or mt not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
        family = SUPPORTED[mt]

        def key(*names):
            for n in names:
                if raw.get(n) is not None:
                    return n
            return names[0]

        def get(*names, default=None, required=True):
            for n in names:
                if raw.get(n) is not None:
                    return raw[n]
            if required and default is None:
                raise ModelLoadError(f"config is missing {' / '.join(names)}")
            return default

        def gint(*names, default=None, lo=1, hi=None):
            return _int(key(*names), get(*names, default=default), lo=lo, hi=hi)

        def gfloat(*names, default=None, **kw):
            return _float(key(*names), get(*names, default=default), **kw)

        def gbool(name, default):
            v = raw.get(name)
            return default if v is None else _bool(name, v)

        D = gint("hidden_size", "n_embd", hi=MAX_HIDDEN)
        L = gint("num_hidden_layers", "n_layer", hi=MAX_LAYERS)
        H = gint("num_attention_heads", "n_head", hi=MAX_HEADS)
        Hkv = gint("num_key_value_heads", default=H, hi=MAX_HEADS)
        if family == "llama" and raw.get("head_dim") is None and D % H:
            raise ModelLoadError(f"hidden_size={D} is not divisible by num_attention_heads={H} "
                                 "(and no head_dim is given)")
        if raw.get("head_dim") is not None:
            hd = gint("head_dim", hi=MAX_HEAD_DIM)
        elif D < H:
            raise ModelLoadError(f"hidden_size={D} is smaller than num_attention_heads={H}")
        else:
            hd = D // H
        if H % Hkv:
            raise ModelLoadError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
        rope = raw.get("rope_parameters")
        if rope is None:
            rope = {}
        if not isinstance(rope, dict):
            raise ModelLoadError(f"rope_parameters={rope!r}: must be an object")
        if raw.get("rope_theta") is not None or raw.get("rotary_emb_base") is not None:
            theta = gfloat("rope_theta", "rotary_emb_base", lo=0.0)
        else:
            theta = _float("rope_parameters.rope_theta", rope.get("rope_theta", 10000.0), lo=0.0)
        if raw.get("partial_rotary_factor") is not None or raw.get("rotary_pct") is not None:
            partial = gfloat("partial_rotary_factor", "rotary_pct", lo=0.0, hi=1.0)
        else:
            partial = _float("rope_parameters.partial_rotary_factor",
                             rope.get("partial_rotary_factor", 1.0), lo=0.0, hi=1.0)
        scaling = raw.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise ModelLoadError(f"rope_scaling={scaling!r}: must be an object")
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
                    v = scaling.get(k)
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise ModelLoadError(f"rope_scaling of type {kind!r} needs a numeric {k!r}")
                    _float(f"rope_scaling.{k}", v, lo=0.0)

        eos_ids = token_ids("eos_token_id", raw.get("eos_token_id"))
        bos = _token_id("bos_token_id", raw.get("bos_token_id"))
        dtype = get("dtype", "torch_dtype", default="float32")
        if not isinstance(dtype, str):
            raise ModelLoadError(f"{key('dtype', 'torch_dtype')}={dtype!r}: must be a string")
        dtype = dtype.replace("torch.", "")

        c = dict(model_type=mt, family=family, vocab_size=gint("vocab_size", hi=MAX_VOCAB),
                 hidden_size=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, head_dim=hd,
                 bos_token_id=bos, eos_token_ids=eos_ids,
                 torch_dtype=dtype, rope_theta=theta, rope_scaling=scaling,
                 tie_word_embeddings=gbool("tie_word_embeddings", family == "gpt2"))
        if family == "llama":
            c.update(intermediate_size=gint("intermediate_size", hi=MAX_HIDDEN),
                     max_position_embeddings=gint("max_position_embeddings", default=2048, hi=MAX_POSITIONS),
                     norm="rms", norm_eps=gfloat("rms_norm_eps", default=1e-6, lo=0.0, hi=1.0),
                     act="silu", gated_mlp=True,
                     qkv_bias=gbool("attention_bias", mt == "qwen2"),
                     o_bias=gbool("attention_bias", False),
                     mlp_bias=gbool("mlp_bias", False),
                     qk_norm=(mt == "qwen3"),
                     rotary_dim=int(hd * partial))
            act = raw.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ModelLoadError(f"hidden_act {act!r} is not supported for {mt} (supported: silu)")
            sw = raw.get("sliding_window")
            if sw is not None:
                sw = _int("sliding_window", sw, lo=0, hi=MAX_POSITIONS)
            types = raw.get("layer_types")
            if types is not None and (not isinstance(types, list) or len(types) != L
                                      or not all(isinstance(t, str) for t in types)):
                raise ModelLoadError(f"layer_types: must be a list of {L} strings (one per layer)")
            if sw and types is not None:
                c["layer_windows"] = [sw if t == "sliding_attention" else 0 for t in types]
            elif sw and mt == "mistral":
                c["layer_windows"] = [sw] * L
            elif sw and raw.get("use_sliding_window"):      # Qwen2/3: layers from max_window_layers on
                first = raw.get("max_window_layers")
                first = 0 if first is None else _int("max_window_layers", first, lo=0, hi=MAX_LAYERS)
                c["layer_windows"] = [sw if i >= first else 0 for i in range(L)]
        elif family == "gpt2":
            inner = raw.get("n_inner")
            act = raw.get("activation_function", "gelu_new")
            acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
            if not isinstance(act, str) or act not in acts:
                raise ModelLoadError(f"activation_function {act!r} is not supported for gpt2")
            if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
                raise ModelLoadError("gpt2 options scale_attn_by_inverse_layer_idx / "
                                     "reorder_and_upcast_attn are not supported")
            c.update(intermediate_size=_int("n_inner", inner, hi=MAX_HIDDEN) if inner is not None else 4 * D,
                     max_position_embeddings=gint("n_positions", "max_position_embeddings", hi=MAX_POSITIONS),
                     norm="layer", norm_eps=gfloat("layer_norm_epsilon", default=1e-5, lo=0.0, hi=1.0),
                     act=acts[act], gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                     learned_pos=True, rotary_dim=0)
        elif family == "neox":
            act = raw.get("hidden_act", "gelu")
            acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh"}
            if not isinstance(act, str) or act not in acts:
                raise ModelLoadError(f"hidden_act {act!r} is not supported for gpt_neox")
            c.update(intermediate_size=gint("intermediate_size", hi=MAX_HIDDEN),
                     max_position_embeddings=gint("max_position_embeddings", default=2048, hi=MAX_POSITIONS),
                     norm="layer", norm_eps=gfloat("layer_norm_eps", default=1e-5, lo=0.0, hi=1.0),
                     act=acts[act], gated_mlp=False,
                     qkv_bias=gbool("attention_bias", True),
                     o_bias=gbool("attention_bias", True), mlp_bias=True,
                     parallel_residual=gbool("use_parallel_residual", True),
                     rotary_dim=int(hd * partial))
        return cls(**c).validate()


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
