"""GGUF interop: write a model llama.cpp loads (`export_gguf`), read llama.cpp GGUF files (`load_gguf`).

Both directions use the `gguf` package (gguf-py from llama.cpp; `pip install gguf`).

Tensor types: F32, F16, BF16, Q8_0 and Q4_0 (group 32) map one to one onto minilm's formats
f32, f16, bf16, q8_0 and q4_0: the ggml blocks (fp16 d + 32 int8, fp16 d + 16 nibble bytes) are
our `qs`/`d` arrays interleaved, so an exported file holds exactly our quantized weights and
`load_gguf` of it gives bit-identical logits. A matrix whose width is not a multiple of 32 (ggml
cannot block it) is written as F32 holding our exactly dequantized values; the GGUF key
`minilm.tensor_formats` records its minilm format so that `load_gguf` requantizes it back
(losslessly: a Q8_0/Q4_0 block requantizes to itself).

Architectures: llama (also mistral checkpoints), qwen2, qwen3. For the llama architecture
llama.cpp uses the interleaved-pair RoPE, so attn_q/attn_k rows are stored permuted from the
HF rotate-half layout (convert_hf_to_gguf.py `LlamaModel.permute`); qwen2/qwen3 use NEOX RoPE and
are stored as is. Permuting whole rows commutes with the row-wise Q8_0/Q4_0 blocks.

Tokenizer: exported as llama.cpp metadata (tokenizer.ggml.model "llama" = SentencePiece with
tokens/scores/token types, or "gpt2" = byte-level BPE with merges and a pre-tokenizer name) plus
the original tokenizer.json under tokenizer.huggingface.json. `load_gguf` uses that JSON when
present, otherwise rebuilds a `tokenizers` tokenizer from the ggml metadata.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .config import Config
from .errors import ModelLoadError, NonFiniteWeightsError, UnsupportedModelError
from .quant import FORMATS, Linear, parse_level

ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
QUANTS = ("f32", "f16", "bf16", "int8", "int4")
QK = 32
# GGML type name -> minilm format
GGML_TO_FMT = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0"}

# GPT-2 style pre-tokenizer regexes, by llama.cpp's tokenizer.ggml.pre name
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEX = {"gpt-2": _GPT2_RE, "default": _GPT2_RE, "qwen2": _QWEN2_RE, "llama-bpe": _LLAMA3_RE,
             "smollm": None}   # None: ByteLevel's own (GPT-2) regex

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


# ---- row layouts ---------------------------------------------------------------------------------
def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved-pair rows (convert_hf_to_gguf LlamaModel.permute)."""
    rest = a.shape[1:]
    hd = a.shape[0] // n_head
    return np.ascontiguousarray(a.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(a.shape))


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`."""
    rest = a.shape[1:]
    hd = a.shape[0] // n_head
    return np.ascontiguousarray(a.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(a.shape))


def _sub(lin: Linear, a: int, b: int) -> Linear:
    """Rows a:b of a Linear, same format."""
    return Linear(lin.fmt, b - a, lin.K, {k: np.ascontiguousarray(v[a:b]) for k, v in lin.arrays.items()}, lin.Kp)


def _map_rows(lin: Linear, f) -> Linear:
    return Linear(lin.fmt, lin.N, lin.K, {k: f(v) for k, v in lin.arrays.items()}, lin.Kp)


def _cat(lins: list[Linear]) -> Linear:
    fmts = {(l.fmt, l.Kp, l.group) for l in lins}
    if len(fmts) == 1:
        l0 = lins[0]
        arrays = {k: np.ascontiguousarray(np.concatenate([l.arrays[k] for l in lins], axis=0)) for k in l0.arrays}
        return Linear(l0.fmt, sum(l.N for l in lins), l0.K, arrays, l0.Kp)
    # mixed formats: keep exact values in f32
    w = np.concatenate([_dequant(l) for l in lins], axis=0)
    return Linear.quantize(w, "f32")


def _dequant(lin: Linear) -> np.ndarray:
    """f32[N, K], exactly the values the format stores."""
    return np.ascontiguousarray(FORMATS[lin.fmt].unpack(lin.arrays)[:, :lin.K], dtype=np.float32)


# ---- export --------------------------------------------------------------------------------------
def _ggml_blocks(lin: Linear) -> np.ndarray:
    """Our Q8_0 / Q4_0 arrays -> uint8[N, nb * block bytes] in ggml's interleaved block layout."""
    N, nb = lin.N, lin.Kp // QK
    d = np.ascontiguousarray(lin.arrays["d"], dtype=np.float16).view(np.uint8).reshape(N, nb, 2)
    qs = np.ascontiguousarray(lin.arrays["qs"]).view(np.uint8)
    per = QK if lin.fmt == "q8_0" else QK // 2
    out = np.empty((N, nb, 2 + per), np.uint8)
    out[:, :, :2] = d
    out[:, :, 2:] = qs.reshape(N, nb, per)
    return out.reshape(N, nb * (2 + per))


def _to_target(lin: Linear, target: str, name: str) -> Linear:
    """Our tensor in the export format (as is when it already is)."""
    if lin.fmt == target and (target != "q4_0" or lin.group == QK):
        return lin
    if lin.fmt == "q4_0" and lin.group != QK:
        raise ValueError(f"tensor {name}: int4 with group size {lin.group} has no GGUF type "
                         "(only group 32 maps to Q4_0); export from the original checkpoint instead")
    return Linear.quantize(_dequant(lin), target, QK, name=name)


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
    for name, rx in (("qwen2", _QWEN2_RE), ("llama-bpe", _LLAMA3_RE), ("gpt-2", _GPT2_RE)):
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
    """Write a GGUF file llama.cpp loads. quant: f32, f16, bf16, int8 (Q8_0), int4 (Q4_0, group 32);
    None: as the model is. A model already in that format is written without requantizing."""
    gguf = _gguf()
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
    mat_fmt, emb_fmt, _ = parse_level(level)
    c = model.config
    arch = ARCH_OF.get(c.model_type)
    if arch is None or c.family != "llama":
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
                     "int8": ft.MOSTLY_Q8_0, "int4": ft.MOSTLY_Q4_0}[level])
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

    # tensors
    T = model.tensors
    fallback, notes = {}, []
    qtype = gguf.GGMLQuantizationType

    def put_matrix(gname: str, lin: Linear, target: str, cname: str, rows=None, n_head=None):
        lin = _to_target(lin, target, cname)
        if rows is not None:
            lin = _sub(lin, *rows)
        if n_head is not None:
            lin = _map_rows(lin, lambda a: permute_rows(a, n_head))
        if lin.fmt in ("q8_0", "q4_0"):
            if lin.Kp != lin.K:     # ggml cannot block this width: exact values as F32
                fallback[gname] = lin.fmt
                notes.append(gname)
                w.add_tensor(gname, _dequant(lin))
            else:
                w.add_tensor(gname, _ggml_blocks(lin), raw_dtype=qtype.Q8_0 if lin.fmt == "q8_0" else qtype.Q4_0)
        elif lin.fmt == "f32":
            w.add_tensor(gname, np.ascontiguousarray(lin.arrays["w"][:, :lin.K], np.float32))
        elif lin.fmt == "f16":
            w.add_tensor(gname, np.ascontiguousarray(lin.arrays["w"][:, :lin.K], np.float16))
        elif lin.fmt == "bf16":
            a = np.ascontiguousarray(lin.arrays["w"][:, :lin.K], np.uint16)
            w.add_tensor(gname, a.view(np.uint8), raw_shape=a.shape, raw_dtype=qtype.BF16)
        else:  # pragma: no cover
            raise ValueError(f"tensor {cname}: format {lin.fmt} has no GGUF type")

    def put_vec(gname, a, n_head=None):
        a = np.ascontiguousarray(a, np.float32)
        w.add_tensor(gname, permute_rows(a, n_head) if n_head else a)

    llama = arch == "llama"
    q, kv, F = c.q_dim, c.kv_dim, c.intermediate_size
    put_matrix("token_embd.weight", T["tok_embd"], emb_fmt, "tok_embd")
    for i in range(c.n_layers):
        b = f"blk.{i}."
        put_vec(b + "attn_norm.weight", T[f"l{i}.attn_norm.w"])
        wqkv = T[f"l{i}.wqkv"]
        put_matrix(b + "attn_q.weight", wqkv, mat_fmt, f"l{i}.wqkv", (0, q), c.n_heads if llama else None)
        put_matrix(b + "attn_k.weight", wqkv, mat_fmt, f"l{i}.wqkv", (q, q + kv), c.n_kv_heads if llama else None)
        put_matrix(b + "attn_v.weight", wqkv, mat_fmt, f"l{i}.wqkv", (q + kv, q + 2 * kv))
        if f"l{i}.bqkv" in T:
            bq = T[f"l{i}.bqkv"]
            put_vec(b + "attn_q.bias", bq[:q], c.n_heads if llama else None)
            put_vec(b + "attn_k.bias", bq[q:q + kv], c.n_kv_heads if llama else None)
            put_vec(b + "attn_v.bias", bq[q + kv:])
        if c.qk_norm:
            put_vec(b + "attn_q_norm.weight", T[f"l{i}.q_norm"])
            put_vec(b + "attn_k_norm.weight", T[f"l{i}.k_norm"])
        put_matrix(b + "attn_output.weight", T[f"l{i}.wo"], mat_fmt, f"l{i}.wo")
        if f"l{i}.bo" in T:
            put_vec(b + "attn_output.bias", T[f"l{i}.bo"])
        put_vec(b + "ffn_norm.weight", T[f"l{i}.ffn_norm.w"])
        gu = T[f"l{i}.w_gate_up"]
        put_matrix(b + "ffn_gate.weight", gu, mat_fmt, f"l{i}.w_gate_up", (0, F))
        put_matrix(b + "ffn_up.weight", gu, mat_fmt, f"l{i}.w_gate_up", (F, 2 * F))
        put_matrix(b + "ffn_down.weight", T[f"l{i}.w_down"], mat_fmt, f"l{i}.w_down")
        if f"l{i}.b_gate_up" in T:
            put_vec(b + "ffn_gate.bias", T[f"l{i}.b_gate_up"][:F])
            put_vec(b + "ffn_up.bias", T[f"l{i}.b_gate_up"][F:])
            put_vec(b + "ffn_down.bias", T[f"l{i}.b_down"])
    put_vec("output_norm.weight", T["out_norm.w"])
    if "output" in T and T["output"] is not T["tok_embd"]:
        put_matrix("output.weight", T["output"], emb_fmt, "output")
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


# ---- load ----------------------------------------------------------------------------------------
def _open_reader(gguf, path: Path):
    """gguf.GGUFReader with the tensors' data ranges checked first, so a truncated file names the
    tensor whose data is cut off (gguf-py itself fails with a bare reshape error)."""

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            try:
                size = len(self.data)
                for field in fields:
                    _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                    name = bytes(name_data).decode("utf-8", "replace")
                    qt = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                    bs, ts = gguf.GGML_QUANT_SIZES[qt]
                    n = 1
                    for d in dims.tolist():
                        n *= int(d)
                    end = int(start_offs) + int(offset_tensor[0]) + n * ts // bs
                    if end > size:
                        raise ModelLoadError(f"{path}: tensor {name!r}: data is truncated (ends at byte "
                                             f"{end}, the file has {size} bytes)")
            except ModelLoadError:
                raise
            except Exception:  # noqa: BLE001 - layout not as expected: let gguf-py report it
                pass
            return super()._build_tensors(start_offs, fields)

    try:
        return Reader(str(path), "c")   # copy-on-write: writeable views, one kernel signature
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct errors/... for bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


class _Meta:
    def __init__(self, reader, path):
        self.r, self.path = reader, path

    def get(self, key, default=None):
        f = self.r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001 - gguf-py raises assorted errors for malformed fields
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is malformed ({type(e).__name__})") from None

    def need(self, key):
        v = self.get(key)
        if v is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is missing")
        return v

    def int_(self, key, default=None):
        """An integer metadata value (ModelLoadError naming the key when it is another type)."""
        v = self.get(key, default) if default is not None else self.need(key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key}={v!r} must be an integer")
        return int(v)

    def num(self, key, default=None):
        """A numeric metadata value (finite checks are Config's)."""
        v = self.get(key, default) if default is not None else self.need(key)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key}={v!r} must be a number")
        return float(v)

    def str_(self, key, default=None):
        v = self.get(key, default)
        if v is not None and not isinstance(v, str):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key}={v!r} must be a string")
        return v


def _dims(t, path) -> list[int]:
    try:
        dims = [int(x) for x in t.shape]          # ggml order: ne0 (= K) first
    except (TypeError, ValueError):
        raise ModelLoadError(f"{path}: tensor {t.name!r} has unreadable dimensions") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 4:
        raise ModelLoadError(f"{path}: tensor {t.name!r} has dimensions {dims}: expected 1 to 4 positive sizes")
    return dims


def _check_data(t, path, nbytes: int):
    """The tensor's bytes: exactly nbytes present in the file (else 'truncated', naming it)."""
    data = t.data
    have = int(getattr(data, "nbytes", 0))
    if have != nbytes:
        raise ModelLoadError(f"{path}: tensor {t.name!r}: truncated or inconsistent data ({have} bytes "
                             f"in the file, {nbytes} expected from its type and dimensions)")
    return data


def _tensor_linear(t, path, check_weights: bool = False) -> Linear:
    from .safetensors_io import check_finite
    tn = t.tensor_type.name
    fmt = GGML_TO_FMT.get(tn)
    if fmt is None:
        raise ModelLoadError(f"{path}: tensor {t.name!r} has GGML type {tn}, which minilm does not run "
                             f"(supported: {', '.join(GGML_TO_FMT)}); convert the model with llama.cpp "
                             f"to one of those types (e.g. llama-quantize --pure ... Q8_0)")
    dims = _dims(t, path)
    K = dims[0]
    N = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
    where = f"{path}: tensor {t.name!r}"
    if fmt in ("f32", "f16", "bf16"):
        item = 4 if fmt == "f32" else 2
        data = _check_data(t, path, N * K * item)
        if fmt == "f32":
            w = np.asarray(data, np.float32).reshape(N, K)
        elif fmt == "f16":
            w = np.asarray(data, np.float16).reshape(N, K)
        else:
            w = np.ascontiguousarray(data).view(np.uint16).reshape(N, K)
        if check_weights:
            check_finite(w, where, bf16=fmt == "bf16")
        return Linear(fmt, N, K, {"w": w})
    if K % QK:
        raise ModelLoadError(f"{where}: {tn} needs a row length that is a multiple of {QK}, got {K}")
    nb = K // QK
    per = QK if fmt == "q8_0" else QK // 2
    data = _check_data(t, path, N * nb * (2 + per))
    blocks = np.asarray(data, np.uint8).reshape(N, nb, 2 + per)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(N, nb)
    if check_weights:
        check_finite(d, f"{where} (block scales)")
    qs = np.ascontiguousarray(blocks[:, :, 2:]).reshape(N, nb * per)
    if fmt == "q8_0":
        qs = qs.view(np.int8)
    return Linear(fmt, N, K, {"qs": qs, "d": d})


def _tensor_vec(t, path, n: int | None = None, check_weights: bool = False) -> np.ndarray:
    from .safetensors_io import check_finite
    tn = t.tensor_type.name
    if tn not in ("F32", "F16", "BF16"):
        raise ModelLoadError(f"{path}: tensor {t.name!r} has GGML type {tn}; "
                             "1-D tensors must be F32, F16 or BF16")
    dims = _dims(t, path)
    size = int(np.prod(dims, dtype=np.int64))
    if n is not None and size != n:
        raise ModelLoadError(f"{path}: tensor {t.name!r} has {size} elements (dimensions {dims}), expected {n}")
    data = _check_data(t, path, size * (4 if tn == "F32" else 2))
    if tn == "BF16":
        u = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        a = u.view(np.float32).reshape(-1)
    else:
        a = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
    if check_weights:
        check_finite(a, f"{path}: tensor {t.name!r}")
    return a


def _config_from_gguf(m: _Meta, arch: str, tensors: dict) -> Config:
    a = arch
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError(f"{m.path}: tensor 'token_embd.weight' is missing")
    D = m.int_(f"{a}.embedding_length")
    H = m.int_(f"{a}.attention.head_count")
    hkv = m.get(f"{a}.attention.head_count_kv", H)
    if isinstance(hkv, list):
        raise ModelLoadError(f"{m.path}: per-layer head_count_kv is not supported")
    hkv = m.int_(f"{a}.attention.head_count_kv", H)
    hd = m.int_(f"{a}.attention.key_length", D // H if H > 0 else 0)
    edims = _dims(emb, m.path)
    V = edims[1] if len(edims) > 1 else None
    raw = {
        "model_type": a,
        "hidden_size": D,
        "num_hidden_layers": m.int_(f"{a}.block_count"),
        "num_attention_heads": H,
        "num_key_value_heads": hkv,
        "head_dim": hd,
        "intermediate_size": m.int_(f"{a}.feed_forward_length"),
        "max_position_embeddings": m.int_(f"{a}.context_length", 2048),
        "rms_norm_eps": m.num(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m.num(f"{a}.rope.freq_base", 10000.0),
        "vocab_size": m.int_(f"{a}.vocab_size", V),
        "tie_word_embeddings": "output.weight" not in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("minilm.eos_token_ids") or m.get("tokenizer.ggml.eos_token_id"),
    }
    if a != "qwen2":
        raw["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if a == "llama" and "blk.0.attn_output.bias" not in tensors and raw["attention_bias"]:
        raise ModelLoadError(f"{m.path}: q/k/v biases without an output bias are not supported for llama")
    rd = m.int_(f"{a}.rope.dimension_count", hd)
    if rd != hd:
        if hd < 1:
            raise ModelLoadError(f"{m.path}: GGUF metadata {a}.attention.key_length={hd} must be positive")
        raw["partial_rotary_factor"] = rd / hd
    st = m.get(f"{a}.rope.scaling.type")
    if st not in (None, "none"):
        if st != "linear":
            raise ModelLoadError(f"{m.path}: rope scaling {st!r} is not supported (linear only)")
        raw["rope_scaling"] = {"rope_type": "linear", "factor": m.num(f"{a}.rope.scaling.factor")}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{m.path}: rope frequency factors (rope_freqs.weight) are not supported")
    try:
        return Config.from_hf(raw)
    except ModelLoadError as e:
        raise type(e)(f"{m.path}: {e}") from None


def build_tokenizer_json(m: _Meta) -> str:
    """A `tokenizers` tokenizer (as JSON) from llama.cpp's tokenizer.ggml.* metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    kind = m.get("tokenizer.ggml.model")
    tokens = m.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelLoadError(f"{m.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    types = m.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    bos = m.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(m.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if kind == "llama":
        scores = m.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk_id = m.get("tokenizer.ggml.unknown_token_id", 0)
        merges = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty != NORMAL or len(t) < 2:
                continue
            local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
            local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
            merges += [(a, b, scores[i]) for a, b in local]
        merges.sort(key=lambda x: -x[2])        # stable: ties keep vocab order
        model = models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=tokens[unk_id],
                           fuse_unk=True, byte_fallback=True)
        tk = Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    elif kind == "gpt2":
        raw_merges = m.get("tokenizer.ggml.merges") or []
        merges = [tuple(x.split(" ", 1)) for x in raw_merges]
        model = models.BPE(vocab, merges, byte_fallback=False, fuse_unk=False)
        tk = Tokenizer(model)
        pre = m.get("tokenizer.ggml.pre", "default")
        rx = PRE_REGEX.get(pre, _GPT2_RE)
        if pre == "qwen2":
            tk.normalizer = normalizers.NFC()
        if rx is None:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(rx), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
    else:
        raise ModelLoadError(f"{m.path}: tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")
    tk.add_special_tokens(specials)
    if user:
        tk.add_tokens(user)
    post = []
    if add_bos and bos is not None:
        post.append(processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                  special_tokens=[(tokens[bos], int(bos))]))
    if kind == "gpt2":
        post.insert(0, processors.ByteLevel(trim_offsets=False))
    if post:
        tk.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tk.to_str()


def _make_tokenizer(m: _Meta, cfg: Config, use_hf_json: bool = True):
    from .tokenizer import Tokenizer
    tj = m.get("tokenizer.huggingface.json") if use_hf_json else None
    if tj is None:
        tj = build_tokenizer_json(m)
    tokens = m.get("tokenizer.ggml.tokens") or []
    tc = {}
    bos, eos = m.get("tokenizer.ggml.bos_token_id"), m.get("tokenizer.ggml.eos_token_id")
    if bos is not None and bos < len(tokens):
        tc["bos_token"] = tokens[bos]
    if eos is not None and eos < len(tokens):
        tc["eos_token"] = tokens[eos]
    if m.get("tokenizer.ggml.add_bos_token") is not None:
        tc["add_bos_token"] = bool(m.get("tokenizer.ggml.add_bos_token"))
    if m.get("tokenizer.chat_template") is not None:
        tc["chat_template"] = m.get("tokenizer.chat_template")
    with tempfile.TemporaryDirectory(prefix="minilm-gguf-") as d:
        Path(d, "tokenizer.json").write_text(tj, encoding="utf-8")
        Path(d, "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
        return Tokenizer(Path(d), cfg.bos_token_id, cfg.eos_token_ids, model_vocab_size=cfg.vocab_size)


def load_gguf(path, quant: str | None = None, n_ctx: int | None = None, threads: int | None = None,
              check_weights: bool | None = None):
    """A llama / qwen2 / qwen3 GGUF file (F32, F16, BF16, Q8_0, Q4_0 tensors) -> `LM`.

    quant: None keeps the stored types; another level requantizes float tensors (a file that is
    already quantized loads only as stored). Every tensor is checked against the config from the
    metadata (type, dimensions, data present) before the model is built; float data (and the
    Q8_0/Q4_0 block scales) are checked for NaN/Inf unless check_weights=False (see minilm.load)."""
    gguf = _gguf()
    from .loader import build_lm, check_context_memory, check_n_ctx, weight_check_enabled

    if threads is not None:
        import numba
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer")
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    check = weight_check_enabled(check_weights)
    if quant is not None and not isinstance(quant, str):
        raise ValueError(f"quant={quant!r}: must be a string such as 'int8' or 'int4'")
    path = Path(os.path.expanduser(str(path)))
    reader = _open_reader(gguf, path)
    m = _Meta(reader, path)
    arch = m.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    "(supported: llama, qwen2, qwen3)")
    gt = {t.name: t for t in reader.tensors}
    for t in reader.tensors:                        # unsupported types: fail before any work
        if t.tensor_type.name not in GGML_TO_FMT:
            _tensor_linear(t, path)
    cfg = _config_from_gguf(m, arch, gt)
    n_ctx = check_n_ctx(cfg, n_ctx, path)
    from .quant import LEVELS
    stored = m.str_("minilm.quant")
    if stored is not None and stored not in LEVELS:
        raise ModelLoadError(f"{path}: GGUF metadata minilm.quant={stored!r} is not a known quantization level")
    try:
        fallback = json.loads(m.str_("minilm.tensor_formats") or "{}")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: GGUF metadata minilm.tensor_formats is not valid JSON ({e})") from None
    if not isinstance(fallback, dict) or not all(isinstance(k, str) and isinstance(v, str) and v in FORMATS
                                                 for k, v in fallback.items()):
        raise ModelLoadError(f"{path}: GGUF metadata minilm.tensor_formats must map tensor names to "
                             f"formats ({', '.join(FORMATS)})")
    c = cfg
    q, kv = c.q_dim, c.kv_dim
    llama = arch == "llama"

    def get(name):
        t = gt.get(name)
        if t is None:
            raise ModelLoadError(f"{path}: tensor {name!r} is missing")
        return t

    def mat(name, n_head=None, shape=None):
        t = get(name)
        dims = _dims(t, path)
        if shape is not None and (len(dims) != 2 or (dims[1], dims[0]) != shape):
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {dims[::-1]}, expected {list(shape)}")
        lin = _tensor_linear(t, path, check)
        fmt = fallback.get(name)
        if fmt is not None and lin.fmt != fmt:        # our export's exact F32 fallback: requantize back
            try:
                lin = Linear.quantize(_dequant(lin), fmt, QK, name=name)
            except ValueError as e:
                raise NonFiniteWeightsError(f"{path}: {e}") from None
        if n_head is not None:
            if lin.N % n_head or (lin.N // n_head) % 2:
                raise ModelLoadError(f"{path}: tensor {name!r}: {lin.N} rows do not split into {n_head} heads")
            lin = _map_rows(lin, lambda a: unpermute_rows(a, n_head))
        return lin

    def vec(name, n, n_head=None):
        a = _tensor_vec(get(name), path, n, check)
        return unpermute_rows(a, n_head) if n_head else a

    D, F, V, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    T = {"tok_embd": mat("token_embd.weight", shape=(V, D))}
    for i in range(c.n_layers):
        b = f"blk.{i}."
        T[f"l{i}.attn_norm.w"] = vec(b + "attn_norm.weight", D)
        T[f"l{i}.wqkv"] = _cat([mat(b + "attn_q.weight", c.n_heads if llama else None, (q, D)),
                                mat(b + "attn_k.weight", c.n_kv_heads if llama else None, (kv, D)),
                                mat(b + "attn_v.weight", None, (kv, D))])
        if c.qkv_bias:
            T[f"l{i}.bqkv"] = np.concatenate([vec(b + "attn_q.bias", q, c.n_heads if llama else None),
                                              vec(b + "attn_k.bias", kv, c.n_kv_heads if llama else None),
                                              vec(b + "attn_v.bias", kv)])
        if c.qk_norm:
            T[f"l{i}.q_norm"] = vec(b + "attn_q_norm.weight", hd)
            T[f"l{i}.k_norm"] = vec(b + "attn_k_norm.weight", hd)
        T[f"l{i}.wo"] = mat(b + "attn_output.weight", shape=(D, q))
        if c.o_bias:
            T[f"l{i}.bo"] = vec(b + "attn_output.bias", D)
        T[f"l{i}.ffn_norm.w"] = vec(b + "ffn_norm.weight", D)
        T[f"l{i}.w_gate_up"] = _cat([mat(b + "ffn_gate.weight", shape=(F, D)), mat(b + "ffn_up.weight", shape=(F, D))])
        T[f"l{i}.w_down"] = mat(b + "ffn_down.weight", shape=(D, F))
        if c.mlp_bias:
            T[f"l{i}.b_gate_up"] = np.concatenate([vec(b + "ffn_gate.bias", F), vec(b + "ffn_up.bias", F)])
            T[f"l{i}.b_down"] = vec(b + "ffn_down.bias", D)
    T["out_norm.w"] = vec("output_norm.weight", D)
    if not c.tie_word_embeddings:
        T["output"] = mat("output.weight", shape=(V, D))

    mats = [k for k, v in T.items() if isinstance(v, Linear)]
    quantized = any(T[k].fmt in ("q8_0", "q4_0") for k in mats)
    level = stored or _guess_level(T, mats)
    group = 32
    if quant is not None and quant != level:
        if quantized:
            raise ValueError(f"quant={quant!r}: {path} is already quantized ({level}); load it as stored")
        mat_fmt, emb_fmt, group = parse_level(quant)
        for k in mats:
            fmt = emb_fmt if k in ("tok_embd", "output") else mat_fmt
            if T[k].fmt != fmt:
                try:
                    T[k] = Linear.quantize(_dequant(T[k]), fmt, group, name=k)
                except ValueError as e:
                    raise NonFiniteWeightsError(f"{path}: {e}") from None
        level = quant
    check_context_memory(cfg, n_ctx)
    try:
        tok = _make_tokenizer(m, cfg)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers / metadata of unexpected types
        raise ModelLoadError(f"{path}: cannot build the tokenizer from the GGUF metadata "
                             f"({type(e).__name__}: {e})") from None
    return build_lm(cfg, T, tok, n_ctx, source=str(path), quant=level, group_size=group)


def _guess_level(T, mats) -> str:
    fm = [T[k].fmt for k in mats if k not in ("tok_embd", "output")]
    if "q4_0" in fm:
        return "int4"
    if "q8_0" in fm:
        return "int8"
    return max(set(fm), key=fm.count) if fm else "f32"
