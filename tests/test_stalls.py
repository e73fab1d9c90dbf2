"""benchmarks/stalls.py runs: per setting the minilm runs, the slowest against the median, and
the busy process it starts is gone afterwards (speed itself is a benchmark, not a test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stalls.py"


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason=f"shared models not found at {SHARED}")
def test_stalls_script_reports_each_setting(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "-m", str(SHARED / "models" / "stories260K"), "--quant", "int4",
                        "--runs", "3", "--new", "4", "--prompt", "8", "--busy", "0,1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [row["busy"] for row in res] == [0, 1]
    for row in res:
        s = row["minilm"]
        assert len(s["runs"]) == 3 and all(x > 0 for x in s["runs"])
        assert s["min"] <= s["median"] <= s["max"] and s["slowest_ratio"] == s["min"] / s["median"]
    assert "slowest/median" in r.stdout


def test_busy_process_runs_only_inside_the_block():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import stalls
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with stalls.Busy(1) as b:
        assert len(b.procs) == 1 and b.procs[0].poll() is None
    assert b.procs[0].poll() is not None


def test_stalls_needs_two_runs():
    r = subprocess.run([sys.executable, str(SCRIPT), "-m", "x", "--runs", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and "--runs must be at least 2" in r.stderr
