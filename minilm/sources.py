"""Checkpoint sources: what `minilm.load` reads a model from, behind one small interface.

A source gives the loader
    where          the path named in messages (and `LM.source`)
    config         a `Config`, with every EOS id the checkpoint declares
    target(...)    the quant level, group size and per-matrix formats to load with (or "as stored")
    check()        every tensor the config implies, checked from headers (name, type, shape, bytes
                   present) before anything is read, converted or allocated
    tensors()      (canonical name, loader) pairs, one tensor at a time; a loader returns a
                   `Linear` or an f32 array (canonical names: see weights.py)
    tokenizer()    the `Tokenizer`
and `loader.load_source` does the rest once for all of them (n_ctx, memory guard, conversion to
the target formats, `LM`).

Three sources:
    HFSource        a Hugging Face folder (config.json + *.safetensors), through weights.py
    PrequantSource  a folder written by `model.save` (prequant.py), memory-mapped as saved
    GGUFSource      a llama.cpp GGUF file (any architecture of GGUF_ARCHS); tensor types map onto minilm's
                    formats through quant.FORMATS (ggml_type / ggml_name / block / block_bytes),
                    the tensors stay memory-mapped where the canonical layout allows

GGUF tensor names: `GGUF_NAMES` is the one table from canonical names to GGUF names (with the row
splits and llama's q/k row permutation), read by `gguf_layout`; both this reader and
`gguf_io.export_gguf` use it.
"""
from __future__ import annotations

import json
import re
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import Config, token_ids
from .errors import ModelLoadError, NonFiniteWeightsError, UnsupportedModelError
from .jsonfile import read_json_object
from .quant import FORMATS, GGML_TO_FMT, LEVELS, Linear, is_level, parse_level
from .safetensors_io import check_finite
from .weights import CheckpointReader, canonical_shapes, check_checkpoint, is_matrix, iter_canonical

Loader = Callable[[], "Linear | np.ndarray"]
EMBEDDINGS = ("tok_embd", "output")


@dataclass(frozen=True)
class Target:
    """How to load the matrices: `mat` / `emb` formats (None: as stored), quant label and group;
    `formats`: per-matrix formats of a llama.cpp mix preset (mixes.py), which take precedence."""
    level: str
    group: int
    mat: str | None = None
    emb: str | None = None
    formats: dict | None = None

    def fmt(self, name: str) -> str | None:
        if self.formats is not None and name in self.formats:
            return self.formats[name]
        return self.emb if name in EMBEDDINGS else self.mat


def level_target(cfg: Config, quant: str | None, group_size: int | None, embed_quant: str | None) -> Target:
    """The Target of a quant level (quant.LEVELS) or of a llama.cpp mix preset (mixes.PRESETS)."""
    from .mixes import PRESETS, mix_formats
    if quant in PRESETS:
        if group_size not in (None, 32) or embed_quant is not None:
            raise ValueError(f"quant={quant!r}: a llama.cpp mix preset chooses every tensor's type "
                             "(group_size / embed_quant do not apply)")
        return Target(quant, 32, formats=mix_formats(quant, cfg))
    mat, emb, group = parse_level(quant, group_size, embed_quant)
    return Target(quant or "f32", group, mat, emb)


def dequant(lin: Linear) -> np.ndarray:
    """f32[N, K]: exactly the values `lin` stores."""
    return np.ascontiguousarray(FORMATS[lin.fmt].unpack(lin.arrays)[:, :lin.K], dtype=np.float32)


def convert(t, name: str, fmt: str | None, group: int, where, qw=None) -> Linear | np.ndarray:
    """A canonical tensor in its load format: matrices as a `Linear` of `fmt` (None: as stored;
    float arrays from a checkpoint are packed, a `Linear` of another format is requantized from
    its exact values), vectors as contiguous f32. NaN/Inf met by a quantizer -> NonFiniteWeightsError.
    qw: the matrix's importance weights f32[K] (calibration), or None."""
    if not is_matrix(name):
        return np.ascontiguousarray(t, dtype=np.float32)
    if isinstance(t, Linear):
        same_group = fmt != "q4_0" or t.group == group
        if fmt is None or (t.fmt == fmt and same_group):
            return t
        t = dequant(t)
    try:
        return Linear.quantize(t, fmt or "f32", group, name=name, qw=qw)
    except ValueError as e:
        raise NonFiniteWeightsError(f"{where}: {e}") from None


class Source(ABC):
    """The interface (see the module docstring); subclasses set `where` and `config`."""
    where: str
    config: Config

    @abstractmethod
    def target(self, quant: str | None, group_size: int | None, embed_quant: str | None) -> Target:
        """The formats to load with, for the caller's quant options (ValueError when the source
        cannot give them, e.g. requantizing an already quantized file)."""

    @abstractmethod
    def check(self) -> None:
        """Every tensor the config implies, from headers only (ModelLoadError naming the tensor)."""

    @abstractmethod
    def tensors(self) -> Iterator[tuple[str, Loader]]:
        """(canonical name, loader) pairs, checked first when `check` has not run."""

    @abstractmethod
    def tokenizer(self):
        """The checkpoint's `Tokenizer`."""


