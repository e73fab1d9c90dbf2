"""GGUF interop: write a model llama.cpp loads (`export_gguf`); reading is `sources.GGUFSource`
(`minilm.load("x.gguf")`, or `load_gguf` here).

Both directions use the `gguf` package (gguf-py from llama.cpp; `pip install gguf`) and the same
tables: tensor names from `sources.GGUF_NAMES` (through `gguf_layout`: row splits of the fused
wqkv / w_gate_up and llama's q/k row permutation), tensor types from `quant.FORMATS`
(`ggml_type`, `block`, `block_bytes`; `sources.ggml_bytes` writes a `Linear` in its ggml layout).

Tensor types: F32, F16, BF16, Q8_0 and Q4_0 (group 32) map one to one onto minilm's formats
f32, f16, bf16, q8_0 and q4_0: the ggml blocks (fp16 d + 32 int8, fp16 d + 16 nibble bytes) are
our `qs`/`d` arrays interleaved, so an exported file holds exactly our quantized weights and
loading it gives bit-identical logits. A matrix whose width is not a multiple of 32 (ggml
cannot block it) is written as F32 holding our exactly dequantized values; the GGUF key
`minilm.tensor_formats` records its minilm format so that loading requantizes it back
(losslessly: a Q8_0/Q4_0 block requantizes to itself).

Architectures: llama (also mistral checkpoints), qwen2, qwen3. For the llama architecture
llama.cpp uses the interleaved-pair RoPE, so attn_q/attn_k rows are stored permuted from the
HF rotate-half layout (convert_hf_to_gguf.py `LlamaModel.permute`); qwen2/qwen3 use NEOX RoPE and
are stored as is. Permuting whole rows commutes with the row-wise Q8_0/Q4_0 blocks.

Tokenizer: exported as llama.cpp metadata (tokenizer.ggml.model "llama" = SentencePiece with
tokens/scores/token types, or "gpt2" = byte-level BPE with merges and a pre-tokenizer name) plus
the original tokenizer.json under tokenizer.huggingface.json. Loading uses that JSON when
present, otherwise rebuilds a `tokenizers` tokenizer from the ggml metadata.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, UnsupportedModelError
from .mixes import PRESETS
from .quant import FORMATS, Linear
from .sources import (
    BYTE,
    CONTROL,
    GGUF_ARCHS,
    GPT2_RE,
    LLAMA3_RE,
    NORMAL,
    QWEN2_RE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    GGUFSource,
    dequant,
    ggml_bytes,
    gguf_layout,
    gguf_module,
    level_target,
    map_rows,
    permute_rows,
    sub_rows,
)

ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# levels a GGUF can hold as they are: minilm's own names and ggml's block formats by their names
GGML_LEVELS = {"q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
               "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K",
               "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
QUANTS = ("f32", "f16", "bf16", "int8", "int4", *GGML_LEVELS, *PRESETS)   # PRESETS: llama.cpp's mixes (mixes.py)
QK = 32     # the one Q4_0 group ggml has


def _to_target(lin: Linear, target: str, name: str) -> Linear:
    """Our tensor in the export format (as is when it already is)."""
    if lin.fmt == target and (target != "q4_0" or lin.group == QK):
        return lin
    if lin.fmt == "q4_0" and lin.group != QK:
        raise ValueError(f"tensor {name}: int4 with group size {lin.group} has no GGUF type "
                         "(only group 32 maps to Q4_0); export from the original checkpoint instead")
    return Linear.quantize(dequant(lin), target, QK, name=name)


def _tok_json(model) -> dict | None:
    tk = getattr(model.tokenizer, "hf", None)
    if tk is not None:
        return json.loads(tk.to_str())
    p = Path(model.source) / "tokenizer.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _find(obj, typ: str) -> list[dict]:
    """All dicts with "type" == typ inside a tokenizer.json component."""
    out = []
    if isinstance(obj, dict):
        if obj.get("type") == typ:
            out.append(obj)
        for v in obj.values():
            out += _find(v, typ)
    elif isinstance(obj, list):
        for v in obj:
            out += _find(v, typ)
    return out


def _pre_name(tj: dict) -> str:
    splits = _find(tj.get("pre_tokenizer"), "Split")
    pats = [s.get("pattern", {}).get("Regex") for s in splits]
    for name, rx in (("qwen2", QWEN2_RE), ("llama-bpe", LLAMA3_RE), ("gpt-2", GPT2_RE)):
        if rx in pats:
            return name
    if not splits and any(b.get("use_regex", True) for b in _find(tj.get("pre_tokenizer"), "ByteLevel")):
        return "gpt-2"
    return "default"


def _tokenizer_meta(model, tj: dict) -> dict:
    """tokenizer.json -> the llama.cpp tokenizer metadata."""
    m = tj["model"]
    if m.get("type") != "BPE":
        raise UnsupportedModelError(f"GGUF export: tokenizer model {m.get('type')!r} is not supported (BPE only)")
    vocab = dict(m["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    V = model.config.vocab_size
    n = max(max(vocab.values()) + 1, V)
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    for i in range(n):
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ", 1)) for x in m.get("merges", [])]
    if n > V:
        # The tokenizer knows more tokens than the model has embedding rows (e.g. a random-weight
        # checkpoint borrowing another tokenizer). llama.cpp needs exactly vocab_size tokens: keep
        # the first V and the merges that stay inside them; the model cannot emit the rest anyway.
        print(f"note: tokenizer has {n} tokens but the model's vocab_size is {V}: "
              f"the GGUF keeps the first {V}", file=sys.stderr)
        tokens = tokens[:V]
        keep = set(tokens)
        merges = [(a, b) for a, b in merges if a in keep and b in keep and a + b in keep]
        vocab = {t: i for t, i in vocab.items() if i < V}
        added = {i: a for i, a in added.items() if i < V}
    spm = bool(m.get("byte_fallback")) or bool(_find(tj.get("pre_tokenizer"), "Metaspace"))
    types = []
    for i, t in enumerate(tokens):
        a = added.get(i)
        if a is not None:
            types.append(CONTROL if a.get("special", True) else USER_DEFINED)
            if spm and t == m.get("unk_token"):
                types[-1] = UNKNOWN
        elif t.startswith("[PAD") and t not in vocab:
            types.append(UNUSED)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    meta = {"tokens": tokens, "types": types}
    if spm:
        # SentencePiece (llama.cpp "llama"): merges by the merged piece's score; HF BPE merges by rank.
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        meta["model"] = "llama"
        meta["scores"] = [0.0 if types[i] != NORMAL else
                          (-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e6))
                          for i, t in enumerate(tokens)]
        meta["unk"] = vocab.get(m.get("unk_token")) if m.get("unk_token") else None
    else:
        meta["model"] = "gpt2"
        meta["merges"] = [f"{a} {b}" for a, b in merges]
        meta["pre"] = _pre_name(tj)
    return meta


def export_gguf(model_or_path, out_path, quant: str | None = None, verbose: bool = True) -> Path:
    """Write a GGUF file llama.cpp loads. quant: f32, f16, bf16, int8 (Q8_0), int4 (Q4_0, group 32),
    or one of ggml's block formats by name (q4_k, q6_k, iq4_nl, ...); None: as the model is. A model already in that format is written without requantizing."""
    gguf = gguf_module()
    from .lm import LM

    if quant is not None and quant not in QUANTS:
        if str(quant).startswith("int4-g"):
            raise ValueError(f"quant={quant!r}: GGUF has no Q4_0 with group {quant[6:]}; only int4 "
                             "(group 32) maps to Q4_0")
        raise ValueError(f"quant={quant!r}: GGUF export supports {', '.join(QUANTS)}")
    if isinstance(model_or_path, LM):
        model = model_or_path
    else:
        from .loader import load
        model = load(model_or_path, quant=quant, n_ctx=16)
    level = quant or model.quant
    if level not in QUANTS:
        raise ValueError(f"model quant {level!r}: GGUF has no matching type (only int4 with group 32 maps "
                         "to Q4_0); pass quant= to convert")
    c = model.config
    target = level_target(c, level, None, None)             # per-tensor formats (a mix preset's own)
    arch = ARCH_OF.get(c.model_type)
    if arch not in GGUF_ARCHS or c.family != "llama":
        raise UnsupportedModelError(f"GGUF export supports llama, mistral, qwen2 and qwen3 models, "
                                    f"not {c.model_type}")
    if c.rope_scaling:
        raise UnsupportedModelError(f"GGUF export: rope_scaling {c.rope_scaling.get('rope_type')!r} "
                                    "is not supported")
    if any(c.layer_windows):
        raise UnsupportedModelError("GGUF export: sliding-window attention is not supported")
    tj = _tok_json(model)
    if tj is None:
        raise ModelLoadError(f"{model.source}: no tokenizer.json to export")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(Path(str(model.source)).name or "minilm")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    ft = gguf.LlamaFileType
    w.add_file_type({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16,
                     "int8": ft.MOSTLY_Q8_0, "int4": ft.MOSTLY_Q4_0,
                     **{k: getattr(ft, v) for k, v in GGML_LEVELS.items()},
                     **{k: ft(v) for k, (_, v) in PRESETS.items()}}[level])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tokenizer
    tm = _tokenizer_meta(model, tj)
    tok = model.tokenizer
    w.add_tokenizer_model(tm["model"])
    if tm["model"] == "gpt2":
        w.add_tokenizer_pre(tm["pre"])
    w.add_token_list(tm["tokens"])
    w.add_token_types(tm["types"])
    if "scores" in tm:
        w.add_token_scores(tm["scores"])
    if tm.get("merges"):
        w.add_token_merges(tm["merges"])
    bos = tok.bos_token_id if tok.bos_token_id is not None else c.bos_token_id
    eos_ids = list(model.eos_token_ids)
    eos_ids = [e for e in eos_ids if 0 <= int(e) < c.vocab_size]
    if bos is not None and not 0 <= int(bos) < c.vocab_size:
        bos = None
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos_ids:
        w.add_eos_token_id(int(eos_ids[0]))
    if tm.get("unk") is not None:
        w.add_unk_token_id(int(tm["unk"]))
    add_bos = tok.add_bos
    if add_bos is None:    # as the post-processor does
        add_bos = bos is not None and tok.hf.encode("", add_special_tokens=True).ids[:1] == [bos] \
            if hasattr(tok, "hf") else False
    w.add_add_bos_token(bool(add_bos))
    w.add_add_eos_token(False)
    tmpl = getattr(tok, "config", {}).get("chat_template")
    if isinstance(tmpl, str):
        w.add_chat_template(tmpl)
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, json.dumps(tj, ensure_ascii=False))
    w.add_string("minilm.quant", level)
    w.add_array("minilm.eos_token_ids", [int(e) for e in eos_ids] or [0])

    # tensors: the canonical ones, split and named by the one table (sources.GGUF_NAMES)
    T = model.tensors
    fallback, notes = {}, []
    qtype = gguf.GGMLQuantizationType
    for name, parts in gguf_layout(c, arch).items():
        t = T[name]
        if not isinstance(t, Linear):                              # vectors: F32
            for p in parts:
                a = np.ascontiguousarray(t[p.a:p.b], np.float32)
                w.add_tensor(p.gguf, permute_rows(a, p.heads) if p.heads else a)
            continue
        lin = _to_target(t, target.fmt(name), name)
        f = FORMATS[lin.fmt]
        if f.ggml_type is None:   # pragma: no cover - every export level has a ggml type
            raise ValueError(f"tensor {name}: format {lin.fmt} has no GGUF type")
        for p in parts:
            part = sub_rows(lin, p.a, p.b) if len(parts) > 1 else lin
            if p.heads:
                part = map_rows(part, lambda a, h=p.heads: permute_rows(a, h))
            if part.Kp != part.K:     # ggml cannot block this width: exact values as F32
                fallback[p.gguf] = part.fmt
                notes.append(p.gguf)
                w.add_tensor(p.gguf, dequant(part))
            else:
                w.add_tensor(p.gguf, ggml_bytes(part), raw_dtype=qtype(f.ggml_type))   # byte shape
    w.add_string("minilm.tensor_formats", json.dumps(fallback))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if notes and verbose:
        print(f"note: {len(notes)} tensor(s) have a width that is not a multiple of {QK} and cannot be "
              f"Q8_0/Q4_0 blocks in GGUF; written as F32 (our exact dequantized weights), as llama.cpp's "
              f"quantizer falls back to a float type: {', '.join(notes)}")
    return out_path


def load_gguf(path, quant: str | None = None, n_ctx: int | None = None, threads: int | None = None,
              check_weights: bool | None = None):
    """A llama / qwen2 / qwen3 GGUF file -> `LM` (what `minilm.load` does for a `.gguf` path; this
    one also takes a file named otherwise). See `sources.GGUFSource` and `minilm.load`."""
    from .loader import check_load_args, load_source
    check = check_load_args(quant, threads, None, None, check_weights)
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ModelLoadError(f"{p}: GGUF file not found")
    return load_source(GGUFSource(p, check), quant, n_ctx)
