"""llama.cpp's imatrix files (minilm/imatrix_io.py): the GGUF and legacy .dat layouts read and
written, tensor names mapped to minilm's canonical matrices, malformed files refused with errors
naming the file and the entry, and llama-quantize accepting what minilm writes.

The legacy file below is built by hand from llama.cpp's layout (tools/imatrix/imatrix.cpp,
save_imatrix_legacy at 0c1e570), not by minilm's writer."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from minilm.calibrate import load_imatrix, save_imatrix
from minilm.config import Config
from minilm.errors import ModelLoadError
from minilm.weights import canonical_shapes, is_matrix

from conftest import shared_path
from test_random_models import llama_cfg

QUANTIZE = Path.home() / ".cache" / "minilm" / "llama.cpp-0.3.36" / "build" / "bin" / "llama-quantize"


@pytest.fixture(scope="module")
def cfg() -> Config:      # 2 layers, hidden 64, ffn 128 (untied head: "output" has its own entry)
    return Config.from_hf(llama_cfg(tie_word_embeddings=False))


def random_imatrix(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = canonical_shapes(cfg)
    return {n: rng.gamma(2.0, 1.0, s[1]).astype(np.float32) for n, s in shapes.items()
            if is_matrix(n) and n != "tok_embd"}


@pytest.mark.parametrize("suffix", [".gguf", ".dat", ".safetensors"])
def test_round_trip(tmp_path, cfg, suffix):
    im = random_imatrix(cfg)
    p = save_imatrix(im, tmp_path / f"im{suffix}", n_tokens=1000, cfg=cfg, dataset="calib.txt")
    back = load_imatrix(p, cfg)
    assert set(back) == set(im)
    for k in im:
        np.testing.assert_allclose(back[k], im[k], rtol=2e-6, err_msg=k)
    if suffix == ".gguf":           # llama-imatrix's layout: sums and counts per llama.cpp tensor
        from minilm.sources import open_gguf
        r = open_gguf(p)
        t = {x.name: x for x in r.tensors}
        assert r.fields["general.type"].contents() == "imatrix"
        assert r.fields["imatrix.chunk_size"].contents() == 512
        assert r.fields["imatrix.chunk_count"].contents() == 2          # ceil(1000 / 512)
        for part in ("attn_q", "attn_k", "attn_v"):          # fused wqkv: one entry per llama.cpp tensor
            np.testing.assert_allclose(np.asarray(t[f"blk.1.{part}.weight.in_sum2"].data).reshape(-1),
                                       im["l1.wqkv"] * 1000, rtol=1e-6)
            assert float(np.asarray(t[f"blk.1.{part}.weight.counts"].data).reshape(-1)[0]) == 1000
        assert "output.weight.in_sum2" in t and "blk.0.ffn_gate.weight.in_sum2" in t


def legacy_bytes(entries, trailer=True) -> bytes:
    """llama.cpp's legacy layout: n_entries, then (name len, name, ncall, nval, values) each,
    then the chunk count and the dataset name."""
    out = [struct.pack("<i", len(entries))]
    for name, ncall, vals in entries:
        b = name.encode()
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, len(vals)), np.asarray(vals, "<f4").tobytes()]
    if trailer:
        out += [struct.pack("<ii", 3, 9), b"calib.txt"]
    return b"".join(out)


def test_hand_built_legacy_file(tmp_path, cfg):
    D, F = cfg.hidden_size, cfg.intermediate_size
    q = np.arange(1, D + 1, dtype=np.float32)
    down = np.linspace(0.5, 2.0, F, dtype=np.float32)
    p = tmp_path / "imatrix.dat"
    # values as llama-imatrix stores them: mean x^2 * ncall (ncall 3)
    p.write_bytes(legacy_bytes([("blk.0.attn_q.weight", 3, 3 * q), ("blk.1.ffn_down.weight", 3, 3 * down),
                                ("blk.1.ffn_up.weight", 3, 3 * q[::-1])]))
    im = load_imatrix(p, cfg)
    assert set(im) == {"l0.wqkv", "l1.w_down", "l1.w_gate_up"}
    np.testing.assert_allclose(im["l0.wqkv"], q, rtol=1e-6)
    np.testing.assert_allclose(im["l1.w_down"], down, rtol=1e-6)
    np.testing.assert_allclose(im["l1.w_gate_up"], q[::-1], rtol=1e-6)
    p.write_bytes(legacy_bytes([("blk.0.attn_q.weight", 3, 3 * q)], trailer=False))   # the trailer is optional
    np.testing.assert_allclose(load_imatrix(p, cfg)["l0.wqkv"], q, rtol=1e-6)


def test_malformed_legacy_files(tmp_path, cfg):
    D = cfg.hidden_size
    ok = np.ones(D, np.float32)
    p = tmp_path / "bad.dat"

    def refused(data: bytes, match: str):
        p.write_bytes(data)
        with pytest.raises(ModelLoadError, match=match):
            load_imatrix(p, cfg)

    good = legacy_bytes([("blk.0.attn_q.weight", 2, ok)])
    refused(good[:60], r"bad.dat: entry 'blk.0.attn_q.weight' has a value count of 64, which the 25 bytes left")
    refused(good[:30], r"bad.dat: truncated: entry 'blk.0.attn_q.weight''s ncall")
    refused(struct.pack("<i", 10 ** 9) + good[4:], r"bad.dat: entry count 1000000000 does not fit")
    refused(struct.pack("<i", 0), r"bad.dat: entry count 0")
    refused(good[:4] + struct.pack("<i", 2 ** 30) + good[8:], r"bad.dat: entry 1 has a name length of 1073741824")
    n = len("blk.0.attn_q.weight")
    refused(good[:8 + n + 4] + struct.pack("<i", 2 ** 28) + good[8 + n + 8:], r"'blk.0.attn_q.weight' has a value "
            r"count of 268435456")
    refused(legacy_bytes([("blk.0.attn_q.weight", 2, np.full(D, np.nan, np.float32))]), r"'blk.0.attn_q.weight'.*not finite")
    refused(legacy_bytes([("blk.0.attn_q.weight", 2, np.ones(D + 1, np.float32))]),
            rf"'blk.0.attn_q.weight' has {D + 1} values, expected {D}")
    refused(legacy_bytes([("blk.0.attn_q.weight", 2, -ok)]), r"'blk.0.attn_q.weight'.*>= 0")
    refused(legacy_bytes([("blk.7.attn_q.weight", 2, ok)]), r"'blk.7.attn_q.weight' names no matrix")
    refused(legacy_bytes([("blk.0.attn_q.weight", -1, ok)]), r"ncall -1")
    refused(legacy_bytes([("blk.0.attn_q.weight", 2, ok)] * 2), r"appears twice")
    refused(legacy_bytes([("blk.0.attn_q.weight", 2, ok)], trailer=False) + struct.pack("<ii", 3, 50) + b"abc",
            r"dataset name length 50")
    refused(b"junk", r"bad.dat")


def test_malformed_gguf_files(tmp_path, cfg):
    from minilm.sources import gguf_module
    gguf = gguf_module()
    D = cfg.hidden_size

    def write(path, tensors, kind="imatrix", meta=True):
        w = gguf.GGUFWriter(str(path), "llama")
        if kind:
            w.add_string("general.type", kind)
        if meta:
            w.add_array("imatrix.datasets", ["x"])
            w.add_uint32("imatrix.chunk_count", 1)
            w.add_uint32("imatrix.chunk_size", 512)
        for name, a in tensors.items():
            w.add_tensor(name, np.asarray(a, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    s, c = np.ones((1, D)), np.full((1, 1), 10.0)
    ok = {"blk.0.attn_q.weight.in_sum2": s, "blk.0.attn_q.weight.counts": c}
    np.testing.assert_allclose(load_imatrix(write(tmp_path / "ok.gguf", ok), cfg)["l0.wqkv"], 0.1, rtol=1e-6)
    cases = [
        ("model.gguf", dict(tensors=ok, kind="model"), r"model.gguf: a GGUF file whose general.type is 'model'"),
        ("nometa.gguf", dict(tensors=ok, meta=False), r"nometa.gguf: GGUF metadata 'imatrix.chunk_count' is missing"),
        ("nocount.gguf", dict(tensors={"blk.0.attn_q.weight.in_sum2": s}), r"'blk.0.attn_q.weight' has .in_sum2 but no"),
        ("nan.gguf", dict(tensors={**ok, "blk.0.attn_q.weight.in_sum2": np.full((1, D), np.nan)}), r"in_sum2 .*not finite"),
        ("width.gguf", dict(tensors={**ok, "blk.0.attn_q.weight.in_sum2": np.ones((1, D + 8))}),
         rf"'blk.0.attn_q.weight' has {D + 8} values, expected {D}"),
        ("experts.gguf", dict(tensors={"blk.0.attn_q.weight.in_sum2": np.ones((2, D)),
                                       "blk.0.attn_q.weight.counts": np.ones((2, 1))}), r"has 2 matrices"),
        ("negcount.gguf", dict(tensors={**ok, "blk.0.attn_q.weight.counts": -c}), r"counts is -10.0"),
        ("other.gguf", dict(tensors={"blk.0.ffn_zz.weight.in_sum2": s, "blk.0.ffn_zz.weight.counts": c}),
         r"'blk.0.ffn_zz.weight' names no matrix"),
    ]
    for name, kw, match in cases:
        with pytest.raises(ModelLoadError, match=match):
            load_imatrix(write(tmp_path / name, **kw), cfg)
    p = tmp_path / "cut.gguf"
    p.write_bytes((tmp_path / "ok.gguf").read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"cut.gguf"):
        load_imatrix(p, cfg)


@pytest.mark.skipif(not QUANTIZE.is_file(), reason=f"{QUANTIZE} not built (benchmarks/build_llama_bench.sh)")
def test_llama_quantize_reads_what_minilm_writes(tmp_path):
    """llama-quantize --imatrix takes minilm's GGUF and .dat files, finds an entry for every matrix
    of the model, and the weights it writes differ from the unweighted file's."""
    import minilm
    from minilm.gguf_io import export_gguf
    from minilm.imatrix_io import gguf_names
    from minilm.sources import open_gguf
    folder = shared_path("models", "proxy-llama256-shakespeare")
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    m = minilm.load(folder, n_ctx=64)
    src = export_gguf(m, tmp_path / "f32.gguf", "f32", verbose=False)
    im = random_imatrix(m.config, seed=1)
    names = gguf_names(m.config)
    n_mats = sum(len(names[k]) for k in im)                     # q/k/v and gate/up: one entry each
    files = {}
    for suffix in ("", ".gguf", ".dat"):
        imf = save_imatrix(im, tmp_path / f"im{suffix or '.none'}", cfg=m.config, dataset="t") if suffix else None
        dst = tmp_path / f"q4_0{suffix}.gguf"
        r = subprocess.run([str(QUANTIZE)] + (["--imatrix", str(imf)] if imf else []) + [str(src), str(dst), "Q4_0", "1"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        if imf:
            assert f"loaded {n_mats} importance matrix entries" in r.stdout + r.stderr
        files[suffix] = {t.name: np.asarray(t.data).tobytes() for t in open_gguf(dst).tensors}
    assert files[".gguf"]["blk.1.ffn_down.weight"] != files[""]["blk.1.ffn_down.weight"]
    assert files[".dat"]["blk.1.ffn_down.weight"] != files[""]["blk.1.ffn_down.weight"]
    back = load_imatrix(tmp_path / "im.gguf", m.config)          # and minilm reads them back
    np.testing.assert_allclose(back["l1.w_down"], im["l1.w_down"], rtol=2e-6)
