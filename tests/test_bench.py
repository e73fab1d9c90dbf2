"""`minilm bench` end to end on the tiny trained model (two levels, tiny counts)."""
import json
import math

import pytest

from conftest import SHARED

MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "texts" / "tinystories_sample_cs336.txt"

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} not present (shared models)")

NUMERIC = ["file_bytes", "file_mb", "bits_per_weight", "params", "load_s", "peak_rss_mb", "ttft_s", "ttft_ms",
           "start_to_first_token_s", "prefill_tok_s", "prefill_min", "prefill_max", "decode_tok_s",
           "decode_min", "decode_max", "bytes_per_token", "decode_gb_s", "pct_of_bw", "ceiling_tok_s",
           "ppl", "top1_agree_pct"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    from minilm.cli import main
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "-m", str(MODEL), "--quant", "f32,int8", "--prompt-tokens", "16", "--new-tokens", "8",
            "--runs", "2", "--quality-tokens", "256", "--bw-size-mb", "32", "-t", "2", "--kv-quant", "f32",
            "--out", str(out)]
    if TEXT.exists():
        argv += ["--text", str(TEXT)]
    assert main(argv) == 0
    return out


def test_kv_cache_axis(tmp_path):
    """--kv-quant runs a level once per KV storage type against the f32-weights, f32-KV reference
    (computed alone when no row is that): each row says its KV type and bytes, and the KL columns
    are the KV cache's own cost."""
    from minilm.cli import main
    argv = ["bench", "-m", str(MODEL), "--quant", "f32", "--kv-quant", "q8_0,f16", "--prompt-tokens", "16",
            "--new-tokens", "4", "--runs", "1", "--quality-tokens", "256", "--bw-size-mb", "16", "-t", "2",
            "--out", str(tmp_path)]
    if TEXT.exists():
        argv += ["--text", str(TEXT)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["kv_quant"]: r for r in res["rows"]}
    assert list(rows) == ["q8_0", "f16"] and res["meta"]["kv_quants"] == ["q8_0", "f16"]
    h, q = rows["f16"], rows["q8_0"]
    assert not h.get("note") and not q.get("note")
    assert 0 < h["kl_mean"] < q["kl_mean"] < 0.05 and q["top1_agree_pct"] > 90
    assert 0 < q["kv_cache_mb"] < h["kv_cache_mb"]
    md = (tmp_path / "results.md").read_text()
    assert "| KV | KV MB |" in md and "| minilm | f32 | q8_0 |" in md


def test_files_written(bench_out):
    for name in ("results.json", "results.md", "results.png"):
        assert (bench_out / name).stat().st_size > 0, name
    assert (bench_out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bench_out / "results.md").read_text()
    for head in ("file MB", "bits/w", "load s", "peak RSS MiB", "TTFT ms", "prefill tok/s", "decode tok/s",
                 "GB/s", "% of bw", "spec accept %", "spec x grounded", "spec x free", "PPL", "KL mean", "top-1 %"):
        assert head in md, head
    assert "| minilm | int8 |" in md


def test_rows_complete_and_finite(bench_out):
    res = json.loads((bench_out / "results.json").read_text())
    meta, rows = res["meta"], res["rows"]
    assert meta["complete"] is True
    assert meta["bandwidth"]["read_gbs"] > 0 and meta["cpu"] and meta["threads"] == 2
    assert meta["quality_positions"] > 0
    assert [(r["engine"], r["quant"]) for r in rows] == [("minilm", "f32"), ("minilm", "int8")]
    for r in rows:
        assert not r.get("note"), r.get("note")
        for k in NUMERIC:
            v = r[k]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (r["quant"], k, v)
        assert r["prefill_min"] <= r["prefill_tok_s"] <= r["prefill_max"]
        assert r["decode_min"] <= r["decode_tok_s"] <= r["decode_max"]
        for k in ("spec_x_grounded", "spec_x_free", "plain_free_tok_s", "spec_grounded_tok_s"):   # speculative
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (r["quant"], k, r[k])
        assert 0 <= r["spec_accept_pct"] <= 100
        assert math.isfinite(r["kl_mean"]) and r["kl_mean"] >= 0
        assert r["quality_positions"] == meta["quality_positions"]
    f32, i8 = rows
    assert f32["kl_mean"] == 0.0 and f32["kl_p99"] == 0.0 and f32["top1_agree_pct"] == 100.0
    assert 0 < i8["kl_mean"] < 0.1 and i8["top1_agree_pct"] > 80
    assert 30 < f32["bits_per_weight"] < 34 and 8 < i8["bits_per_weight"] < 11
    assert i8["file_bytes"] < f32["file_bytes"] / 2
    assert abs(i8["ppl"] / f32["ppl"] - 1) < 0.05


