"""GGUF interop (minilm/gguf_io.py): export -> load round trips, tokenizer metadata, errors, and
llama.cpp (llama-cpp-python) agreement on exported files when it is installed."""
from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install gguf, or the "
                                          "`test` extra): GGUF import/export is not tested")

import minilm  # noqa: E402 (after importorskip)
from minilm.errors import ModelLoadError  # noqa: E402 (after importorskip)
from minilm.gguf_io import export_gguf, load_gguf  # noqa: E402 (after importorskip)
from minilm.quant import FORMATS, Linear  # noqa: E402 (after importorskip)
from minilm.sources import (  # noqa: E402 (after importorskip)
    GGUFMeta,
    GGUFSource,
    ggml_bytes,
    gguf_layout,
    gguf_tokenizer,
    linear_from_ggml,
    map_rows,
    open_gguf,
    permute_rows,
    tensor_bytes,
    tensor_format,
    unpermute_rows,
)

from conftest import shared_path  # noqa: E402 (after importorskip)

_EXPORTS: dict = {}


def golden_ids(name: str) -> list[list[int]]:
    g = json.loads(shared_path("golden", f"{name}.json").read_text())
    return [c["input_ids"] for c in g["cases"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name, quant) -> (original LM loaded with that quant, path of its GGUF export)."""
    def get(name, quant):
        key = (name, quant)
        if key not in _EXPORTS:
            src = shared_path("models", name)
            m = minilm.load(src, quant=quant, n_ctx=128)
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{quant}.gguf"
            export_gguf(m, out, quant, verbose=False)
            _EXPORTS[key] = (m, out)
        return _EXPORTS[key]
    return get


CASES = [("stories260K", "f32"), ("stories260K", "int8"), ("stories260K", "int4"),
         ("proxy-qwen2-shakespeare", "f32"), ("proxy-qwen2-shakespeare", "int8"),
         ("proxy-qwen2-shakespeare", "int4"), ("proxy-qwen3-shakespeare", "int4")]
# the architectures beyond the llama family (issue 13): each exports and loads back exactly
ARCH_MODELS = ["proxy-gpt2-shakespeare", "proxy-neox-shakespeare", "proxy-gemma2-shakespeare",
               "proxy-gemma3-shakespeare", "proxy-phi3-shakespeare", "proxy-smollm3-shakespeare",
               "proxy-olmo2-shakespeare", "proxy-granite-shakespeare", "proxy-lfm2-shakespeare"]
CASES += [(n, "f32") for n in ARCH_MODELS] + [(n, "int8") for n in ("proxy-gemma3-shakespeare",
                                                                     "proxy-phi3-shakespeare",
                                                                     "proxy-lfm2-shakespeare")]


@pytest.mark.parametrize("name,quant", CASES)
def test_round_trip_identical(exported, name, quant):
    m, path = exported(name, quant)
    g = minilm.load(str(path), n_ctx=128)
    assert g.quant == quant
    assert g.config.n_layers == m.config.n_layers and g.config.vocab_size == m.config.vocab_size
    assert g.config.tie_word_embeddings == m.config.tie_word_embeddings
    # every canonical tensor comes back in the same format with the same bytes
    assert set(g.tensors) == set(m.tensors)
    for k, a in m.tensors.items():
        b = g.tensors[k]
        if isinstance(a, Linear):
            assert (b.fmt, b.N, b.K, b.Kp) == (a.fmt, a.N, a.K, a.Kp), k
            for arr in a.arrays:
                np.testing.assert_array_equal(b.arrays[arr], a.arrays[arr], err_msg=f"{k}.{arr}")
        else:
            np.testing.assert_array_equal(b, a, err_msg=k)
    for ids in golden_ids(name):
        np.testing.assert_array_equal(g.logits(ids), m.logits(ids))
        assert g.tokenizer.encode(m.tokenizer.decode(ids)) == m.tokenizer.encode(m.tokenizer.decode(ids))
    assert g.eos_token_ids == m.eos_token_ids

@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_blocks_match_gguf_py_dequantizer(exported, quant):
    """gguf-py's own ggml dequantizer reads our Q8_0/Q4_0 blocks as our weights (llama.cpp's layout)."""
    from gguf.quants import dequantize

    m, path = exported("proxy-qwen2-shakespeare", quant)
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    c = m.config
    for gname, cname, rows in [("blk.1.attn_q.weight", "l1.wqkv", slice(0, c.q_dim)),
                               ("blk.1.attn_v.weight", "l1.wqkv", slice(c.q_dim + c.kv_dim, None)),
                               ("blk.1.ffn_up.weight", "l1.w_gate_up", slice(c.intermediate_size, None)),
                               ("blk.1.ffn_down.weight", "l1.w_down", slice(None)),
                               ("token_embd.weight", "tok_embd", slice(None))]:
        x = t[gname]
        lin = m.tensors[cname]
        assert x.tensor_type.name == {"q8_0": "Q8_0", "q4_0": "Q4_0", "f16": "F16"}[lin.fmt], gname
        ours = FORMATS[lin.fmt].unpack(lin.arrays)[rows, :lin.K]
        theirs = dequantize(np.asarray(x.data), x.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(theirs, ours, err_msg=gname)


def test_gguf_metadata_for_llama_cpp(exported):
    _, path = exported("stories260K", "int8")
    r = gguf.GGUFReader(str(path))
    f = lambda k: r.fields[k].contents()
    assert f("general.architecture") == "llama"
    assert f("tokenizer.ggml.model") == "llama"
    assert f("tokenizer.ggml.bos_token_id") == 1 and f("tokenizer.ggml.eos_token_id") == 2
    assert f("tokenizer.ggml.add_bos_token") is True
    assert len(f("tokenizer.ggml.tokens")) == 512 and len(f("tokenizer.ggml.scores")) == 512
    assert f("llama.attention.head_count_kv") == 4
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_gate.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F32"        # width 172: no Q8_0 blocks, exact F32
    assert types["token_embd.weight"] == "F16" and "output.weight" not in types   # tied
    _, path = exported("proxy-qwen2-shakespeare", "int4")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 1000
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_q.bias"] == "F32"


def test_llama_qk_rows_are_permuted(exported):
    """attn_q/attn_k hold llama.cpp's interleaved-pair RoPE rows (convert_hf_to_gguf permute)."""
    m, path = exported("stories260K", "f32")
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    c = m.config
    wq = m.tensors["l0.wqkv"].arrays["w"][:c.q_dim]
    hf = wq.reshape(c.n_heads, 2, c.head_dim // 2, -1).swapaxes(1, 2).reshape(wq.shape)
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.weight"].data), hf)
    a = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(a, 6), 6), a)


