"""Hostile input (issue 9): malformed configs, checkpoints, shard indexes, pre-quantized folders,
GGUF files, parameters, chat templates and server requests each get a clear minilm error naming
what is wrong (never a raw KeyError / IndexError / TypeError / MemoryError, never a hang), and
the model answers exactly as before after every rejected call.

The models are small random checkpoints written into tmp folders (conftest.write_checkpoint) with
the stories260K tokenizer from ../shared (copied into the tmp folder)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest

import minilm
from minilm.errors import MinilmError, ModelLoadError, NonFiniteWeightsError, ResourceLimitError, TemplateError

from conftest import hf_tensor_shapes, random_tensors, shared_path, write_checkpoint

CFG = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=48,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
PROMPT = "Once upon a time"


def _write(folder, cfg=CFG, tokenizer=True, **kw):
    write_checkpoint(folder, cfg, tokenizer=None, **kw)
    if tokenizer:
        src = shared_path("models", "stories260K")
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / fn, folder / fn)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("hostile") / "good")


@pytest.fixture(scope="module")
def model(good):
    return minilm.load(str(good), n_ctx=64)


@pytest.fixture(scope="module")
def greedy(model):
    """The model's greedy answer before any hostile call (compared after rejected calls)."""
    return model.generate(PROMPT, max_new_tokens=8)


@pytest.fixture
def folder(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


def fails(exc_types, fn, *args, **kw) -> str:
    """Call fn; it must raise one of exc_types (a minilm error or a ValueError / TypeError),
    never anything else. Returns the message."""
    try:
        fn(*args, **kw)
    except exc_types as e:
        return str(e)
    except BaseException as e:  # noqa: BLE001
        pytest.fail(f"raised {type(e).__name__} instead of {exc_types}: {e}")
    pytest.fail("no error raised")


def set_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


_DELETE = object()


# ---- config values ---------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("hidden_size", 64.7), ("hidden_size", "64"), ("hidden_size", [64]), ("hidden_size", True),
    ("hidden_size", -32), ("num_hidden_layers", 0), ("num_hidden_layers", 10**6),
    ("num_attention_heads", 3), ("num_key_value_heads", 3), ("num_key_value_heads", 0),
    ("vocab_size", 10**12), ("vocab_size", "big"), ("intermediate_size", 0), ("head_dim", 0),
    ("partial_rotary_factor", 64.0), ("partial_rotary_factor", 0.0), ("partial_rotary_factor", -1),
    ("rope_theta", 0), ("rope_theta", -1.0), ("rope_theta", "x"), ("rope_theta", float("inf")),
    ("rms_norm_eps", -1e-5), ("rms_norm_eps", 0), ("rms_norm_eps", float("nan")),
    ("max_position_embeddings", 0), ("max_position_embeddings", 1.5),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}),
    ("rope_scaling", {"rope_type": "linear", "factor": -2.0}),
    ("rope_scaling", {"rope_type": "dynamic", "factor": "x"}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}),
    ("rope_scaling", [1, 2]), ("rope_parameters", "x"),
    ("eos_token_id", "x"), ("eos_token_id", [2, "x"]), ("bos_token_id", -1),
    ("tie_word_embeddings", "yes"), ("attention_bias", 1), ("torch_dtype", 5),
    ("head_dim", 6),            # rotary dim 6 is even but q/k shapes no longer match the weights
])
def test_bad_config_value(folder, key, value):
    set_config(folder, **{key: value})
    msg = fails((ModelLoadError, ValueError), minilm.load, str(folder), n_ctx=32)
    assert key in msg or key.split("_")[0] in msg, msg
    if key != "head_dim":
        assert "config.json" in msg, msg


def test_odd_rotary_dim_and_window(folder):
    set_config(folder, head_dim=5, model_type="mistral", sliding_window=-1)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert "sliding_window" in msg or "rotary" in msg


def test_negative_sliding_window(folder):
    set_config(folder, model_type="mistral", sliding_window=-1)
    assert "sliding_window" in fails(ModelLoadError, minilm.load, str(folder))


def test_max_position_embeddings_zero_names_the_field(folder):
    set_config(folder, max_position_embeddings=0)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert "max_position_embeddings" in msg and "n_ctx" not in msg


