"""One `Config` dataclass built from a Hugging Face config.json.

Each architecture family spells its hyper-parameters differently (n_embd vs hidden_size,
rope_theta vs rope_parameters, rotary_pct vs partial_rotary_factor, torch_dtype vs dtype...).
`Config.from_hf` normalises them into one vocabulary; nothing after this module looks at the
raw dict again.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, UnsupportedModelError
from .jsonfile import read_json_object

# model_type -> family. The family decides tensor naming (weights.py) and the small switches below.
SUPPORTED = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "neox",
    # decoder-only families whose differences are plan steps (model.build_plan) over llama's tensors
    "granite": "granite",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "phi3": "phi3",
    "lfm2": "lfm2",
}
LLAMA_LIKE = ("llama", "granite", "olmo2", "smollm3", "gemma", "phi3", "lfm2")

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
    family: str                 # "llama" | "gpt2" | "neox" | "granite" | "olmo2" | "smollm3" | "gemma" | "phi3" | "lfm2"
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
    # -- architecture options (each is a plan step or a load-time weight transform; defaults = off)
    embed_scale: float = 1.0     # x = embedding * this (Granite embedding_multiplier, Gemma sqrt(D))
    residual_scale: float = 1.0  # x += branch * this (Granite residual_multiplier)
    attn_scale: float = 0.0      # attention score scale; 0 = 1/sqrt(head_dim)
    attn_softcap: float = 0.0    # scores = cap * tanh(scores / cap) (Gemma 2); 0 = off
    final_softcap: float = 0.0   # logits = cap * tanh(logits / cap) (Gemma 2); 0 = off
    logits_scaling: float = 1.0  # logits /= this (Granite)
    norm_layout: str = "pre"     # "pre" norms; "sandwich" (Gemma: pre + post norms); "post" (OLMo 2: post only)
    norm_offset: bool = False    # RMSNorm weight is (1 + w) (Gemma): folded into the weights at load
    qk_norm_full: bool = False   # OLMo 2: q/k RMSNorm over the whole projection (not per head)
    layer_rope: list[int] = field(default_factory=list)  # per layer RoPE table: 0 global, 1 local, -1 none
    rope_local_theta: float = 0.0  # base of table 1 (Gemma 3 sliding layers)
    layer_conv: list[bool] = field(default_factory=list)  # LFM2: layer is a gated short convolution
    conv_kernel: int = 0         # LFM2: the convolution's length (conv_L_cache)
    conv_bias: bool = False

    def is_conv(self, layer: int) -> bool:
        return bool(self.layer_conv) and self.layer_conv[layer]

    @property
    def n_kv_layers(self) -> int:
        """Layers with a KV cache (all but LFM2's convolution layers)."""
        return self.n_layers - sum(self.layer_conv)

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
        if self.family not in ("gpt2", "neox") + LLAMA_LIKE:
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
            if kind != "longrope":                      # LongRoPE: checked by _longrope
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
        if not path.exists():
            raise ModelLoadError(f"{path}: config.json not found")
        raw = read_json_object(path)
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
        rope_by_type = isinstance(rope.get("full_attention"), dict)   # Gemma 3: one entry per layer type
        if rope_by_type:
            rope = rope["full_attention"]
        if rope_by_type and rope.get("rope_theta") is not None:      # the global layers' entry wins
            theta = _float("rope_parameters.full_attention.rope_theta", rope["rope_theta"], lo=0.0)
        elif raw.get("rope_theta") is not None or raw.get("rotary_emb_base") is not None:
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
            kind = "longrope" if kind == "su" else kind      # Phi-3's older name for longrope
            if kind in (None, "default"):
                scaling = None
            elif kind not in ("linear", "dynamic", "llama3", "longrope"):
                raise ModelLoadError(f"rope_scaling type {kind!r} is not supported "
                                     "(supported: linear, dynamic, llama3, longrope)")
            elif kind == "longrope":
                scaling = _longrope(raw, scaling, gint("max_position_embeddings", default=2048, hi=MAX_POSITIONS),
                                    int(hd * partial))
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
        if family in LLAMA_LIKE:
            c.update(intermediate_size=gint("intermediate_size", "block_ff_dim", hi=MAX_HIDDEN),
                     max_position_embeddings=gint("max_position_embeddings", default=2048, hi=MAX_POSITIONS),
                     norm="rms", norm_eps=gfloat("rms_norm_eps", "norm_eps", default=1e-6, lo=0.0, hi=1.0),
                     act="silu", gated_mlp=True,
                     qkv_bias=gbool("attention_bias", mt == "qwen2"),
                     o_bias=gbool("attention_bias", False),
                     mlp_bias=gbool("mlp_bias", False),
                     qk_norm=(mt == "qwen3"),
                     rotary_dim=int(hd * partial))
            if family == "gemma":
                act = get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
                if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
                    raise ModelLoadError(f"hidden_activation {act!r} is not supported for {mt} "
                                         "(supported: gelu_pytorch_tanh)")
                c["act"] = "gelu_tanh"
            else:
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
            elif sw and mt == "gemma3_text":                 # older: every pattern-th layer is global
                pat = _posint(get("sliding_window_pattern", "_sliding_window_pattern", default=6),
                              "sliding_window_pattern")
                c["layer_windows"] = [0 if (i + 1) % pat == 0 else sw for i in range(L)]
            elif sw and mt == "gemma2":                       # older: even layers slide, odd are global
                c["layer_windows"] = [sw if i % 2 == 0 else 0 for i in range(L)]
            elif sw and mt in ("mistral", "phi3"):          # Phi-3 mini 4k: 2047 on every layer
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
        if family in ("granite", "olmo2", "smollm3", "gemma", "phi3", "lfm2"):
            _arch_options(mt, family, raw, c, get, raw.get("rope_parameters") if rope_by_type else None)
        return cls(**c).validate()


def _posint(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
        raise ModelLoadError(f"{name}={v!r} must be a positive integer")
    return int(v)


def _posfloat(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelLoadError(f"{name}={v!r} must be a positive number")
    return float(v)


def _longrope(raw: dict, sc: dict, max_pos: int, rot: int) -> dict:
    """Phi-3 LongRoPE: validated short/long factors, the original context and the attention
    factor, as transformers computes them (the factor from max_position_embeddings /
    original_max_position_embeddings when the latter is given)."""
    sc = dict(sc, rope_type="longrope")
    for k in ("short_factor", "long_factor"):
        f = sc.get(k)
        if not isinstance(f, list) or len(f) != rot // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f):
            raise ModelLoadError(f"rope_scaling {k!r} must be a list of {rot // 2} positive numbers "
                                 f"(rotary dimension {rot} / 2), got {f!r}")
    orig = sc.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if orig:
        orig = _posint(orig, "original_max_position_embeddings")
        factor = max_pos / orig
    else:
        orig = max_pos
        factor = _posfloat(sc.get("factor", 1.0), "rope_scaling factor")
    att = sc.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    sc.update(original_max_position_embeddings=orig, attention_factor=_posfloat(att, "rope_scaling attention_factor"))
    return sc


def _arch_options(mt: str, family: str, raw: dict, c: dict, get, rope_by_type: dict | None) -> None:
    """The config keys of Granite, OLMo 2, SmolLM3, Gemma 2/3 and Phi-3 (current and older spellings)."""
    L, hd, D = c["n_layers"], c["head_dim"], c["hidden_size"]
    num = lambda name, default: _posfloat(get(name, default=default), name)
    if raw.get("tie_word_embeddings") is None:        # the config classes' defaults (LFM2: tie_embedding)
        tie = raw.get("tie_embedding")
        c["tie_word_embeddings"] = (family in ("gemma", "smollm3", "lfm2")) if tie is None else _bool("tie_embedding", tie)
    if family == "granite":
        c.update(embed_scale=num("embedding_multiplier", 1.0), residual_scale=num("residual_multiplier", 1.0),
                 attn_scale=num("attention_multiplier", 1.0 / math.sqrt(hd)),
                 logits_scaling=num("logits_scaling", 1.0))
    elif family == "olmo2":
        c.update(norm_layout="post", qk_norm=True, qk_norm_full=True)
    elif family == "smollm3":
        use = raw.get("no_rope_layers")                # 1 = this layer uses RoPE, 0 = it does not
        if use is None:
            every = _posint(get("no_rope_layer_interval", default=4), "no_rope_layer_interval")
            use = [int((i + 1) % every != 0) for i in range(L)]
        if not isinstance(use, list) or len(use) != L or any(u not in (0, 1) for u in use):
            raise ModelLoadError(f"no_rope_layers must be a list of {L} zeros and ones, got {use!r}")
        c["layer_rope"] = [0 if u else -1 for u in use]
    elif family == "gemma":
        dt = {"bfloat16": "bfloat16", "float16": "float16"}.get(c["torch_dtype"], "float32")
        root = np.float32(math.sqrt(D))               # sqrt(D) in the weights' dtype, as transformers
        if dt == "float16":
            root = np.float32(np.float16(root))
        elif dt == "bfloat16":
            b = np.array([math.sqrt(D)], np.float32).view(np.uint32)
            root = np.array((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000, np.uint32).view(np.float32)[0]
        c.update(norm_layout="sandwich", norm_offset=True, embed_scale=float(root),
                 qk_norm=(mt == "gemma3_text"),
                 attn_scale=1.0 / math.sqrt(num("query_pre_attn_scalar", float(hd))))
        for key, name in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
            if raw.get(key) is not None:
                c[name] = _posfloat(raw[key], key)
        if mt == "gemma3_text":
            local = raw.get("rope_local_base_freq")
            if rope_by_type is not None:
                sl = rope_by_type.get("sliding_attention")
                if not isinstance(sl, dict) or sl.get("rope_type", "default") != "default":
                    raise ModelLoadError("rope_parameters['sliding_attention'] must be a default rope "
                                         f"with a rope_theta, got {sl!r}")
                local = sl.get("rope_theta", local)
            c["rope_local_theta"] = _posfloat(local if local is not None else 10000.0, "rope_local_base_freq")
            c["layer_rope"] = [1 if w else 0 for w in (c.get("layer_windows") or [0] * L)]
            if not any(c.get("layer_windows") or []):
                c["layer_rope"] = []
    elif family == "lfm2":
        types = raw.get("layer_types")
        if types is None:                              # older: the indices of the attention layers
            idx = raw.get("full_attn_idxs")
            idx = list(range(L)) if idx is None else idx
            if not isinstance(idx, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L
                                                for i in idx):
                raise ModelLoadError(f"full_attn_idxs must be a list of layer indices below {L}, got {idx!r}")
            types = ["full_attention" if i in idx else "conv" for i in range(L)]
        if not isinstance(types, list) or len(types) != L or any(t not in ("conv", "full_attention") for t in types):
            raise ModelLoadError(f"layer_types must be a list of {L} entries 'conv' or 'full_attention', "
                                 f"got {types!r}")
        F = c["intermediate_size"] = _posint(get("intermediate_size", "block_ff_dim"), "intermediate_size")
        if _bool("block_auto_adjust_ff_dim", raw.get("block_auto_adjust_ff_dim", False)):        # as transformers' Lfm2MLP sizes its hidden layer
            F = int(2 * F / 3)
            if raw.get("block_ffn_dim_multiplier") is not None:
                F = int(_posfloat(raw["block_ffn_dim_multiplier"], "block_ffn_dim_multiplier") * F)
            mult = _posint(get("block_multiple_of", default=256), "block_multiple_of")
            c["intermediate_size"] = mult * ((F + mult - 1) // mult)
        c.update(layer_conv=[t == "conv" for t in types], qk_norm=True,
                 conv_kernel=_posint(get("conv_L_cache", default=3), "conv_L_cache"),
                 conv_bias=_bool("conv_bias", raw.get("conv_bias", False)),
                 norm_eps=_posfloat(get("norm_eps", "block_norm_eps", default=1e-5), "norm_eps"))


def rope_inv_freq(cfg: Config, seq_len: int | None = None, theta: float | None = None) -> "np.ndarray":
    """Inverse frequencies [rotary_dim/2] for RoPE, with the config's rope_scaling applied.

    Follows transformers' modeling_rope_utils: linear divides positions (here: frequencies) by
    factor; llama3 rescales low frequencies smoothly; dynamic (NTK) enlarges the base once the
    sequence is longer than max_position_embeddings (seq_len = positions seen in this call);
    longrope divides by the long factors once seq_len exceeds the original context, else by the
    short ones. theta: another base without scaling (Gemma 3's local layers).
    """
    rd = cfg.rotary_dim
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type")
    if theta is not None:
        base, kind = theta, None
    if kind == "dynamic" and seq_len is not None:
        max_pos = cfg.max_position_embeddings          # as transformers' dynamic NTK does
        if seq_len > max_pos:
            f = float(sc["factor"])
            base = base * ((f * seq_len / max_pos) - (f - 1)) ** (rd / (rd - 2))
    inv = 1.0 / (base ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd))
    if kind == "longrope":
        long = seq_len is not None and seq_len > sc["original_max_position_embeddings"]
        ext = np.asarray(sc["long_factor" if long else "short_factor"], np.float32)
        inv = np.float32(1.0) / (ext * (base ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd)))
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
