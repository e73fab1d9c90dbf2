"""llama.cpp's per-tensor quantization mixes (the `_S` / `_M` / `_L` presets of llama-quantize).

A preset names a default ggml type and rules that give some tensors more bits: the value
projection (attn_v) and the MLP's down projection (ffn_down) in chosen layers, the attention
output, and the lm head (output.weight, Q6_K). The rules below are written from llama.cpp's
`llama_tensor_get_type` (src/llama-quant.cpp, commit 0c1e570) for dense (non-MoE) models; they
are the one description the loader (`minilm.load(..., quant="q4_k_m")`), pre-quantized folders
and GGUF export all read.

    preset   default  attn_v                      ffn_down                      attn_output  output
    q2_k     Q2_K     Q4_K if n_gqa >= 4 else Q3_K  Q3_K                        Q3_K         Q6_K
    q3_k_s   Q3_K     -                           -                             -            Q6_K
    q3_k_m   Q3_K     Q5_K (first 2) else Q4_K    Q5_K (i < n/16) else Q4_K     Q4_K         Q6_K
    q3_k_l   Q3_K     Q5_K                        Q5_K                          Q5_K         Q6_K
    q4_k_s   Q4_K     Q5_K (first 4)              Q5_K (i < n/8)                -            Q6_K
    q4_k_m   Q4_K     Q6_K (more_bits)            Q6_K (more_bits)              -            Q6_K
    q5_k_s   Q5_K     -                           -                             -            Q6_K
    q5_k_m   Q5_K     Q6_K (more_bits)            Q6_K (more_bits)              -            Q6_K

more_bits(i, n): the first n/8 layers, the last n/8, and every third layer in between. The
token embedding takes the default type (the lm head's type when the embedding is tied to it,
as llama.cpp quantizes the shared tensor as the output). The lm head takes Q8_0 instead of Q6_K
when its width is not a multiple of the default type's block. A tensor whose width is not a
multiple of its type's block falls back (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; F16 when even the 32-block does not fit), as llama.cpp does.

minilm fuses q/k/v into one matrix (wqkv) and gate/up into one (w_gate_up), and one matrix has
one format: a fused matrix takes the type of most bits among its parts (q4_k_m's bumped attn_v
layers give wqkv Q6_K for q and k too). That costs a few percent of size against llama.cpp's
file and never less precision. Rules for MoE models, Falcon and 70B-class models do not apply
to the architectures minilm runs and are left out.
"""
from __future__ import annotations

import re

from .quant import FALLBACK, FORMATS, PRESETS

# preset -> (default format, llama.cpp's LLAMA_FTYPE (general.file_type in GGUF))
# PRESETS (quant.py): preset name -> (its base ggml type, llama.cpp's LLAMA_FTYPE_MOSTLY_* value)

# canonical matrix (weights.py) -> llama.cpp's tensor roles of its row parts
ROLES = {"tok_embd": ("token_embd",), "output": ("output",), "wqkv": ("attn_q", "attn_k", "attn_v"),
         "wo": ("attn_output",), "w_gate_up": ("ffn_gate", "ffn_up"), "w_up": ("ffn_up",),
         "w_down": ("ffn_down",)}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth of the layers, every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _rule(preset: str, role: str, i: int, n: int, i_v: int, n_v: int, n_gqa: int, K: int, tied: bool) -> str:
    """The type the preset's rules give one tensor before the width fallback. i / n: its layer and
    the number of layers; i_v / n_v: its index among the attn_v tensors and their count."""
    default = PRESETS[preset][0]
    if role == "output" or (tied and role == "token_embd"):
        if K % FORMATS[default].block:
            return "q8_0"
        return "q6_k" if default != "q8_0" else "q8_0"
    if role == "attn_v":
        if preset == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if preset == "q3_k_m":
            return "q5_k" if i_v < 2 else "q4_k"
        if preset == "q3_k_l":
            return "q5_k"
        if preset in ("q4_k_m", "q5_k_m") and more_bits(i_v, n_v):
            return "q6_k"
        if preset == "q4_k_s" and i_v < 4:
            return "q5_k"
    elif role == "ffn_down":
        if preset == "q2_k":
            return "q3_k"
        if preset == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if preset == "q3_k_l":
            return "q5_k"
        if preset in ("q4_k_m", "q5_k_m") and more_bits(i, n):
            return "q6_k"
        if preset == "q4_k_s" and i < n // 8:
            return "q5_k"
    elif role == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(preset, default)
    return default