def test_more_layers_or_vocab_than_the_files_hold(folder):
    set_config(folder, num_hidden_layers=1000)
    assert "model.layers.2." in fails(ModelLoadError, minilm.load, str(folder))
    set_config(folder, num_hidden_layers=2, vocab_size=2**30)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert "embed_tokens" in msg and "shape" in msg


# ---- memory guard ----------------------------------------------------------------------------
def test_huge_n_ctx_fails_fast_saying_what_fits(good):
    t = time.perf_counter()
    msg = fails(ResourceLimitError, minilm.load, str(good), n_ctx=10**12)
    assert time.perf_counter() - t < 10
    assert "n_ctx=1000000000000" in msg and "bytes" in msg and "fits" in msg
    assert isinstance(ResourceLimitError("x"), MinilmError)


def test_context_memory_arithmetic():
    from minilm.config import Config
    from minilm.loader import check_context_memory, context_bytes
    cfg = Config.from_hf(dict(CFG))
    total, per, fixed = context_bytes(cfg, 1000)
    assert per >= 2 * 2 * 2 * 8 * 2 and total == per * 1000 + fixed          # f16 KV rows (the default)
    check_context_memory(cfg, 1000, available=total)                       # exactly fits
    with pytest.raises(ResourceLimitError, match=r"n_ctx <= 999 fits"):
        check_context_memory(cfg, 1000, available=total - 1)


# ---- tokenizer ids beyond the model's vocabulary -----------------------------------------------
def test_tokenizer_ids_beyond_vocab(tmp_path):
    folder = tmp_path / "big_tok"
    write_checkpoint(folder, dict(CFG, vocab_size=300), tokenizer="gpt2")   # gpt2 tokenizer: 50257 ids
    m = minilm.load(str(folder), n_ctx=32)
    assert m.tokenizer.unreachable_ids()[:1] == [300]
    msg = fails(ValueError, m.generate, "Hello world", max_new_tokens=2)
    assert "outside the model's vocabulary of 300" in msg and "Hello" in msg
    msg = fails(ValueError, m.chat, [{"role": "user", "content": "Hello world"}], max_tokens=2)
    assert "vocabulary" in msg
    assert isinstance(m.generate([5, 6, 7], max_new_tokens=3), str)      # in-range ids still run


# ---- shard index --------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/passwd", "a/../../x.safetensors",
                                    "..\\..\\x.safetensors"])
def test_index_cannot_leave_the_folder(folder, target):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": target}}))
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert "outside the model folder" in msg and "index" in msg


def test_index_symlink_escape(folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(folder / "model.safetensors", outside)
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "link.safetensors"}}))
    assert "outside the model folder" in fails(ModelLoadError, minilm.load, str(folder))


def test_index_hub_cache_symlinks_are_allowed(good, tmp_path):
    """The hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that is not an escape."""
    repo = tmp_path / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in good.iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", f.name))
    names = json.loads(open(good / "model.safetensors", "rb").read(8 + struct.unpack("<Q", open(
        good / "model.safetensors", "rb").read(8))[0])[8:])
    wm = {k: "model.safetensors" for k in names if k != "__metadata__"}
    (blobs / "index").write_text(json.dumps({"weight_map": wm}))
    (snap / "model.safetensors.index.json").symlink_to(os.path.join("..", "..", "blobs", "index"))
    assert isinstance(minilm.load(str(snap), n_ctx=32).generate(PROMPT, max_new_tokens=2), str)


@pytest.mark.parametrize("doc", [[], {"weight_map": []}, {"weight_map": {"a": 5}}, {"weight_map": {}},
                                 {"weight_map": {"a": None}}, "x"])
def test_index_malformed(folder, doc):
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    assert "index" in fails(ModelLoadError, minilm.load, str(folder))


