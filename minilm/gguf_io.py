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

Architectures: every one minilm runs, under llama.cpp's names (sources.GGUF_ARCH_OF: llama (also
mistral), qwen2, qwen3, gpt2, gptneox, gemma2, gemma3, phi3, smollm3, olmo2, granite, lfm2), with
the hyper-parameters llama.cpp's loader reads for each (`_arch_meta`); a config llama.cpp's graph
cannot express is refused (`_check_exportable`). For llama, granite and smollm3 llama.cpp uses the
interleaved-pair RoPE, so attn_q/attn_k rows are stored permuted from the HF rotate-half layout
(convert_hf_to_gguf.py `LlamaModel.permute`); the others use NEOX RoPE and are stored as is.
Permuting whole rows commutes with the row-wise blocks. Gemma's norms are stored as 1 + w (as
convert_hf_to_gguf.py writes them; minilm's canonical weights already are). Where llama.cpp has
no tied head (gptneox, olmo2) the embedding is written again as output.weight. Phi-3's LongRoPE:
rope_factors_long/short tensors, the original context and the attention factor; llama.cpp picks
the long factors when its context (n_ctx) exceeds the original one, transformers and minilm when
the sequence does.

Tokenizer: exported as llama.cpp metadata (tokenizer.ggml.model "llama" = SentencePiece with
tokens/scores/token types, or "gpt2" = byte-level BPE with merges and a pre-tokenizer name) plus
the original tokenizer.json under tokenizer.huggingface.json. Loading uses that JSON when
present, otherwise rebuilds a `tokenizers` tokenizer from the ggml metadata.
"""
from __future__ import annotations

import json
import math
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
    GGUF_ARCH_OF,
    GPT2_RE,
    LLAMA3_RE,
    NORMAL,
    QWEN2_RE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    GGUFSource,
    Part,
    dequant,
    ggml_bytes,
    gguf_layout,
    gguf_module,
    level_target,
    map_rows,
    permute_rows,
    sub_rows,
)

ARCH_OF = GGUF_ARCH_OF          # model_type -> GGUF architecture
OUTPUT_REQUIRED = ("gptneox", "olmo2")     # llama.cpp needs output.weight even when the head is tied
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


def _llama_cpp_attn_scale(c) -> float:
    """The attention scale llama.cpp's gemma2 / gemma3 graphs use (they read no key for it)."""
    big = c.n_layers == (46 if c.model_type == "gemma2" else 62)     # the 27B models
    return 1.0 / math.sqrt(c.hidden_size / c.n_heads if big else c.head_dim)


def _check_exportable(c, arch: str) -> None:
    """UnsupportedModelError for a config that llama.cpp's graph for `arch` cannot express (it
    would load and compute something else)."""
    def no(what):
        raise UnsupportedModelError(f"GGUF export ({arch}): {what}; llama.cpp's {arch} graph cannot express it")
    kind = (c.rope_scaling or {}).get("rope_type")
    if kind is not None and not (arch == "phi3" and kind == "longrope"):
        no(f"rope_scaling {kind!r} is not supported")
    if any(c.layer_windows) and arch not in ("gemma2", "gemma3", "phi3"):
        no("sliding-window attention")
    if arch in ("gemma2", "gemma3"):
        win = {w for w in c.layer_windows if w}
        if len(win) > 1:
            no(f"sliding windows of several sizes {sorted(win)}")
        if abs((c.attn_scale or 1.0 / math.sqrt(c.head_dim)) - _llama_cpp_attn_scale(c)) > 1e-6 * _llama_cpp_attn_scale(c):
            no(f"attention scale {c.attn_scale} (query_pre_attn_scalar) differs from llama.cpp's "
               f"{_llama_cpp_attn_scale(c)}")
        if arch == "gemma3" and c.attn_softcap:
            no("attention soft-capping on gemma3")
        if arch == "gemma2" and not c.tie_word_embeddings:
            no("an untied lm head on gemma2")
    if arch == "smollm3" and c.layer_rope and c.layer_rope != [0 if (i + 1) % 4 else -1 for i in range(c.n_layers)]:
        no("layers without RoPE other than every 4th (llama.cpp fixes no_rope_layer_interval = 4)")
    if arch == "lfm2" and c.conv_bias:
        no("convolution biases (conv_bias)")
    if arch == "phi3" and len({w for w in c.layer_windows}) > 1:
        no("per-layer sliding windows")