def width_fallback(fmt: str, K: int) -> str:
    """The type a K-wide tensor gets instead of `fmt` (itself when K is a multiple of its block)."""
    if K % FORMATS[fmt].block == 0:
        return fmt
    fb = FALLBACK.get(fmt, fmt)                                     # llama.cpp's, in quant.py
    return fb if K % FORMATS[fb].block == 0 else "f16"


def tensor_type(preset: str, role: str, layer: int, cfg, K: int) -> tuple[str, str]:
    """(type, type before the width fallback) of one of llama.cpp's tensors (role: token_embd,
    output, attn_q/k/v, attn_output, ffn_gate/up/down) in layer `layer` of a model `cfg`."""
    if preset not in PRESETS:
        raise ValueError(f"quant={preset!r}: not a llama.cpp mix preset (known: {', '.join(PRESETS)})")
    attn = [j for j in range(cfg.n_layers) if not cfg.is_conv(j)]      # layers with an attn_v
    i_v = attn.index(layer) if layer in attn else 0
    want = _rule(preset, role, layer, cfg.n_layers, i_v, len(attn), cfg.n_heads // cfg.n_kv_heads, K,
                 cfg.tie_word_embeddings)
    return width_fallback(want, K), want


def _split(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"l(\d+)\.(.+)", name)
    return (m.group(2), int(m.group(1))) if m else (name, 0)


def mix_formats(preset: str, cfg) -> dict[str, str]:
    """Canonical matrix name -> minilm format for every matrix of `cfg` under `preset` (a fused
    matrix: the type of most bits among its parts; LFM2's convolution projections: the default)."""
    from .weights import canonical_shapes, is_matrix
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        if not is_matrix(name) or name == "pos_embd":
            continue
        key, i = _split(name)
        roles = ROLES[key] if not (key in ("wqkv", "wo") and cfg.is_conv(i)) else ("other",)
        types = [tensor_type(preset, r, i, cfg, shape[1])[0] for r in roles]
        out[name] = max(types, key=lambda f: FORMATS[f].bits())
    return out


def fallbacks(preset: str, cfg) -> list[str]:
    """'name: wanted -> got' for every matrix whose width made it fall back."""
    from .weights import canonical_shapes, is_matrix
    notes = []
    for name, shape in canonical_shapes(cfg).items():
        if not is_matrix(name) or name == "pos_embd":
            continue
        key, i = _split(name)
        roles = ROLES[key] if not (key in ("wqkv", "wo") and cfg.is_conv(i)) else ("other",)
        for r in roles:
            got, want = tensor_type(preset, r, i, cfg, shape[1])
            if got != want:
                notes.append(f"{name} ({r}): {want} -> {got} (K={shape[1]})")
                break
    return notes


def gguf_role(gguf_name: str) -> tuple[str, int]:
    """llama.cpp's role and layer of a GGUF tensor name ('blk.3.attn_v.weight' -> ('attn_v', 3))."""
    if gguf_name == "token_embd.weight":
        return "token_embd", 0
    if gguf_name == "output.weight":
        return "output", 0
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m:
        return "other", 0
    return m.group(2), int(m.group(1))


def mix_summary(quant: str, cfg, tensors: dict) -> list[str]:
    """Summary lines of a model loaded with a mix preset: the types its matrices took (counts)
    and the tensors that fell back for their width (nothing for other levels)."""
    if quant not in PRESETS:
        return []
    from collections import Counter

    from .quant import Linear
    n = Counter(t.fmt for k, t in tensors.items() if isinstance(t, Linear) and k != "pos_embd")
    lines = [f"  llama.cpp mix {quant}: " + ", ".join(f"{f} x{c}" for f, c in sorted(n.items()))]
    fb = fallbacks(quant, cfg)
    if fb:
        lines.append(f"  fell back for width (as llama.cpp): {'; '.join(fb)}")
    return lines