def test_tokenizer_from_ggml_metadata(exported):
    """Without the embedded tokenizer.json the tokenizer is rebuilt from tokenizer.ggml.* alone."""
    text = shared_path("texts").glob("*.txt")
    samples = ["Once upon a time", " two  spaces\n\nnew\tline", "héllo wörld 12345 🙂", "ROMEO:\nI will"]
    for p in list(text)[:2]:
        samples += p.read_text(encoding="utf-8", errors="ignore")[:6000].split("\n\n")
    for name in ("stories260K", "proxy-qwen2-shakespeare"):
        m, path = exported(name, "int8")
        meta = GGUFMeta(gguf.GGUFReader(str(path)), path)
        tok = gguf_tokenizer(meta, m.config, use_hf_json=False)
        for s in samples:
            ids = m.tokenizer.encode(s)
            assert tok.encode(s) == ids, (name, s)
            assert tok.decode(ids) == m.tokenizer.decode(ids), (name, s)


def test_load_requantizes_float_gguf(exported):
    _, path = exported("proxy-qwen2-shakespeare", "f32")
    g = load_gguf(path, quant="int8", n_ctx=64)
    ref, _ = exported("proxy-qwen2-shakespeare", "int8")
    ids = golden_ids("proxy-qwen2-shakespeare")[0]
    np.testing.assert_array_equal(g.logits(ids), ref.logits(ids))
    _, qpath = exported("proxy-qwen2-shakespeare", "int4")
    with pytest.raises(ValueError, match="already quantized"):
        load_gguf(qpath, quant="int8")