def _peer_run(tmp_path, *extra):
    from minilm.cli import main
    assert main(["bench", "-m", str(MODEL), "--quant", "int8", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--runs", "2", "--quality-tokens", "0", "--bw-size-mb", "16", "-t", "1",
                 "--peers", "llama.cpp", "--out", str(tmp_path), *extra]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["engine"] == "minilm" and rows[0]["decode_tok_s"] > 0 and "ppl" not in rows[0]
    peer = [r for r in rows if r["engine"] == "llama.cpp"]
    assert [r["quant"] for r in peer] == ["q8_0"]
    return peer[0], (tmp_path / "results.md").read_text()


def _have_llama_cpp_python():
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def test_peer_unavailable_is_a_row_with_a_note(tmp_path, monkeypatch):
    """No llama-bench build in the cache and no llama-cpp-python: a row that says how to get one."""
    if _have_llama_cpp_python():
        pytest.skip("llama-cpp-python is installed here: the peer is available")
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("MINILM_LLAMA_BENCH", raising=False)
    r, _ = _peer_run(tmp_path / "out")
    assert r["note"].startswith("skipped") and "build_llama_bench.sh" in r["note"], r
    assert "decode_tok_s" not in r


def test_peer_row_names_the_configuration_that_ran(tmp_path):
    """llama.cpp at its defaults on the GGUF export (llama-bench from benchmarks/build_llama_bench.sh, or
    llama-cpp-python): the row has speeds, GB/s from the GGUF's bytes/token, and says what ran."""
    from minilm.bench.engines import find_llama_bench
    builds = find_llama_bench()
    if not builds and not _have_llama_cpp_python():
        pytest.skip("no llama.cpp peer here: no llama-bench build under ~/.cache/minilm (run "
                    "benchmarks/build_llama_bench.sh; the tests never build it) and no llama-cpp-python")
    r, md = _peer_run(tmp_path)
    assert not str(r.get("note", "")).startswith(("failed", "skipped")), r
    for k in ("prefill_tok_s", "decode_tok_s", "decode_min", "decode_max", "bytes_per_token", "decode_gb_s",
              "file_bytes"):
        assert r[k] > 0, (k, r)
    assert r["decode_min"] <= r["decode_tok_s"] <= r["decode_max"]
    cfg = r["config"]
    if builds:
        assert r["timing"] == "llama-bench" and "llama-bench" in cfg and "-r 2" in cfg
        assert "repacked weights" in cfg and builds[0]["info"].get("llama_cpp_commit", "?")[:7] in cfg
        assert len(r["decode_samples"]) == 2 and r["llama_bench"]["repetitions"] == 2
        if "--repack 0" in cfg or "NOT llama.cpp's default" in cfg:     # a crash forced a switch: said so
            assert "failed" in cfg
        else:                                                            # llama.cpp's default: repacking on
            assert r["llama_bench"]["repack"] is True and "repack True" in cfg
    else:
        assert "llama-cpp-python" in cfg and ("defaults" in cfg or "use_extra_bufts=False" in cfg)
    assert cfg.replace("|", "\\|") in md                           # the table shows it
    assert "Side by side" in md and "| int8 | q8_0 |" in md               # minilm / llama.cpp ratios
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert [(p["minilm"], p["llama.cpp"]) for p in meta["side_by_side"]] == [("int8", "q8_0")]


FAKE_LLAMA_BENCH = r'''#!{python}
"""A stand-in llama-bench: dies of SIGILL at its defaults, runs with --repack 0 (as llama.cpp's
repacked path did in a VM that hides AMX). Prints llama-bench's JSON with per-repetition samples."""
import json, os, signal, sys
a = sys.argv[1:]
if "--repack" not in a or a[a.index("--repack") + 1] != "0":
    os.kill(os.getpid(), signal.SIGILL)
v = lambda f: int(a[a.index(f) + 1])
r = v("-r")
common = dict(build_commit="fake123", build_number=1, cpu_info="test", backends="CPU", model_type="llama",
              model_size=os.path.getsize(a[a.index("-m") + 1]), n_threads=v("-t"), repack=False, n_depth=0)
pp = [1000.0 + 10 * i for i in range(r)]
tg = [100.0 + i for i in range(r)]
print(json.dumps([
    dict(common, n_prompt=v("-p"), n_gen=0, avg_ts=sum(pp) / r, stddev_ts=1.0, samples_ts=pp,
         samples_ns=[v("-p") / x * 1e9 for x in pp]),
    dict(common, n_prompt=0, n_gen=v("-n"), avg_ts=sum(tg) / r, stddev_ts=0.5, samples_ts=tg,
         samples_ns=[v("-n") / x * 1e9 for x in tg])]))
'''


def test_crashing_default_is_named_not_hidden(tmp_path):
    """When llama.cpp's default configuration crashes, the row runs the narrower switch and says so."""
    import sys
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.replace("{python}", sys.executable))
    fake.chmod(0o755)
    r, _ = _peer_run(tmp_path / "out", "--llama-bench", str(fake))
    cfg = r["config"]
    assert "--repack 0" in cfg and "repacked weights OFF" in cfg and "NOT llama.cpp's default" in cfg, cfg
    assert "killed by SIGILL" in cfg and "repack False" in cfg, cfg
    assert r["decode_tok_s"] == 100.5 and r["decode_min"] == 100.0 and r["decode_max"] == 101.0   # its samples
    assert r["prefill_tok_s"] == 1005.0 and r["llama_bench"]["tg_avg_ts"] == 100.5
    assert abs(r["decode_gb_s"] - r["bytes_per_token"] * 100.5 / 1e9) < 1e-9
    assert r["bytes_per_token"] <= r["file_bytes"]