# ---- Hugging Face folders ------------------------------------------------------------------------
def read_generation_config(folder: Path) -> dict:
    p = folder / "generation_config.json"
    if not p.exists():
        return {}
    return read_json_object(p)


def add_generation_eos(cfg: Config, gen: dict, where) -> None:
    """generation_config.json's eos_token_id (one id or a list) joins the config's EOS ids."""
    try:
        ids = token_ids("eos_token_id", gen.get("eos_token_id"))
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    for e in ids:
        if e not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(e)


def folder_config(folder: Path) -> Config:
    cfg = Config.from_file(folder / "config.json")
    add_generation_eos(cfg, read_generation_config(folder), folder / "generation_config.json")
    return cfg


def folder_tokenizer(folder: Path, cfg: Config):
    from .tokenizer import Tokenizer
    return Tokenizer(folder, cfg.bos_token_id, cfg.eos_token_ids, model_vocab_size=cfg.vocab_size)


class HFSource(Source):
    """config.json + tokenizer.json + *.safetensors: f32 arrays streamed from the mapped shards,
    packed into the target formats by the loader."""

    def __init__(self, folder: Path, check_weights: bool = True):
        self.folder, self.where, self.check_weights = folder, str(folder), check_weights
        self.config = folder_config(folder)
        self.reader = None

    def target(self, quant, group_size, embed_quant):
        return level_target(self.config, quant, group_size, embed_quant)

    def check(self):
        self.reader = CheckpointReader(self.folder, check_weights=self.check_weights)
        check_checkpoint(self.reader, self.config)            # names, shapes, dtypes: before any work

    def tensors(self):
        if self.reader is None:
            self.check()
        yield from iter_canonical(self.reader, self.config)

    def tokenizer(self):
        return folder_tokenizer(self.folder, self.config)


# ---- pre-quantized folders -----------------------------------------------------------------------
class PrequantSource(Source):
    """A `model.save` folder: the saved formats, memory-mapped (nothing requantized)."""

    def __init__(self, folder: Path, check_weights: bool = True):
        from . import prequant
        self.folder, self.where, self.check_weights = folder, str(folder), check_weights
        self.config = folder_config(folder)
        self.meta = prequant.read_meta(folder)
        self.plan = None

    def target(self, quant, group_size, embed_quant):
        q, g = self.meta["quant"], self.meta["group_size"]
        if quant not in (None, q) or group_size not in (None, g) or embed_quant is not None:
            asked = ", ".join(f"{k}={v!r}" for k, v in (("quant", quant), ("group_size", group_size),
                                                         ("embed_quant", embed_quant))
                              if v is not None and (k != "quant" or v != q) and (k != "group_size" or v != g))
            raise ValueError(f"{asked}: {self.folder} is already quantized as {q}"
                             f"{f' (group {g})' if q.startswith('int4') else ''}; load the original "
                             "checkpoint to quantize it differently")
        return Target(q, g)

    def check(self):
        from . import prequant
        self.plan = prequant.plan_tensors(self.folder, self.config, self.meta)

    def tensors(self):
        from . import prequant
        if self.plan is None:
            self.check()
        yield from prequant.iter_tensors(self.plan, self.check_weights)

    def tokenizer(self):
        return folder_tokenizer(self.folder, self.config)