# ---- safetensors headers and weights ----------------------------------------------------------
def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])
    edit(h)
    hb = json.dumps(h).encode()
    hb += b" " * (-(len(hb) + 8) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def _first(h):
    return next(k for k in h if k != "__metadata__")


@pytest.mark.parametrize("edit,words", [
    (lambda h: h[_first(h)].update(data_offsets=["0", "4"]), "data_offsets"),
    (lambda h: h[_first(h)].update(data_offsets=[-4, 0]), "data_offsets"),
    (lambda h: h[_first(h)].update(data_offsets=[0]), "data_offsets"),
    (lambda h: h[_first(h)].update(shape=[-1, 32]), "shape"),
    (lambda h: h[_first(h)].update(shape=[1.5, 32]), "shape"),
    (lambda h: h[_first(h)].update(dtype=7), "dtype"),
    (lambda h: h.update({_first(h): "x"}), "malformed"),
    (lambda h: h.update(__metadata__=[1]), "__metadata__"),
])
def test_safetensors_header_fields(folder, edit, words):
    _rewrite_header(folder / "model.safetensors", edit)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert words in msg and "model.safetensors" in msg


def test_overlapping_data_ranges(folder):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]
        n = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + n]
    _rewrite_header(folder / "model.safetensors", edit)
    assert "overlap" in fails(ModelLoadError, minilm.load, str(folder))


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(tmp_path, dtype, bad):
    t = random_tensors(hf_tensor_shapes(CFG))
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    folder = _write(tmp_path / "nan", tensors=t, dtype=dtype)
    msg = fails(NonFiniteWeightsError, minilm.load, str(folder), n_ctx=32)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.safetensors" in msg
    assert "[3, 5]" in msg and "check_weights=False" in msg
    m = minilm.load(str(folder), n_ctx=32, check_weights=False)       # the documented opt-out
    assert m.net is not None
    os.environ["MINILM_NO_WEIGHT_CHECK"] = "1"
    try:
        minilm.load(str(folder), n_ctx=32)
    finally:
        del os.environ["MINILM_NO_WEIGHT_CHECK"]
    # the quantizer meets the Inf when the check is off: still a minilm error naming the tensor
    if bad != np.nan and dtype == "F32":
        msg = fails(NonFiniteWeightsError, minilm.load, str(folder), quant="int8", check_weights=False)
        assert "l1.w_down" in msg


def test_check_weights_must_be_bool(good):
    assert "check_weights" in fails(ValueError, minilm.load, str(good), check_weights="no")


# ---- generation_config / tokenizer_config -----------------------------------------------------
@pytest.mark.parametrize("fn,content,words", [
    ("generation_config.json", {"eos_token_id": "x"}, "eos_token_id"),
    ("generation_config.json", {"eos_token_id": [2, [3]]}, "eos_token_id"),
    ("generation_config.json", [1, 2], "generation_config.json"),
    ("tokenizer_config.json", [1, 2], "tokenizer_config.json"),
    ("tokenizer_config.json", "x", "tokenizer_config.json"),
    ("tokenizer_config.json", {"bos_token": 5}, "bos_token"),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token"),
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template"),
])
def test_bad_side_configs(folder, fn, content, words):
    (folder / fn).write_text(json.dumps(content))
    msg = fails(ModelLoadError, minilm.load, str(folder), n_ctx=32)
    assert words in msg and fn in msg


# ---- pre-quantized folders --------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """{quant: pre-quantized folder} of the good checkpoint."""
    out = {}
    for q in ("int8", "int4", "bf16"):
        m = minilm.load(model.source, quant=q, n_ctx=32)
        out[q] = tmp_path_factory.mktemp("pq") / q
        m.save(out[q])
    return out


def _pq_copy(saved, q, tmp_path):
    dst = tmp_path / f"pq-{q}"
    shutil.copytree(saved[q], dst)
    return dst


def _edit_meta(folder, edit):
    p = folder / "minilm.json"
    meta = json.loads(p.read_text())
    r = edit(meta)
    if isinstance(r, list):          # the edit replaced the whole document
        meta = r
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,words", [
    (lambda m: [m], "JSON object"),
    (lambda m: m.pop("tensors"), "tensors"),
    (lambda m: m.update(tensors=[1]), "tensors"),
    (lambda m: m.update(quant="int3"), "quant"),
    (lambda m: m.update(quant=5), "quant"),
    (lambda m: m.update(group_size=7), "group_size"),
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m["tensors"]["l0.wqkv"].update(fmt="q9_9"), "unknown tensor format"),
    (lambda m: m["tensors"]["l0.wqkv"].update(N="8"), "N="),
    (lambda m: m["tensors"]["l0.wqkv"].update(arrays=["qs"]), "arrays"),
    (lambda m: m["tensors"]["l0.wqkv"].update(N=9999), "l0.wqkv"),
    (lambda m: m["tensors"].pop("l1.w_down"), "l1.w_down"),
    (lambda m: m["tensors"].update({"l0.wqkv": "x"}), "l0.wqkv"),
])
def test_prequant_meta(saved, tmp_path, edit, words):
    folder = _pq_copy(saved, "int4", tmp_path)
    _edit_meta(folder, edit)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert words in msg, msg


