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
            "--runs", "2", "--quality-tokens", "256", "--bw-size-mb", "32", "-t", "2", "--out", str(out)]
    if TEXT.exists():
        argv += ["--text", str(TEXT)]
    assert main(argv) == 0
    return out


def test_files_written(bench_out):
    for name in ("results.json", "results.md", "results.png"):
        assert (bench_out / name).stat().st_size > 0, name
    assert (bench_out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bench_out / "results.md").read_text()
    for head in ("file MB", "bits/w", "load s", "peak RSS MiB", "TTFT ms", "prefill tok/s", "decode tok/s",
                 "GB/s", "% of bw", "PPL", "KL mean", "top-1 %"):
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
        assert math.isfinite(r["kl_mean"]) and r["kl_mean"] >= 0
        assert r["quality_positions"] == meta["quality_positions"]
    f32, i8 = rows
    assert f32["kl_mean"] == 0.0 and f32["kl_p99"] == 0.0 and f32["top1_agree_pct"] == 100.0
    assert 0 < i8["kl_mean"] < 0.1 and i8["top1_agree_pct"] > 80
    assert 30 < f32["bits_per_weight"] < 34 and 8 < i8["bits_per_weight"] < 11
    assert i8["file_bytes"] < f32["file_bytes"] / 2
    assert abs(i8["ppl"] / f32["ppl"] - 1) < 0.05


def test_peer_is_a_row_not_a_crash(tmp_path):
    """llama.cpp: measured when llama-cpp-python and the GGUF export work, else a row with a note."""
    from minilm.cli import main
    assert main(["bench", "-m", str(MODEL), "--quant", "int8", "--prompt-tokens", "4", "--new-tokens", "2",
                 "--runs", "1", "--quality-tokens", "0", "--bw-size-mb", "16", "-t", "1",
                 "--peers", "llama.cpp", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["engine"] == "minilm" and rows[0]["decode_tok_s"] > 0 and "ppl" not in rows[0]
    peer = [r for r in rows if r["engine"] == "llama.cpp"]
    assert [r["quant"] for r in peer] == ["q8_0"]
    for r in peer:
        assert r.get("decode_tok_s", 0) > 0 or r["note"].startswith(("skipped", "failed")), r


def test_bad_arguments():
    from minilm.cli import main
    assert main(["bench", "-m", str(MODEL), "--quant", "int3"]) == 1
    assert main(["bench", "-m", str(MODEL), "--peers", "vllm"]) == 1