# ---- GGUF: the one table of tensor names ---------------------------------------------------------
# canonical name (per-layer names without their "l{i}." prefix) -> its GGUF tensors, in row order:
# (GGUF name, rows, rope). rows: the part's share of the canonical rows ("q": q_dim, "kv": kv_dim,
# "ffn": intermediate_size, None: all of them). rope "q" / "k": for the architectures whose
# llama.cpp graph uses the interleaved-pair RoPE (GGUF_NORM_ROPE) these rows are stored in that
# order (n_heads / n_kv_heads heads; see permute_rows); the NEOX-RoPE ones store them as is.
# Names as llama.cpp 0c1e570 loads them (src/llama-arch.cpp, src/llama-model.cpp).
GGUF_NAMES: dict[str, tuple[tuple[str, str | None, str | None], ...]] = {
    "tok_embd": (("token_embd.weight", None, None),),
    "pos_embd": (("position_embd.weight", None, None),),
    "out_norm.w": (("output_norm.weight", None, None),),
    "out_norm.b": (("output_norm.bias", None, None),),
    "output": (("output.weight", None, None),),
    "attn_norm.w": (("blk.{i}.attn_norm.weight", None, None),),
    "attn_norm.b": (("blk.{i}.attn_norm.bias", None, None),),
    "wqkv": (("blk.{i}.attn_q.weight", "q", "q"), ("blk.{i}.attn_k.weight", "kv", "k"),
             ("blk.{i}.attn_v.weight", "kv", None)),
    "bqkv": (("blk.{i}.attn_q.bias", "q", "q"), ("blk.{i}.attn_k.bias", "kv", "k"),
             ("blk.{i}.attn_v.bias", "kv", None)),
    "q_norm": (("blk.{i}.attn_q_norm.weight", None, None),),
    "k_norm": (("blk.{i}.attn_k_norm.weight", None, None),),
    "wo": (("blk.{i}.attn_output.weight", None, None),),
    "bo": (("blk.{i}.attn_output.bias", None, None),),
    "post_attn_norm.w": (("blk.{i}.post_attention_norm.weight", None, None),),
    "ffn_norm.w": (("blk.{i}.ffn_norm.weight", None, None),),
    "ffn_norm.b": (("blk.{i}.ffn_norm.bias", None, None),),
    "post_ffn_norm.w": (("blk.{i}.post_ffw_norm.weight", None, None),),
    "w_gate_up": (("blk.{i}.ffn_gate.weight", "ffn", None), ("blk.{i}.ffn_up.weight", "ffn", None)),
    "b_gate_up": (("blk.{i}.ffn_gate.bias", "ffn", None), ("blk.{i}.ffn_up.bias", "ffn", None)),
    "w_up": (("blk.{i}.ffn_up.weight", None, None),),
    "b_up": (("blk.{i}.ffn_up.bias", None, None),),
    "w_down": (("blk.{i}.ffn_down.weight", None, None),),
    "b_down": (("blk.{i}.ffn_down.bias", None, None),),
    "conv_w": (("blk.{i}.shortconv.conv.weight", None, None),),     # ggml {Lc, D}: see GGUF_2D
}
_QKV_FUSED = {"wqkv": (("blk.{i}.attn_qkv.weight", None, None),),
              "bqkv": (("blk.{i}.attn_qkv.bias", None, None),)}
# Where an architecture names a tensor otherwise (these win over GGUF_NAMES). Keys "conv.X": LFM2's
# convolution layers. Reading also accepts GGUF_NAMES' split q/k/v where the fused one is absent.
GGUF_ARCH_NAMES: dict[str, dict[str, tuple[tuple[str, str | None, str | None], ...]]] = {
    "gpt2": _QKV_FUSED,
    "gptneox": _QKV_FUSED,                                  # q, k, v blocks (not NeoX's per-head order)
    "phi3": {**_QKV_FUSED, "w_gate_up": (("blk.{i}.ffn_up.weight", None, None),)},   # gate rows, then up
    "lfm2": {"out_norm.w": (("token_embd_norm.weight", None, None),),
             "conv.wqkv": (("blk.{i}.shortconv.in_proj.weight", None, None),),
             "conv.wo": (("blk.{i}.shortconv.out_proj.weight", None, None),)},
}
# canonical vectors that GGUF stores as a matrix: name -> its row length from the config
GGUF_2D = {"conv_w": lambda cfg: cfg.conv_kernel}
# model_type -> GGUF general.architecture (llama.cpp's names); GGUF_ARCHS: the ones minilm reads
GGUF_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                "gpt_neox": "gptneox", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
                "smollm3": "smollm3", "olmo2": "olmo2", "granite": "granite", "lfm2": "lfm2"}
GGUF_ARCHS = tuple(dict.fromkeys(GGUF_ARCH_OF.values()))
GGUF_NORM_ROPE = ("llama", "granite", "smollm3")   # llama.cpp's LLAMA_ROPE_TYPE_NORM among them


@dataclass(frozen=True)
class Part:
    """One GGUF tensor: rows a:b of canonical tensor `canon` (shape [b - a, K] or [b - a]);
    heads: rows stored in llama.cpp's RoPE order for that many heads (None: as is). Tensors that
    are not matrices (K None): width, the canonical row length of a 2-D one (GPT-2's positions;
    1: a vector); cols, the GGUF row length when GGUF stores it 2-D (None: 1-D)."""
    gguf: str
    canon: str
    a: int
    b: int
    K: int | None          # None: not a matrix (no Linear)
    heads: int | None
    cols: int | None = None
    width: int = 1