@pytest.mark.parametrize("q,tensor,dtype,shape,words", [
    ("int4", "l0.wqkv.qs", "I8", None, "l0.wqkv.qs"),         # q4_0 qs must be uint8
    ("int4", "l0.wqkv.d", None, [1, 1], "l0.wqkv.d"),
    ("int8", "l0.w_down.qs", None, [32, 16], "l0.w_down.qs"),
    ("bf16", "l0.wo.w", "F32", None, "l0.wo.w"),
    ("int8", "l0.attn_norm.w", None, [31], "l0.attn_norm.w"),
])
def test_prequant_array_dtype_and_shape(saved, tmp_path, q, tensor, dtype, shape, words):
    folder = _pq_copy(saved, q, tmp_path)

    def edit(h):
        e = h[tensor]
        if dtype is not None:
            e["dtype"] = dtype
        if shape is not None:                        # keep the byte length valid: shrink the range
            item = {"F32": 4, "F16": 2, "U8": 1, "I8": 1, "U16": 2}[e["dtype"]]
            e["shape"] = shape
            e["data_offsets"][1] = e["data_offsets"][0] + int(np.prod(shape)) * item
    _rewrite_header(folder / "model.minilm.safetensors", edit)
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert words in msg, msg


@pytest.mark.parametrize("change", [dict(vocab_size=10**12), dict(num_hidden_layers=10**6),
                                    dict(num_hidden_layers=1), dict(hidden_size=64)])
def test_prequant_config_mismatch_fails_before_allocating(saved, tmp_path, change):
    folder = _pq_copy(saved, "int8", tmp_path)
    set_config(folder, **change)
    t = time.perf_counter()
    msg = fails(ModelLoadError, minilm.load, str(folder))
    assert time.perf_counter() - t < 10, msg


def test_prequant_missing_array(saved, tmp_path):
    folder = _pq_copy(saved, "int4", tmp_path)
    _rewrite_header(folder / "model.minilm.safetensors", lambda h: h.pop("l1.w_down.d"))
    assert "l1.w_down.d" in fails(ModelLoadError, minilm.load, str(folder))


def test_prequant_nan_scale(saved, tmp_path):
    folder = _pq_copy(saved, "int8", tmp_path)
    p = folder / "model.minilm.safetensors"
    raw = bytearray(p.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])
    off = 8 + n + h["l0.wo.d"]["data_offsets"][0]
    raw[off:off + 2] = np.array([np.nan], np.float16).tobytes()
    p.write_bytes(bytes(raw))
    assert "l0.wo.d" in fails(NonFiniteWeightsError, minilm.load, str(folder))
    minilm.load(str(folder), check_weights=False)


def test_prequant_round_trip_still_works(saved, model, greedy):
    m = minilm.load(str(saved["bf16"]), n_ctx=64)
    assert isinstance(m.generate(PROMPT, max_new_tokens=4), str)


# ---- GGUF ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory):
    pytest.importorskip("gguf")
    from minilm.gguf_io import export_gguf
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(minilm.load(model.source, quant="int8", n_ctx=32), out, "int8", verbose=False)
    return out


def test_gguf_truncated_names_the_tensor(gguf_file, tmp_path):
    raw = gguf_file.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(raw[:len(raw) - 100])
    msg = fails(ModelLoadError, minilm.load, str(p))
    assert "truncated" in msg and "'" in msg