def test_llama_bench_json_parsing():
    from minilm.bench.engines import parse_llama_bench_json
    tests = [{"n_prompt": 128, "n_gen": 0, "avg_ts": 500.0, "stddev_ts": 5.0, "samples_ts": [490, 500, 510, 495, 505],
              "samples_ns": [128 / x * 1e9 for x in (490, 500, 510, 495, 505)], "repack": True},
             {"n_prompt": 0, "n_gen": 64, "avg_ts": 40.0, "stddev_ts": 2.0, "samples_ts": [38, 42, 40, 41, 39]}]
    f = parse_llama_bench_json(json.dumps(tests), 128, 64)
    assert (f["prefill_tok_s"], f["prefill_min"], f["prefill_max"]) == (500, 490, 510)
    assert (f["decode_tok_s"], f["decode_min"], f["decode_max"]) == (40, 38, 42)
    assert abs(f["ttft_s"] - 128 / 500) < 1e-12
    assert f["llama_bench"]["repack"] is True and f["llama_bench"]["tg_stddev_ts"] == 2.0
    with pytest.raises(ValueError, match="no pp256 and tg64"):
        parse_llama_bench_json(json.dumps(tests), 256, 64)
    with pytest.raises(ValueError, match="not JSON"):
        parse_llama_bench_json("main: error: failed to load model", 128, 64)