def test_export_errors(exported, tmp_path):
    m, _ = exported("stories260K", "f32")
    with pytest.raises(ValueError, match="group"):
        export_gguf(m, tmp_path / "x.gguf", "int4-g64")
    with pytest.raises(ValueError, match="supports"):
        export_gguf(m, tmp_path / "x.gguf", "iq2_xxs")
    g64 = minilm.load(shared_path("models", "proxy-qwen2-shakespeare"), quant="int4-g64", n_ctx=16)
    with pytest.raises(ValueError, match="group"):
        export_gguf(g64, tmp_path / "x.gguf")


def _tiny_gguf(path, emb_type, fill=None):
    """A minimal llama GGUF with a token embedding of GGML type `emb_type` (raw bytes: `fill`,
    default zeros)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(0)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(65 + i) for i in range(8)])
    bs, ts = gguf.GGML_QUANT_SIZES[emb_type]
    raw = np.zeros((8, 32 // bs * ts), np.uint8) if fill is None else fill
    w.add_tensor("token_embd.weight", raw, raw_dtype=emb_type)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "mxfp4.gguf"                            # a ggml type minilm has no kernels for
    _tiny_gguf(p, gguf.GGMLQuantizationType.MXFP4)
    with pytest.raises(ModelLoadError, match=r"token_embd\.weight.*MXFP4"):
        minilm.load(str(p))


def test_not_a_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="GGUF"):
        minilm.load(str(p))


def test_cli_export(tmp_path, capsys):
    from minilm.cli import main
    shared_path("models", "stories260K")
    out = tmp_path / "s.gguf"
    assert main(["export", "-m", str(shared_path("models", "stories260K")), "--gguf", str(out),
                 "--quant", "int4"]) == 0
    assert "F32" in capsys.readouterr().out               # the note about ffn_down (width 172)
    assert minilm.load(str(out), n_ctx=32).quant == "int4"
    assert main(["export", "-m", str(shared_path("models", "stories260K")), "--gguf", str(out),
                 "--quant", "int4-g128"]) == 1


# ---- the GGUF source ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,quant", [("stories260K", "int8"), ("proxy-qwen2-shakespeare", "int4"),
                                        ("proxy-qwen3-shakespeare", "int4")])
def test_one_name_table(exported, name, quant):
    """export_gguf writes exactly the GGUF tensors that gguf_layout names for the config (the
    table the GGUF source reads), one entry per canonical tensor of the model."""
    m, path = exported(name, quant)
    r = gguf.GGUFReader(str(path))
    layout = gguf_layout(m.config, r.fields["general.architecture"].contents())
    assert set(layout) == set(m.tensors)
    assert {t.name for t in r.tensors} == {p.gguf for parts in layout.values() for p in parts}
    assert [p.gguf for p in layout["l0.wqkv"]] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                                    "blk.0.attn_v.weight"]
    c = m.config
    assert [(p.a, p.b) for p in layout["l1.w_gate_up"]] == [(0, c.intermediate_size),
                                                            (c.intermediate_size, 2 * c.intermediate_size)]
    llama = name == "stories260K"
    assert [p.heads for p in layout["l0.wqkv"]] == ([c.n_heads, c.n_kv_heads, None] if llama else [None] * 3)


@pytest.mark.parametrize("name", ["proxy-qwen2-shakespeare", "proxy-llama256-shakespeare", *ARCH_MODELS])
def test_names_as_llama_cpp_convert_writes_them(exported, name):
    """The tensors of our export are the ones llama.cpp's convert_hf_to_gguf.py writes for the same
    checkpoint: each HF tensor mapped through gguf-py's TensorNameMap (the table convert uses), plus
    the tensors convert derives (Phi-3's rope factors); NeoX/GPT-2/Phi-3 keep q, k, v fused."""
    from safetensors import safe_open

    m, path = exported(name, "f32")
    folder = shared_path("models", name)
    arch = gguf.MODEL_ARCH[{"gpt_neox": "GPTNEOX", "gemma3_text": "GEMMA3"}.get(m.config.model_type,
                                                                                m.config.model_type.upper())]
    tmap = gguf.get_tensor_name_map(arch, m.config.n_layers)
    theirs = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                if k.endswith(".attn.bias") or k.endswith("rotary_emb.inv_freq"):   # buffers, not weights
                    continue
                g = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
                assert g is not None, (name, k)
                theirs.add(g)
    if arch == gguf.MODEL_ARCH.PHI3:
        theirs |= {"rope_factors_long.weight", "rope_factors_short.weight"}
    ours = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ours == theirs, (name, sorted(ours ^ theirs))
    expected = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    assert {n.replace(f"blk.{n.split('.')[1]}.", "blk.{bid}.") if n.startswith("blk.") else n
            for n in (x.rsplit(".", 1)[0] for x in ours)} <= expected


def _mapped(a) -> bool:
    """a is a view into a memory-mapped file (not a copy)."""
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def test_gguf_tensors_stay_mapped(exported):
    """Float tensors that are one GGUF tensor each come out as views of the mapped file."""
    _, path = exported("proxy-qwen2-shakespeare", "f32")
    src = GGUFSource(path)
    src.check()
    T = {n: get() for n, get in src.tensors()}
    for name in ("tok_embd", "l0.wo", "l1.w_down"):
        assert T[name].fmt == "f32" and _mapped(T[name].arrays["w"]), name
    assert _mapped(T["out_norm.w"]) and _mapped(T["l0.attn_norm.w"])
    assert not _mapped(T["l0.wqkv"].arrays["w"])      # q, k, v fused: one copy


def test_every_tensor_checked_before_any_is_built(exported, monkeypatch):
    """A tensor missing from the LAST layer fails before any tensor is mapped, fused or converted."""
    import minilm.sources as S
    from minilm.loader import load_source
    _, path = exported("proxy-qwen2-shakespeare", "int8")
    src = GGUFSource(path)
    last = f"blk.{src.config.n_layers - 1}.ffn_down.weight"
    del src.gt[last]

    def boom(*a, **k):
        raise AssertionError("a tensor was built before all were checked")
    monkeypatch.setattr(S, "linear_from_ggml", boom)
    monkeypatch.setattr(S, "cat_rows", boom)
    with pytest.raises(ModelLoadError, match=last.replace(".", r"\.") + ".*missing"):
        load_source(src, n_ctx=16)


def test_raw_ggml_format_maps_bytes_without_conversion(tmp_path, monkeypatch):
    """A format registered with arrays ("raw",) (ggml's own block rows, as K-quants will be)
    takes a GGUF tensor's bytes as they are in the mapped file, and writes them back unchanged."""
    import dataclasses

    from minilm import quant
    from minilm.kernels import qmatmul
    fake = dataclasses.replace(FORMATS["q4_0"], name="q4_1", fid=99, tag=np.uint32, ggml_type=3,
                               ggml_name="Q4_1", block=32, block_bytes=20, arrays=("raw",))
    monkeypatch.setitem(quant.FORMATS, "q4_1", fake)
    monkeypatch.setitem(quant.GGML_TO_FMT, "Q4_1", "q4_1")
    monkeypatch.setattr(qmatmul, "gemv_bound", lambda fmt, arrays: (None, arrays))   # no kernel needed here
    p = tmp_path / "q41.gguf"
    _tiny_gguf(p, gguf.GGMLQuantizationType.Q4_1, fill=np.arange(8 * 20, dtype=np.uint8).reshape(8, 20))
    r = open_gguf(p)
    t = {x.name: x for x in r.tensors}["token_embd.weight"]
    fmt = tensor_format(t, p)
    assert fmt == "q4_1"
    lin = linear_from_ggml(fmt, tensor_bytes(t, p, 8 * 20).reshape(8, 20), 8, 32)
    assert (lin.fmt, lin.N, lin.K, list(lin.arrays)) == ("q4_1", 8, 32, ["raw"])
    assert _mapped(lin.arrays["raw"])
    np.testing.assert_array_equal(lin.arrays["raw"], np.arange(8 * 20, dtype=np.uint8).reshape(8, 20))
    np.testing.assert_array_equal(ggml_bytes(lin), lin.arrays["raw"])
    # llama's q/k row permutation moves whole block rows: undone exactly
    perm = map_rows(lin, lambda a: permute_rows(a, 2))
    assert not np.array_equal(perm.arrays["raw"], lin.arrays["raw"])
    np.testing.assert_array_equal(unpermute_rows(perm.arrays["raw"], 2), lin.arrays["raw"])


# ---- llama.cpp ----------------------------------------------------------------------------------
@pytest.fixture
def llama_cpp(monkeypatch):
    lc = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the llama.cpp "
                                                 "cross-check of exported GGUF files is skipped")
    import llama_cpp.llama as L
    default = lc.llama_model_default_params

    def params():
        # No extra buffer types (AMX / repacked weights): on CPUs that report AMX where the OS or
        # sandbox has not enabled the tile state, a -march=native build dies of SIGILL on Q8_0/Q4_0.
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p
    monkeypatch.setattr(L.llama_cpp, "llama_model_default_params", params)
    return lc