def _gguf_with(tmp_path, src, meta=None, tensor_edit=None):
    """Rewrite a GGUF (metadata overrides, tensor arrays replaced) with gguf-py."""
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), r.fields["general.architecture"].contents())
    meta = meta or {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = meta.pop(k, f.contents())
        if v is None:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
    for k, v in meta.items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, float(v))
    for t in r.tensors:
        data = np.array(t.data)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        if tensor_edit and t.name in tensor_edit:
            data, shape = tensor_edit[t.name](data, shape)
        if t.tensor_type.name in ("F32", "F16"):
            w.add_tensor(t.name, data.reshape(shape))
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "x.gguf"


def test_gguf_metadata_types(gguf_file, tmp_path):
    p = _gguf_with(tmp_path, gguf_file, meta={"llama.embedding_length": "32"})
    assert "llama.embedding_length" in fails(ModelLoadError, minilm.load, str(p))


def test_gguf_short_norm_vector(gguf_file, tmp_path):
    p = _gguf_with(tmp_path, gguf_file, tensor_edit={"blk.0.attn_norm.weight": lambda d, s: (d[:16], [16])})
    msg = fails(ModelLoadError, minilm.load, str(p))
    assert "blk.0.attn_norm.weight" in msg and "16" in msg


def test_gguf_nan_and_opt_out(gguf_file, tmp_path):
    def nan(d, s):
        d = d.copy()
        d[0] = np.nan
        return d, s
    p = _gguf_with(tmp_path, gguf_file, tensor_edit={"output_norm.weight": nan})
    assert "output_norm.weight" in fails(NonFiniteWeightsError, minilm.load, str(p))
    minilm.load(str(p), check_weights=False)


def test_gguf_loads_and_matches(gguf_file, model):
    m = minilm.load(str(gguf_file), n_ctx=64)
    assert isinstance(m.generate(PROMPT, max_new_tokens=4), str)


# ---- parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(seed="abc"), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(stop=5), "stop"), (dict(stop=[None]), "stop"), (dict(stop="x\ud800"), "stop"),
    (dict(stream="yes"), "stream"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens="3"), "max_new_tokens"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=2.0), "top_p"), (dict(top_k=1.5), "top_k"), (dict(max_new_tokens=10**12), "n_ctx"),
    (dict(temperature=10**400), "temperature"), (dict(repetition_penalty=-10**30), "repetition_penalty"),
])
def test_bad_generate_params(model, greedy, kw, words):
    msg = fails((ValueError, TypeError, MinilmError), model.generate, PROMPT, **kw)
    assert words in msg
    assert model.generate(PROMPT, max_new_tokens=8) == greedy


@pytest.mark.parametrize("prompt", [None, 5, {"a": 1}, [], [1.5], [[1]], [10**9], [-1], [True], "x\ud800y"])
def test_bad_prompts(model, greedy, prompt):
    msg = fails((ValueError, TypeError), model.generate, prompt, max_new_tokens=2)
    assert "prompt" in msg or "ids" in msg or "text" in msg
    assert model.generate(PROMPT, max_new_tokens=8) == greedy


@pytest.mark.parametrize("kw", [dict(threads=0), dict(threads=True), dict(n_ctx=0), dict(n_ctx="8"),
                                dict(n_ctx=2.5), dict(quant=5), dict(quant="int3")])
def test_bad_load_params(good, kw):
    msg = fails((ValueError, TypeError), minilm.load, str(good), **kw)
    assert list(kw)[0] in msg


def test_bad_path_type():
    assert "path" in fails(TypeError, minilm.load, None)


# ---- chat templates ---------------------------------------------------------------------------
class _Tok:
    def __init__(self, t):
        self.config = {"chat_template": t}
        self.bos_token, self.eos_token = "<s>", "</s>"