def gguf_layout(cfg: Config, arch: str, present=None) -> dict[str, list[Part]]:
    """Canonical name -> its GGUF parts, for every tensor `cfg` implies (weights.canonical_shapes).
    present: the tensor names of a file being read; where the architecture's name for a tensor is
    absent there but GGUF_NAMES' is present (e.g. split q/k/v instead of a fused attn_qkv), the
    latter is used. UnsupportedModelError for a canonical tensor GGUF has no name for."""
    rows = {"q": cfg.q_dim, "kv": cfg.kv_dim, "ffn": cfg.intermediate_size}
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
    names = GGUF_ARCH_NAMES.get(arch, {})
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        m = re.fullmatch(r"l(\d+)\.(.+)", name)
        key, i = (m.group(2), int(m.group(1))) if m else (name, None)
        own = names.get(f"conv.{key}") if i is not None and cfg.is_conv(i) else None
        spec = own or names.get(key) or GGUF_NAMES.get(key)
        if spec is None:
            raise UnsupportedModelError(f"tensor {name}: GGUF ({arch}) has no tensor name for it")
        alt = GGUF_NAMES.get(key)
        if present is not None and spec is not alt and alt and not own and \
                spec[0][0].format(i=i) not in present and alt[0][0].format(i=i) in present:
            spec = alt
        parts, a = [], 0
        for gname, r, rope in spec:
            n = rows[r] if r else shape[0]
            h = heads[rope] if rope and arch in GGUF_NORM_ROPE else None
            mat = len(shape) == 2 and is_matrix(name)
            width = 1 if mat or len(shape) == 1 else shape[1]
            cols = GGUF_2D[key](cfg) if key in GGUF_2D else (width if width > 1 else None)
            parts.append(Part(gname.format(i=i), name, a, a + n, shape[1] if mat else None, h, cols, width))
            a += n
        if a != shape[0]:   # pragma: no cover - the table and canonical_shapes disagree
            raise AssertionError(f"{name}: GGUF parts cover {a} rows of {shape[0]}")
        out[name] = parts
    return out


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved-pair rows (convert_hf_to_gguf LlamaModel.permute).
    Whole rows move, so it applies to any row-wise storage (Q8_0 / Q4_0 blocks, raw ggml rows)."""
    rest = a.shape[1:]
    hd = a.shape[0] // n_head
    return np.ascontiguousarray(a.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(a.shape))


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`."""
    rest = a.shape[1:]
    hd = a.shape[0] // n_head
    return np.ascontiguousarray(a.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(a.shape))


def map_rows(lin: Linear, f) -> Linear:
    """`f` applied to the rows of every array of `lin` (same format)."""
    return Linear(lin.fmt, lin.N, lin.K, {k: f(v) for k, v in lin.arrays.items()}, lin.Kp)


def sub_rows(lin: Linear, a: int, b: int) -> Linear:
    """Rows a:b of a Linear, same format."""
    return Linear(lin.fmt, b - a, lin.K, {k: np.ascontiguousarray(v[a:b]) for k, v in lin.arrays.items()}, lin.Kp)


def cat_rows(lins: list[Linear]) -> Linear:
    """Stack Linears by rows (minilm's fused q/k/v and gate/up). One format: the arrays
    concatenated as stored. Mixed formats (llama.cpp's mixes give attn_v more bits than attn_q /
    attn_k in some layers): the widest part's format for all when it has >= 6.5 bits (Q6_K,
    Q8_0, floats), else Q6_K (Q8_0 for widths not a multiple of 256); parts already in it are
    kept byte for byte, the others re-packed from their exact values onto that finer grid (Q4_K
    or Q2_K values in Q6_K: within a few thousandths of their range). Never a float copy of
    the whole quantized matrix."""
    if len(lins) == 1:
        return lins[0]
    if len({(l.fmt, l.Kp, l.group) for l in lins}) != 1:
        wide = max(lins, key=lambda l: (FORMATS[l.fmt].bits(l.group), l.fmt == "f32"))
        fmt, group = wide.fmt, wide.group
        if FORMATS[fmt].bits(group) < 6.5:       # a 2-5 bit grid would move the narrower parts' values
            fmt, group = ("q6_k" if wide.K % 256 == 0 else "q8_0"), 32
        lins = [l if (l.fmt, l.group) == (fmt, group) else Linear.quantize(dequant(l), fmt, group) for l in lins]
        if len({(l.fmt, l.Kp, l.group) for l in lins}) != 1:      # a width fallback changed a part's format
            return Linear.quantize(np.concatenate([dequant(l) for l in lins], axis=0), "f32")
    l0 = lins[0]
    arrays = {k: np.ascontiguousarray(np.concatenate([l.arrays[k] for l in lins], axis=0)) for k in l0.arrays}
    return Linear(l0.fmt, sum(l.N for l in lins), l0.K, arrays, l0.Kp)


# ---- GGUF: ggml blocks <-> a Linear's arrays -----------------------------------------------------
@lru_cache(maxsize=None)
def array_dtypes(fmt: str) -> dict:
    """Array name -> numpy dtype that format `fmt` stores (what its packer produces)."""
    f = FORMATS[fmt]
    return {k: v.dtype for k, v in f.pack(np.zeros((1, f.block), np.float32), f.block).items()}


def ggml_row_bytes(fmt: str, K: int) -> int:
    f = FORMATS[fmt]
    return K // f.block * f.block_bytes