def _arch_meta(w, c, arch: str) -> None:
    """The hyper-parameters as llama.cpp's loader for `arch` reads them (llama-model.cpp and
    src/models/<arch>.cpp at 0c1e570)."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_heads)
    if arch == "lfm2":       # convolution layers have no kv heads: llama.cpp's marker of a recurrent layer
        w.add_head_count_kv([0 if c.is_conv(i) else c.n_kv_heads for i in range(c.n_layers)])
        w.add_shortconv_l_cache(c.conv_kernel)
    else:
        w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if c.rotary_dim:
        w.add_rope_dimension_count(c.rotary_dim)
        w.add_rope_freq_base(c.rope_theta)
    if c.norm == "layer":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == "gptneox":
        w.add_parallel_residual(bool(c.parallel_residual))
    if arch in ("gemma2", "gemma3"):
        win = max(c.layer_windows or [0])
        if win:
            w.add_sliding_window(win)
            w.add_sliding_window_pattern([bool(x) for x in c.layer_windows])
            if arch == "gemma3" and c.rope_local_theta:
                w.add_rope_freq_base_swa(c.rope_local_theta)
        if c.attn_softcap:
            w.add_attn_logit_softcapping(c.attn_softcap)
        if c.final_softcap:
            w.add_final_logit_softcapping(c.final_softcap)
    if arch == "phi3":
        w.add_sliding_window(max(c.layer_windows or [0]))    # llama.cpp ignores it (as convert writes it)
        sc = c.rope_scaling or {}
        if sc.get("rope_type") == "longrope":
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
            w.add_rope_scaling_attn_factors(float(sc["attention_factor"]))
    if arch == "granite":
        w.add_embedding_scale(c.embed_scale)
        w.add_residual_scale(c.residual_scale)
        w.add_attention_scale(c.attn_scale or 1.0 / math.sqrt(c.head_dim))
        w.add_logit_scale(c.logits_scaling)


def export_gguf(model_or_path, out_path, quant: str | None = None, verbose: bool = True,
                name: str | None = None) -> Path:
    """Write a GGUF file llama.cpp loads. quant: f32, f16, bf16, int8 (Q8_0), int4 (Q4_0, group 32),
    or one of ggml's block formats by name (q4_k, q6_k, iq4_nl, ...); None: as the model is. A model already in that format is written without requantizing.
    name: general.name (default: the model folder's name). llama.cpp 0c1e570 sets Phi-3 token
    attributes when general.name contains "phi3" / "phi-3" and then needs the tokens </s>, <unk>
    and <s> in the vocabulary (it fails to load the file otherwise)."""
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
    if arch is None:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(sorted(ARCH_OF))} models, not {c.model_type}")
    _check_exportable(c, arch)
    tj = _tok_json(model)
    if tj is None:
        raise ModelLoadError(f"{model.source}: no tokenizer.json to export")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(name or Path(str(model.source)).name or "minilm")
    _arch_meta(w, c, arch)
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
    layout = gguf_layout(c, arch)
    if c.tie_word_embeddings and arch in OUTPUT_REQUIRED:     # llama.cpp loads no tied head for these
        layout["output"] = [Part("output.weight", "tok_embd", 0, c.vocab_size, c.hidden_size, None)]
    for name, parts in layout.items():
        t = T[parts[0].canon]
        if not isinstance(t, Linear):                              # vectors: F32
            for p in parts:
                a = np.ascontiguousarray(t[p.a:p.b], np.float32)
                a = permute_rows(a, p.heads) if p.heads else a
                w.add_tensor(p.gguf, a.reshape(-1, p.cols) if p.cols else a)
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
    sc = c.rope_scaling or {}
    if sc.get("rope_type") == "longrope":                   # Phi-3: one pair of factor tensors
        for k in ("long", "short"):
            w.add_tensor(f"rope_factors_{k}.weight", np.asarray(sc[f"{k}_factor"], np.float32))
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