def test_bad_arguments():
    from minilm.cli import main
    assert main(["bench", "-m", str(MODEL), "--quant", "int3"]) == 1
    assert main(["bench", "-m", str(MODEL), "--peers", "vllm"]) == 1
    assert main(["bench", "-m", str(MODEL), "--quant", "int8@q3"]) == 1
    assert main(["bench", "-m", str(MODEL), "--runs", "0"]) == 1
    assert main(["bench", "-m", str(MODEL), "--peers", "llama.cpp", "--llama-bench", "/nonexistent/llama-bench"]) == 1
    assert main(["bench", "-m", str(MODEL), "--quant", "q4_0:kv=q4"]) == 1
    assert main(["bench", "-m", str(MODEL), "--quant", "q4_0+imatrix:kv=q8_0"]) == 1      # no --calibration


def test_all_is_every_level_calibrated_and_the_kv_axis():
    """`--quant all`: every level of llama.cpp's presets and the float references, each quantized
    one again calibrated (with --calibration), and f32 / q4_k_m with a q8_0 KV cache; the f32 row
    first, a LEVEL:kv=TYPE row once with its own KV type."""
    from minilm.bench.cli import _jobs
    from minilm.bench.common import expand_levels
    every = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "iq4_xs", "q4_0", "q3_k_m", "q2_k"]
    levels = expand_levels(["all"], "calib.txt")
    assert levels == every + [q + "+imatrix" for q in every[2:]] + ["f32:kv=q8_0", "q4_k_m:kv=q8_0"]
    assert expand_levels(["all", "q4_0"], None) == every + ["f32:kv=q8_0", "q4_k_m:kv=q8_0"]
    jobs = _jobs(levels, [], False, ("f16",))
    assert jobs[0] == ("minilm", "f32", "f16") and len(jobs) == len(levels)
    assert [(q, kv) for _, q, kv in jobs if kv == "q8_0"] == [("f32", "q8_0"), ("q4_k_m", "q8_0")]
    assert ("minilm", "q2_k+imatrix", "f16") in jobs


def test_calibrated_and_kv_rows_in_one_table(tmp_path):
    """A calibrated row beside its plain level and a row with its own KV type, end to end on the
    tiny model (tiny counts: this checks the rows, not the figures): same formats (bits), other
    values; the q8_0 KV row has the smaller cache; one table, one plot."""
    from minilm.cli import main
    text = TEXT.read_text() if TEXT.exists() else ""
    if len(text) < 3000:
        pytest.skip(f"{TEXT} not present (shared texts)")
    calib, ev = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(text[:len(text) // 2])           # two halves: calibration, evaluation
    ev.write_text(text[len(text) // 2:])
    argv = ["bench", "-m", str(MODEL), "--quant", "q4_0,q4_0+imatrix,q4_0:kv=q8_0", "--calibration", str(calib),
            "--text", str(ev), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--quality-tokens", "128",
            "--bw-size-mb", "16", "-t", "2", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = {(r["quant"], r["kv_quant"]): r for r in res["rows"]}
    assert sorted(rows) == [("q4_0", "f16"), ("q4_0", "q8_0"), ("q4_0+imatrix", "f16")] and res["meta"]["complete"]
    for key, r in rows.items():
        assert not r.get("note"), (key, r.get("note"))
        for k in ("file_mb", "bits_per_weight", "peak_rss_mb", "decode_tok_s", "ppl", "top1_agree_pct"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (key, k, r[k])
        assert math.isfinite(r["kl_mean"]) and r["kl_mean"] > 0, key
    plain, cal, kv8 = rows[("q4_0", "f16")], rows[("q4_0+imatrix", "f16")], rows[("q4_0", "q8_0")]
    assert cal["bits_per_weight"] == plain["bits_per_weight"] and cal["kl_mean"] != plain["kl_mean"]
    assert kv8["kv_cache_mb"] < plain["kv_cache_mb"] and kv8["bits_per_weight"] == plain["bits_per_weight"]
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| minilm | q4_0+imatrix | f16 |" in md and "| minilm | q4_0 | q8_0 |" in md
    assert (tmp_path / "b" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
