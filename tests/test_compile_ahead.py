"""A first run's compile helper (kernels/compile_ahead.py): with an empty Numba cache, a helper
process compiles the executor's matrix kernels and its parallel region while the model's process
compiles the rest and loads those; a dead helper changes nothing but the time."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from minilm.kernels import compile_ahead

from conftest import SHARED

PROBE = r"""
import hashlib, json, sys
import minilm
import minilm.kernels.compile_ahead as ca
from minilm.kernels import executor as ex
mode = sys.argv[3]
real, started = ca.spawn, []
def spawn(timeout=300.0):                            # at load (an empty cache), or by start
    h = real(timeout)
    started.append(h is not None)
    if h is not None and mode == "kill":
        h._proc.kill()                               # the helper dies before it compiles anything
    return h
ca.spawn = spawn
m = minilm.load(sys.argv[1], quant=sys.argv[2])
ids = m.tokenizer.encode("Once upon a time")
text = m.generate(ids, max_new_tokens=8, ignore_eos=True, speculative=False)
lg = m.logits(ids)
disps = {"matmul": ex._mm_task, "quant": ex._quant_task, "region": ex.run_plan_jit}
stats = {k: [sum(d.stats.cache_misses.values()), sum(d.stats.cache_hits.values())] for k, d in disps.items()}
print("RESULT" + json.dumps({"started": started, "text": text, "stats": stats,
                             "logits": hashlib.sha256(lg.tobytes()).hexdigest()}))
"""


def _probe(model, quant, mode, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), MINILM_COMPILE_HELPER="1")   # whatever the load
    out = subprocess.run([sys.executable, "-c", PROBE, str(model), quant, mode], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason=f"shared models not found at {SHARED}")
@pytest.mark.skipif(compile_ahead.fcntl is None or compile_ahead._cpus() < 2, reason="no helper on this machine")
def test_cold_start_helper_compiles_and_a_dead_one_changes_nothing(tmp_path):
    model = SHARED / "models" / "stories260K"
    ok = _probe(model, "int4", "helper", tmp_path / "a")
    assert ok["started"] == [True]
    # the model's process loaded the helper's functions (their signatures are the ones it calls)
    for name, (misses, hits) in ok["stats"].items():
        assert misses == 0 and hits >= 1, f"{name} compiled in the model's process: {ok['stats']}"
    again = _probe(model, "int4", "helper", tmp_path / "a")   # a warm start: no helper at all
    assert again["started"] == [] and (again["text"], again["logits"]) == (ok["text"], ok["logits"])
    dead = _probe(model, "int4", "kill", tmp_path / "b")
    assert dead["started"] == [True]
    assert dead["stats"]["matmul"][0] >= 1          # compiled here, as without a helper
    assert (dead["text"], dead["logits"]) == (ok["text"], ok["logits"])   # bit for bit


def test_wait_ends_when_the_helper_dies():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdout=subprocess.PIPE)
    h = compile_ahead.Helper(proc, [("x", None)], timeout=600.0)
    t0 = time.monotonic()
    h.wait("x")
    h.wait("not a job")
    assert time.monotonic() - t0 < 60


@pytest.mark.skipif(compile_ahead.fcntl is None or compile_ahead._cpus() < 2, reason="no helper on this machine")
def test_a_helper_started_early_and_not_needed_exits(monkeypatch):
    monkeypatch.setenv("MINILM_COMPILE_HELPER", "1")
    h = compile_ahead.spawn()
    assert h is not None and h.submit([]) is False    # nothing it could compile: not given to it
    h.close()
    assert h._proc.wait(timeout=120) == 0


def test_no_helper_when_switched_off_or_no_core_is_idle(monkeypatch):
    from minilm.kernels import executor as ex
    monkeypatch.setenv("MINILM_COMPILE_HELPER", "0")
    assert compile_ahead.start([("region", ex.run_plan_jit, ())]) is None
    monkeypatch.delenv("MINILM_COMPILE_HELPER")
    monkeypatch.setattr(compile_ahead, "_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))   # busy: it would only compete
    assert compile_ahead._busy() and compile_ahead.start([("region", ex.run_plan_jit, ())]) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert not compile_ahead._busy()


def test_helper_switch_with_a_bad_value_is_an_error(monkeypatch):
    from minilm.kernels import executor as ex
    monkeypatch.setenv("MINILM_COMPILE_HELPER", "off")
    with pytest.raises(ValueError, match="MINILM_COMPILE_HELPER must be 0 .* got 'off'"):
        compile_ahead.start([("region", ex.run_plan_jit, ())])


@pytest.mark.skipif(compile_ahead.fcntl is None, reason="no file locks here")
def test_cache_saves_wait_for_the_lock(tmp_path):
    """A save of Numba's cache index waits while another process (here: another open file) holds
    the cache directory's lock, so two processes never interleave an index update."""
    from numba.core.caching import IndexDataCacheFile
    f = IndexDataCacheFile(str(tmp_path), "probe", "stamp")
    fd = os.open(tmp_path / compile_ahead._LOCK_NAME, os.O_RDWR | os.O_CREAT)
    compile_ahead.fcntl.flock(fd, compile_ahead.fcntl.LOCK_EX)
    t = threading.Thread(target=f.save, args=(("key",), b"data"))
    t.start()
    time.sleep(0.5)
    assert not (tmp_path / "probe.nbi").exists()     # still waiting for the lock
    os.close(fd)
    t.join(30)
    assert (tmp_path / "probe.nbi").exists() and f.load(("key",)) == b"data"