MSGS = [{"role": "user", "content": "hi"}]
HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iteration limit"),
    ("{{ 'x' * 10**9 }}", "repetition"),
    ("{{ [0] * 10**9 }}", "repetition"),
    ("{% include 'other.jinja' %}", "include"),
    ("{% import 'm.jinja' as m %}", "import"),
    ("{% from 'm.jinja' import f %}", "import"),
    ("{% extends 'base.jinja' %}", "extends"),
    ("{{ range(10**9)|list }}", "range"),
    ("{{ 'x'.ljust(10**9) }}", "ljust"),
    ("{{ 'x'|center(10**9) }}", "center"),
    ("{{ '%1000000000d' % 1 }}", "format string"),
    ("{{ '{:>{w}}'.format(1, w=10**9) }}", "width"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'+'"),
    ("{{ (['x' * 1000000] * 1000)|join }}", "join"),
    ("{{ ('a' * 1000000)|replace('a', 'bbbbbbbbbbbbbbbb') }}", "replace"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered text"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ 2 ** 1000000 }}", "too large"),
    ("{{ lipsum(10**9) }}", "lipsum"),
    ("{% for %}", "syntax error"),
    ("{{ raise_exception('bad turn order') }}", "bad turn order"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template"),
]


@pytest.mark.parametrize("template,words", HOSTILE_TEMPLATES)
def test_hostile_templates(template, words):
    from minilm import chat as C
    t = time.perf_counter()
    with pytest.raises(TemplateError) as e:
        C.render_chat(_Tok(template), MSGS)
    assert time.perf_counter() - t < 10
    assert words in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError) and e.value.param == "messages"


def test_template_render_time_limit(monkeypatch):
    """Exponential macro recursion has no loop to count: the deadline stops it."""
    from minilm import chat as C
    from minilm import chat_template as CT
    monkeypatch.setattr(CT, "MAX_RENDER_SECONDS", 0.5)
    t = time.perf_counter()
    with pytest.raises(TemplateError, match="render time limit"):
        C.render_chat(_Tok("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}"
                           "{% endmacro %}{{ f(60) }}"), MSGS)
    assert time.perf_counter() - t < 5


def test_normal_templates_still_render():
    from minilm import chat as C
    t = ("{{ bos_token }}{% for m in messages %}{{ '<|' ~ m.role ~ '|>' }}{{ m.content | trim }}"
         "{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
         "{{ messages|length }}{{ (messages|map(attribute='role')|list)|join(',') }}{{ '%s-%d'|format('a', 3) }}")
    assert C.render_chat(_Tok(t), MSGS + [{"role": "assistant", "content": " ok "}]) == \
        "<s><|user|>hi<|assistant|>ok<|assistant|>2user,assistanta-3"     # trim_blocks eats the newline


def test_template_error_through_model_keeps_greedy(model, greedy):
    from minilm.chat import ChatTemplateError
    tok = model.tokenizer
    old = tok.config
    try:
        tok.config = dict(old, chat_template="{{ 'x' * 10**9 }}")
        fails(ChatTemplateError, model.chat, [{"role": "user", "content": "hi"}], max_tokens=2)
        tok.config = dict(old, chat_template="{% include 'x' %}")
        fails(ChatTemplateError, model.create_chat_completion, [{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        tok.config = old
    assert model.generate(PROMPT, max_new_tokens=8) == greedy


# ---- server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from minilm.server import create_app
    with TestClient(create_app(model)) as c:
        yield c


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\ud800"}]}, "messages[0].content"),
    ("/v1/completions", {"prompt": "x\udfff"}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": "a\ud83d"}, "stop"),
])
def test_server_lone_surrogates(client, path, body, param):
    raw = json.dumps(body)                     # ensure_ascii: the surrogate travels as a \ud800 escape
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]


@pytest.mark.parametrize("field,value", [("temperature", 10**400), ("top_p", 10**30), ("seed", "x"),
                                         ("stop", 5), ("max_tokens", 10**30)])
def test_server_bad_numbers_are_400(client, field, value):
    body = {"prompt": "hi", "max_tokens": 2, field: value}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_server_deeply_nested_body(client):
    raw = b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_server_header_limit(client):
    r = client.get("/health", headers={"x-big": "a" * 40000})
    assert r.status_code == 431 and "headers" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_serve_sets_uvicorn_header_limit(model, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    from minilm import server
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    server.serve(model, port=1)
    assert seen["h11_max_incomplete_event_size"] == server.MAX_HEADERS and seen["http"] == "h11"


def test_server_template_error_is_400_and_keeps_serving(client, model, greedy):
    tok = model.tokenizer
    old = tok.config
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    try:
        for t in ("{% include 'x' %}", "{{ 'x' * 10**9 }}", "{% for %}"):
            tok.config = dict(old, chat_template=t)
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_chat_template"
    finally:
        tok.config = old
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert model.generate(PROMPT, max_new_tokens=8) == greedy