@pytest.mark.parametrize("name,quant", [("stories260K", "f32"), ("stories260K", "int8"), ("stories260K", "int4"),
                                        ("proxy-qwen2-shakespeare", "f32"), ("proxy-qwen2-shakespeare", "int8"),
                                        ("proxy-qwen2-shakespeare", "int4"), ("proxy-qwen3-shakespeare", "int4")])
def test_llama_cpp_agrees(exported, llama_cpp, name, quant):
    """llama.cpp runs our exported file to the same predictions (its KV cache is f16 and it quantizes
    activations its own way, so logits agree closely, not bit for bit)."""
    m, path = exported(name, quant)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    agree = total = 0
    for ids in golden_ids(name):
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
        ours = m.logits(ids)
        assert int(theirs[-1].argmax()) == int(ours[-1].argmax()), (name, quant, ids)   # next token
        agree += int((theirs.argmax(1) == ours.argmax(1)).sum())
        total += len(ids)
        tol = 0.05 if quant == "f32" else 0.05 * float(np.abs(ours).max())
        assert np.abs(theirs - ours).max() < tol, (name, quant, float(np.abs(theirs - ours).max()))
        # llama.cpp's tokenizer reads our exported vocabulary (scores / merges) the same way
        text = m.tokenizer.decode(ids)
        assert llm.tokenize(text.encode("utf-8"), add_bos=bool(ids[0] == m.tokenizer.bos_token_id),
                            special=False) == m.tokenizer.encode(text)
    assert agree >= 0.9 * total, (name, quant, agree, total)


def test_export_refuses_what_llama_cpp_cannot_express(exported, tmp_path):
    """A config llama.cpp's graph for the architecture would compute differently is refused with
    the reason (never a file that loads and disagrees)."""
    from minilm.errors import UnsupportedModelError

    m, _ = exported("proxy-gemma3-shakespeare", "f32")
    scale = m.config.attn_scale
    try:
        m.config.attn_scale = scale / 2                      # query_pre_attn_scalar != head_dim
        with pytest.raises(UnsupportedModelError, match="attention scale"):
            export_gguf(m, tmp_path / "g.gguf", "f32", verbose=False)
    finally:
        m.config.attn_scale = scale
    m, _ = exported("proxy-smollm3-shakespeare", "f32")
    rope = list(m.config.layer_rope)
    try:
        m.config.layer_rope = [-1] + rope[1:]                # a no-RoPE layer llama.cpp would rotate
        with pytest.raises(UnsupportedModelError, match="every 4th"):
            export_gguf(m, tmp_path / "s.gguf", "f32", verbose=False)
    finally:
        m.config.layer_rope = rope