def linear_from_ggml(fmt: str, raw: np.ndarray, N: int, K: int) -> Linear:
    """A GGUF tensor's bytes uint8[N, row bytes] (ggml type of format `fmt`) -> `Linear`, as views
    of those bytes where the format's arrays allow:
        arrays ("w",)        float rows: a view
        arrays ("raw",)      the ggml rows themselves (formats kept in ggml's own block layout)
        arrays ("qs", "d")   ggml blocks of (fp16 d, quants): split into d [N, K/block] and qs
    """
    f = FORMATS[fmt]
    if f.arrays == ("raw",):
        return Linear(fmt, N, K, {"raw": raw})
    dt = array_dtypes(fmt)
    if f.arrays == ("w",):
        return Linear(fmt, N, K, {"w": raw.view(dt["w"]).reshape(N, K)})
    if f.arrays == ("qs", "d"):
        nb = K // f.block
        blocks = raw.reshape(N, nb, f.block_bytes)
        d = np.ascontiguousarray(blocks[:, :, :2]).view(dt["d"]).reshape(N, nb)
        qs = np.ascontiguousarray(blocks[:, :, 2:]).reshape(N, nb * (f.block_bytes - 2)).view(dt["qs"])
        return Linear(fmt, N, K, {"qs": qs, "d": d})
    raise UnsupportedModelError(f"format {fmt}: arrays {f.arrays} have no GGUF block mapping")


def ggml_bytes(lin: Linear) -> np.ndarray:
    """Inverse of `linear_from_ggml`: uint8[N, row bytes] in the ggml layout of `lin.fmt`
    (needs K == Kp: ggml has no padded rows)."""
    f = FORMATS[lin.fmt]
    if lin.Kp != lin.K:
        raise ValueError(f"{lin.fmt} [{lin.N}, {lin.K}]: padded rows (Kp={lin.Kp}) have no ggml layout")
    if f.arrays == ("raw",):
        return np.ascontiguousarray(lin.arrays["raw"])
    if f.arrays == ("w",):
        return np.ascontiguousarray(lin.arrays["w"][:, :lin.K]).view(np.uint8)
    if f.arrays == ("qs", "d"):
        N, nb = lin.N, lin.Kp // f.block
        out = np.empty((N, nb, f.block_bytes), np.uint8)
        out[:, :, :2] = np.ascontiguousarray(lin.arrays["d"]).view(np.uint8).reshape(N, nb, 2)
        out[:, :, 2:] = np.ascontiguousarray(lin.arrays["qs"]).view(np.uint8).reshape(N, nb, f.block_bytes - 2)
        return out.reshape(N, nb * f.block_bytes)
    raise UnsupportedModelError(f"format {lin.fmt}: arrays {f.arrays} have no GGUF block mapping")


def check_linear_finite(lin: Linear, where: str) -> None:
    """NaN/Inf in the float arrays of `lin` (weights of float formats, block scales); arrays of
    ggml's own block layout ("raw") are not looked into."""
    for k, a in lin.arrays.items():
        if a.dtype.kind == "f":
            check_finite(a, where if k == "w" else f"{where} (block scales)")
        elif k == "w" and a.dtype == np.uint16:
            check_finite(a, where, bf16=True)


# ---- GGUF: reading -------------------------------------------------------------------------------
def gguf_module():
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


def open_gguf(path: Path):
    """gguf.GGUFReader with the tensors' data ranges checked first, so a truncated file names the
    tensor whose data is cut off (gguf-py itself fails with a bare reshape error)."""
    gguf = gguf_module()

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


class GGUFMeta:
    """Typed access to a GGUF file's metadata; errors name the file and key."""

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


def tensor_dims(t, path) -> list[int]:
    """A GGUF tensor's dimensions in ggml order (ne0 = the row length K first)."""
    try:
        dims = [int(x) for x in t.shape]
    except (TypeError, ValueError):
        raise ModelLoadError(f"{path}: tensor {t.name!r} has unreadable dimensions") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 4:
        raise ModelLoadError(f"{path}: tensor {t.name!r} has dimensions {dims}: expected 1 to 4 positive sizes")
    return dims


def tensor_format(t, path) -> str:
    """The minilm format of a GGUF tensor's ggml type (quant.GGML_TO_FMT), or a ModelLoadError."""
    tn = t.tensor_type.name
    fmt = GGML_TO_FMT.get(tn)
    if fmt is None:
        raise ModelLoadError(f"{path}: tensor {t.name!r} has GGML type {tn}, which minilm does not run "
                             f"(supported: {', '.join(GGML_TO_FMT)}); convert the model with llama.cpp "
                             f"to one of those types (e.g. llama-quantize --pure ... Q8_0)")
    return fmt


def tensor_bytes(t, path, nbytes: int) -> np.ndarray:
    """The tensor's bytes as uint8[nbytes] (a view of the mapped file): exactly nbytes present,
    else 'truncated', naming it."""
    data = t.data
    have = int(getattr(data, "nbytes", 0))
    if have != nbytes:
        raise ModelLoadError(f"{path}: tensor {t.name!r}: truncated or inconsistent data ({have} bytes "
                             f"in the file, {nbytes} expected from its type and dimensions)")
    return np.asarray(data).reshape(-1).view(np.uint8)


def _float_format(fmt: str) -> bool:
    return FORMATS[fmt].arrays == ("w",)


