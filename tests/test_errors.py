"""Bad input gives one clear minilm exception whose message names the file, tensor or parameter
at fault (never a bare numpy / KeyError / json traceback)."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import minilm
from minilm.errors import ContextOverflowError, ModelLoadError, UnsupportedModelError

from conftest import hf_tensor_shapes, random_tensors, shared_path, write_checkpoint

CFG = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=48,
           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
           bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("good") / "m", CFG)


@pytest.fixture(scope="module")
def model(good_folder):
    return minilm.load(str(good_folder), n_ctx=32)


@pytest.fixture
def folder(good_folder, tmp_path):
    """A fresh, writable copy of the good checkpoint to break."""
    dst = tmp_path / "m"
    shutil.copytree(good_folder, dst)
    return dst


def load_error(path, exc=ModelLoadError, **kw):
    with pytest.raises(MinilmOrValue) as ei:
        minilm.load(str(path), **kw)
    assert type(ei.value) is exc, f"expected {exc.__name__}, got {type(ei.value).__name__}: {ei.value}"
    return str(ei.value)


MinilmOrValue = (minilm.MinilmError, ValueError)


def test_good_checkpoint_loads(model):
    assert model.logits([1, 2, 3]).shape == (3, 512)


# ---- folder / config -----------------------------------------------------------------------
def test_missing_folder(tmp_path):
    p = tmp_path / "no_such_model"
    msg = load_error(p)
    assert "no_such_model" in msg and "not found" in msg


def test_path_is_a_file(folder):
    msg = load_error(folder / "config.json")
    assert "config.json" in msg


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    msg = load_error(folder)
    assert "config.json" in msg and "not found" in msg


def test_config_not_json(folder):
    (folder / "config.json").write_text("{ this is not json")
    msg = load_error(folder)
    assert "config.json" in msg and "JSON" in msg


def test_config_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2, 3]")
    msg = load_error(folder)
    assert "config.json" in msg


def test_unsupported_model_type(folder):
    (folder / "config.json").write_text(json.dumps({**CFG, "model_type": "bert"}))
    msg = load_error(folder, UnsupportedModelError)
    assert "'bert'" in msg
    for t in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"):
        assert t in msg, f"supported type {t} not listed: {msg}"


def test_missing_model_type(folder):
    cfg = dict(CFG)
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = load_error(folder, UnsupportedModelError)
    assert "model_type" in msg


def test_config_missing_required_key(folder):
    cfg = dict(CFG)
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = load_error(folder)
    assert "hidden_size" in msg and "config.json" in msg


def test_unsupported_rope_scaling(folder):
    (folder / "config.json").write_text(json.dumps({**CFG, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    msg = load_error(folder)
    assert "yarn" in msg and "rope_scaling" in msg


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    msg = load_error(folder)
    assert "tokenizer.json" in msg


# ---- safetensors -----------------------------------------------------------------------------
def test_missing_safetensors(folder):
    (folder / "model.safetensors").unlink()
    msg = load_error(folder)
    assert "safetensors" in msg and str(folder) in msg


def test_truncated_safetensors(folder):
    p = folder / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 1000])
    msg = load_error(folder)
    assert "model.safetensors" in msg and "truncated" in msg


def test_safetensors_shorter_than_header_length(folder):
    (folder / "model.safetensors").write_bytes(b"\x01\x02\x03")
    msg = load_error(folder)
    assert "model.safetensors" in msg


def test_garbage_header(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 64) + bytes(range(200, 256)) * 2)
    msg = load_error(folder)
    assert "model.safetensors" in msg and "header" in msg


def test_header_length_larger_than_file(folder):
    p = folder / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    msg = load_error(folder)
    assert "model.safetensors" in msg and "header" in msg


def test_header_entry_malformed(folder):
    p = folder / "model.safetensors"
    h = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [32]}}).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 128)
    msg = load_error(folder)
    assert "model.norm.weight" in msg


def test_index_points_to_missing_shard(good_folder, tmp_path):
    f = write_checkpoint(tmp_path / "sharded", CFG, shards=2)
    (f / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(f)
    assert "model-00002-of-00002.safetensors" in msg


def test_index_not_json(good_folder, tmp_path):
    f = write_checkpoint(tmp_path / "sharded", CFG, shards=2)
    (f / "model.safetensors.index.json").write_text("nope")
    msg = load_error(f)
    assert "model.safetensors.index.json" in msg


def _rewrite(folder, edit):
    t = random_tensors(hf_tensor_shapes(CFG))
    edit(t)
    (folder / "model.safetensors").unlink()
    write_checkpoint(folder, CFG, tensors=t)


def test_tensor_wrong_shape(folder):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(folder, lambda t: t.__setitem__(name, np.zeros((8, 32), np.float32)))
    msg = load_error(folder)
    assert name in msg and "shape" in msg and "[8, 32]" in msg


def test_missing_tensor(folder):
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(folder, lambda t: t.pop(name))
    msg = load_error(folder)
    assert name in msg and "missing" in msg


def test_tensor_int_dtype(folder):
    from safetensors.numpy import save_file

    name = "model.norm.weight"
    t = random_tensors(hf_tensor_shapes(CFG))
    t[name] = np.ones(32, np.int32)
    save_file(t, str(folder / "model.safetensors"))
    msg = load_error(folder)
    assert name in msg and "I32" in msg


# ---- load parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("n_ctx", [0, -5, 2.5, True])
def test_bad_n_ctx(good_folder, n_ctx):
    with pytest.raises(ValueError, match="n_ctx"):
        minilm.load(str(good_folder), n_ctx=n_ctx)


def test_bad_quant(good_folder):
    with pytest.raises(ValueError, match="quant"):
        minilm.load(str(good_folder), quant="q3_weird")


# ---- generate parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("kw,param", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
@pytest.mark.parametrize("api", ["generate", "stream", "generate_ids"])
def test_bad_generate_params(model, kw, param, api):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError) as ei:
        if api == "generate":
            model.generate("hello", **kw)
        elif api == "stream":
            model.generate("hello", stream=True, **kw)     # raised eagerly, before iterating
        else:
            model.generate_ids([1, 2, 3], **kw)
    assert type(ei.value) is ValueError
    assert param in str(ei.value)


@pytest.mark.parametrize("stop", ["", [""], ["ok", 3]])
def test_bad_stop(model, stop):
    with pytest.raises(ValueError, match="stop"):
        model.generate("hello", max_new_tokens=2, stop=stop)


def test_context_overflow_generate(model):
    ids = list(range(3, 23))                                # 20 tokens, n_ctx 32
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        model.generate_ids(ids, 13)
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        model.generate(ids, max_new_tokens=13)
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        list(model.generate(ids, max_new_tokens=13, stream=True))
    assert len(model.generate_ids(ids, 12, ignore_eos=True)) == 12    # exactly n_ctx is fine


def test_context_overflow_stream_is_eager(model):
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        model.generate(list(range(3, 23)), max_new_tokens=13, stream=True)


def test_context_overflow_logits(model):
    with pytest.raises(ContextOverflowError):
        model.logits(list(range(3, 36)))                    # 33 > n_ctx 32
    assert issubclass(ContextOverflowError, ValueError)


@pytest.mark.parametrize("ids", [[1, 512], [-1, 3], [1, 10**6]])
def test_token_ids_out_of_range(model, ids):
    with pytest.raises(ValueError, match="512") as ei:
        model.logits(ids)
    assert type(ei.value) is ValueError
    with pytest.raises(ValueError, match="512"):
        model.generate_ids(ids, 2)
    with pytest.raises(ValueError, match="512"):
        model.perplexity(ids)


@pytest.mark.parametrize("ids", [[], [[1, 2]], [1.5, 2.0]])
def test_bad_ids(model, ids):
    with pytest.raises(ValueError, match="ids"):
        model.logits(ids)


def test_tokenizer_not_readable(folder):
    (folder / "tokenizer.json").write_text("garbage")
    msg = load_error(folder)
    assert "tokenizer.json" in msg


def test_heads_not_multiple_of_kv_heads(folder):
    (folder / "config.json").write_text(json.dumps({**CFG, "num_attention_heads": 4, "num_key_value_heads": 3}))
    msg = load_error(folder)
    assert "num_key_value_heads" in msg


def test_zero_kv_heads(folder):
    (folder / "config.json").write_text(json.dumps({**CFG, "num_key_value_heads": 0}))
    msg = load_error(folder)
    assert "num_key_value_heads" in msg


@pytest.mark.parametrize("sc,key", [({"rope_type": "llama3", "factor": 8.0}, "original_max_position_embeddings"),
                                    ({"type": "linear"}, "factor")])
def test_rope_scaling_missing_key(folder, sc, key):
    (folder / "config.json").write_text(json.dumps({**CFG, "rope_scaling": sc}))
    msg = load_error(folder)
    assert key in msg and "rope_scaling" in msg


def test_gpt2_n_ctx_beyond_learned_positions():
    folder = shared_path("models", "proxy-gpt2-shakespeare")
    with pytest.raises(ValueError, match="n_ctx"):
        minilm.load(str(folder), n_ctx=257)