def _gguf_vector(m: GGUFMeta, tensors: dict, name: str) -> list[float] | None:
    """A small F32 tensor's values (Phi-3's rope factors), or None when absent."""
    t = tensors.get(name)
    if t is None:
        return None
    if t.tensor_type.name != "F32":
        raise ModelLoadError(f"{m.path}: tensor {name!r} has GGML type {t.tensor_type.name}, expected F32")
    return [float(x) for x in np.asarray(t.data, np.float32).reshape(-1)]


def config_from_gguf(m: GGUFMeta, arch: str, tensors: dict) -> Config:
    """The Config of a GGUF file: llama.cpp's metadata keys (and the tensors present) read back into
    config.json's vocabulary, per architecture, so that Config.from_hf checks them as it checks any
    checkpoint. Each key as llama.cpp reads it (src/models/<arch>.cpp load_arch_hparams)."""
    a = arch
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError(f"{m.path}: tensor 'token_embd.weight' is missing")
    D = m.int_(f"{a}.embedding_length")
    H = m.int_(f"{a}.attention.head_count")
    L = m.int_(f"{a}.block_count")
    hkv_raw = m.get(f"{a}.attention.head_count_kv", H)
    conv_layers = None
    if isinstance(hkv_raw, list):        # per layer: LFM2 marks its convolution layers with 0
        if a != "lfm2":
            raise ModelLoadError(f"{m.path}: per-layer head_count_kv is not supported for {a}")
        if len(hkv_raw) != L or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in hkv_raw):
            raise ModelLoadError(f"{m.path}: GGUF metadata {a}.attention.head_count_kv must list {L} "
                                 f"non-negative integers, got {hkv_raw!r}")
        if len({x for x in hkv_raw if x}) != 1:
            raise ModelLoadError(f"{m.path}: GGUF metadata {a}.attention.head_count_kv: the attention layers "
                                 f"must share one kv head count, got {hkv_raw!r}")
        conv_layers = [x == 0 for x in hkv_raw]
        hkv = max(hkv_raw)
    else:
        hkv = m.int_(f"{a}.attention.head_count_kv", H)
    hd = m.int_(f"{a}.attention.key_length", D // H if H > 0 else 0)
    edims = tensor_dims(emb, m.path)
    V = edims[1] if len(edims) > 1 else None
    layer_norm = a in ("gpt2", "gptneox")
    model_type = {v: k for k, v in reversed(GGUF_ARCH_OF.items())}[a]    # llama -> llama, gemma3 -> gemma3_text
    raw = {
        "model_type": model_type,
        "hidden_size": D,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": hkv,
        "head_dim": hd,
        "intermediate_size": m.int_(f"{a}.feed_forward_length"),
        "max_position_embeddings": m.int_(f"{a}.context_length", 2048),
        "rope_theta": m.num(f"{a}.rope.freq_base", 10000.0),
        "vocab_size": m.int_(f"{a}.vocab_size", V),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("minilm.eos_token_ids") or m.get("tokenizer.ggml.eos_token_id"),
    }
    if layer_norm:
        raw["layer_norm_epsilon" if a == "gpt2" else "layer_norm_eps"] = m.num(f"{a}.attention.layer_norm_epsilon", 1e-5)
    else:
        raw["rms_norm_eps"] = m.num(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        raw["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if a not in ("qwen2", "gpt2", "gptneox"):
        raw["attention_bias"] = "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors
    if a == "llama" and "blk.0.attn_output.bias" not in tensors and raw["attention_bias"]:
        raise ModelLoadError(f"{m.path}: q/k/v biases without an output bias are not supported for llama")
    if a == "gpt2":
        raw.update(n_positions=raw["max_position_embeddings"], n_inner=raw["intermediate_size"])
    if a == "gptneox":
        raw["use_parallel_residual"] = bool(m.get(f"{a}.use_parallel_residual", True))
        raw["attention_bias"] = "blk.0.attn_qkv.bias" in tensors
    if a != "gpt2":
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
    long, short = (_gguf_vector(m, tensors, f"rope_factors_{k}.weight") for k in ("long", "short"))
    if (long is None) != (short is None) or (long is not None and a != "phi3"):
        raise ModelLoadError(f"{m.path}: rope_factors_long / rope_factors_short: both or neither, and only for phi3")
    if long is not None:                 # Phi-3 LongRoPE
        raw["rope_scaling"] = {"rope_type": "longrope", "long_factor": long, "short_factor": short,
                               "attention_factor": m.num(f"{a}.rope.scaling.attn_factor", 1.0)}
        raw["original_max_position_embeddings"] = m.int_(f"{a}.rope.scaling.original_context_length",
                                                         raw["max_position_embeddings"])
    if a in ("gemma2", "gemma3"):
        key = f"{a}.attention.sliding_window"
        sw = m.int_(key, 4096) if a == "gemma2" else (m.int_(key) if m.get(key) is not None else 0)
        pat = m.get(f"{a}.attention.sliding_window_pattern", 2 if a == "gemma2" else 6)
        if isinstance(pat, list):
            if len(pat) != L or not all(isinstance(x, bool) for x in pat):
                raise ModelLoadError(f"{m.path}: GGUF metadata {a}.attention.sliding_window_pattern must list "
                                     f"{L} booleans, got {pat!r}")
            swa = pat
        else:
            n = m.int_(f"{a}.attention.sliding_window_pattern", 2 if a == "gemma2" else 6)
            swa = [n == 0 or i % n < n - 1 for i in range(L)]     # llama_hparams::set_swa_pattern
        if sw:
            raw["sliding_window"] = sw
            raw["layer_types"] = ["sliding_attention" if x else "full_attention" for x in swa]
        n_head_dim = D // H if L == (46 if a == "gemma2" else 62) else hd   # llama.cpp: 27B scales by D/H
        raw["query_pre_attn_scalar"] = n_head_dim
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if m.get(f"{a}.{k}") is not None and m.num(f"{a}.{k}") > 0:
                raw[k] = m.num(f"{a}.{k}")
        if a == "gemma3":
            raw["rope_local_base_freq"] = m.num(f"{a}.rope.freq_base_swa", 10000.0)
    if a == "phi3" and m.get(f"{a}.attention.sliding_window") is not None:
        raw["sliding_window"] = m.int_(f"{a}.attention.sliding_window")     # 0: none (Phi-4)
    if a == "granite":
        raw.update(embedding_multiplier=m.num(f"{a}.embedding_scale", 1.0),
                   residual_multiplier=m.num(f"{a}.residual_scale", 1.0),
                   attention_multiplier=m.num(f"{a}.attention.scale", 1.0 / np.sqrt(hd) if hd > 0 else 1.0),
                   logits_scaling=m.num(f"{a}.logit_scale", 1.0))
    if a == "lfm2":
        raw.update(norm_eps=raw.pop("rms_norm_eps"), conv_L_cache=m.int_(f"{a}.shortconv.l_cache"),
                   layer_types=["conv" if c else "full_attention" for c in (conv_layers or [False] * L)])
    try:
        return Config.from_hf(raw)
    except ModelLoadError as e:
        raise type(e)(f"{m.path}: {e}") from None


def level_of(fmts: list[str]) -> str:
    """The quant label for matrices of these formats: the level (quant.LEVELS) whose layer format
    is the one of fewest bits present (most common on ties), else that format's own name."""
    if not fmts:
        return "f32"
    fmt = min(set(fmts), key=lambda f: (FORMATS[f].bits(), -fmts.count(f)))
    return next((lv for lv, (m, _, _) in LEVELS.items() if m == fmt), fmt)


class GGUFSource(Source):
    """A GGUF file of one of GGUF_ARCHS. The config comes from the metadata, the tensors from
    `gguf_layout` (the one name table) and the ggml types through quant.FORMATS: a GGUF tensor of
    a format minilm runs is used as stored (float and "raw" formats as views of the mapped file,
    Q8_0/Q4_0 blocks split into minilm's qs/d arrays); q and k are fused into wqkv, gate and up
    into w_gate_up, and llama's q/k rows are put back in the HF RoPE order."""

    def __init__(self, path: Path, check_weights: bool = True):
        self.path, self.where, self.check_weights = path, str(path), check_weights
        self.reader = open_gguf(path)
        self.meta = m = GGUFMeta(self.reader, path)
        arch = m.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                        f"(supported: {', '.join(GGUF_ARCHS)})")
        self.arch = arch
        self.gt = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:                      # unsupported types: fail before any work
            tensor_format(t, path)
        self.config = config_from_gguf(m, arch, self.gt)
        stored = m.str_("minilm.quant")
        if stored is not None and not is_level(stored):
            raise ModelLoadError(f"{path}: GGUF metadata minilm.quant={stored!r} is not a known quantization level")
        try:
            fallback = json.loads(m.str_("minilm.tensor_formats") or "{}")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: GGUF metadata minilm.tensor_formats is not valid JSON ({e})") from None
        if not isinstance(fallback, dict) or not all(isinstance(k, str) and isinstance(v, str) and v in FORMATS
                                                     for k, v in fallback.items()):
            raise ModelLoadError(f"{path}: GGUF metadata minilm.tensor_formats must map tensor names to "
                                 f"formats ({', '.join(FORMATS)})")
        self.fallback = fallback                           # our export's exact-F32 stand-ins
        self.layout = gguf_layout(self.config, arch, self.gt)
        self.checked = False
        mats = [p for name, parts in self.layout.items() if is_matrix(name) and name not in EMBEDDINGS
                for p in parts]
        self.level = stored or level_of([self.fallback.get(p.gguf) or tensor_format(self.gt[p.gguf], path)
                                         for p in mats if p.gguf in self.gt])

    def _stored_quantized(self) -> bool:
        return any(not _float_format(tensor_format(t, self.path)) for t in self.reader.tensors) or \
            any(not _float_format(f) for f in self.fallback.values())

    def target(self, quant, group_size, embed_quant):
        if (quant is None or quant == self.level) and group_size is None and embed_quant is None:
            return Target(self.level, 32)                  # as stored
        if self._stored_quantized():
            raise ValueError(f"quant={quant!r}: {self.path} is already quantized ({self.level}); load it as stored")
        return level_target(self.config, quant, group_size, embed_quant)

    def _tensor(self, name: str):
        t = self.gt.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing")
        return t

    def _check_part(self, p: Part) -> tuple[str, np.ndarray]:
        """(format, bytes) of one GGUF tensor, checked against the part the config implies."""
        path, t = self.path, self._tensor(p.gguf)
        fmt = tensor_format(t, path)
        dims = tensor_dims(t, path)
        n = p.b - p.a
        if p.K is None:
            size = int(np.prod(dims, dtype=np.int64))
            if not _float_format(fmt):
                raise ModelLoadError(f"{path}: tensor {p.gguf!r} has GGML type {t.tensor_type.name}; "
                                     "1-D tensors must be F32, F16 or BF16")
            n *= p.width
            if size != n:
                raise ModelLoadError(f"{path}: tensor {p.gguf!r} has {size} elements (dimensions {dims}), expected {n}")
            if p.cols and dims != [p.cols, n // p.cols]:
                raise ModelLoadError(f"{path}: tensor {p.gguf!r} has shape {dims[::-1]}, expected {[n // p.cols, p.cols]}")
            return fmt, tensor_bytes(t, path, n * FORMATS[fmt].block_bytes)
        if dims != [p.K, n]:
            raise ModelLoadError(f"{path}: tensor {p.gguf!r} has shape {dims[::-1]}, expected {[n, p.K]}")
        blk = FORMATS[fmt].block
        if p.K % blk:
            raise ModelLoadError(f"{path}: tensor {p.gguf!r}: {t.tensor_type.name} needs a row length that is "
                                 f"a multiple of {blk}, got {p.K}")
        if p.heads and (n % p.heads or (n // p.heads) % 2):
            raise ModelLoadError(f"{path}: tensor {p.gguf!r}: {n} rows do not split into {p.heads} heads")
        return fmt, tensor_bytes(t, path, n * ggml_row_bytes(fmt, p.K))

    def check(self):
        """Every tensor the config implies: present, a supported type, the dimensions the config
        gives and all of its bytes in the file; before anything is read or allocated."""
        for parts in self.layout.values():
            for p in parts:
                self._check_part(p)
        self.checked = True

    def _matrix(self, p: Part) -> Linear:
        fmt, raw = self._check_part(p)
        N, where = p.b - p.a, f"{self.path}: tensor {p.gguf!r}"
        lin = linear_from_ggml(fmt, raw.reshape(N, -1), N, p.K)
        if self.check_weights:
            check_linear_finite(lin, where)
        want = self.fallback.get(p.gguf)
        if want is not None and lin.fmt != want:   # our export's exact F32 stand-in: requantize back
            lin = convert(lin, p.canon, want, FORMATS[want].block, self.path)
        if p.heads:
            lin = map_rows(lin, lambda a: unpermute_rows(a, p.heads))
        return lin

    def _vector(self, p: Part) -> np.ndarray:
        fmt, raw = self._check_part(p)
        a = np.asarray(FORMATS[fmt].unpack({"w": raw.view(array_dtypes(fmt)["w"]).reshape(1, -1)}),
                       dtype=np.float32).reshape(-1)
        if self.check_weights:
            check_finite(a, f"{self.path}: tensor {p.gguf!r}")
        a = unpermute_rows(a, p.heads) if p.heads else a
        return a.reshape(-1, p.width) if p.width > 1 else a

    def tensors(self):
        if not self.checked:
            self.check()
        for name, parts in self.layout.items():
            if parts[0].K is None:
                yield name, lambda parts=parts: np.concatenate([self._vector(p) for p in parts]) \
                    if len(parts) > 1 else self._vector(parts[0])
            else:
                yield name, lambda parts=parts: cat_rows([self._matrix(p) for p in parts])

    def tokenizer(self):
        try:
            return gguf_tokenizer(self.meta, self.config)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - tokenizers / metadata of unexpected types
            raise ModelLoadError(f"{self.path}: cannot build the tokenizer from the GGUF metadata "
                                 f"({type(e).__name__}: {e})") from None


# ---- GGUF: tokenizer metadata --------------------------------------------------------------------
# GPT-2 style pre-tokenizer regexes, by llama.cpp's tokenizer.ggml.pre name
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEX = {"gpt-2": GPT2_RE, "default": GPT2_RE, "qwen2": QWEN2_RE, "llama-bpe": LLAMA3_RE,
             "smollm": None}   # None: ByteLevel's own (GPT-2) regex

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def build_tokenizer_json(m: GGUFMeta) -> str:
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
        rx = PRE_REGEX.get(pre, GPT2_RE)
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


def gguf_tokenizer(m: GGUFMeta, cfg: Config, use_hf_json: bool = True):
    """The `Tokenizer` of a GGUF file: its embedded tokenizer.json (tokenizer.huggingface.json)
    when present and use_hf_json, else one rebuilt from the tokenizer.ggml.* metadata."""
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
