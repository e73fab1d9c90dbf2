"""cache=True on every kernel: a second process loads compiled code instead of recompiling,
and each kernel keeps one compiled signature."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minilm.quant import FORMATS

from conftest import SHARED

PROBE = r"""
import json, sys, importlib, pkgutil
import minilm, minilm.kernels
from numba.core.registry import CPUDispatcher
m = minilm.load(sys.argv[1], quant=sys.argv[2])
m.generate("Once upon a time", max_new_tokens=4)
m.logits([1, 2, 3, 4, 5])
misses, sigs, uncached = 0, {}, []
mods = ["minilm.kernels." + i.name for i in pkgutil.iter_modules(minilm.kernels.__path__)]
for modname in mods:
    mod = importlib.import_module(modname)
    short = modname.rsplit(".", 1)[1]
    for name, obj in vars(mod).items():
        if isinstance(obj, CPUDispatcher) and obj.__module__ == mod.__name__ and obj.signatures:
            misses += sum(obj.stats.cache_misses.values())
            if type(obj._cache).__name__ == "NullCache" or not sum(obj.stats.cache_hits.values()):
                uncached.append(short + "." + name)
            sigs[short + "." + name] = len(obj.signatures)
print("RESULT" + json.dumps({"misses": misses, "sigs": sigs, "uncached": uncached}))
"""


def run_probe(model, quant):
    out = subprocess.run([sys.executable, "-c", PROBE, str(model), quant], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[6:])


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"shared models not found at {SHARED}")
@pytest.mark.parametrize("quant", ["f32", "int4"])
def test_second_process_does_not_recompile(quant):
    model = SHARED / "models" / "stories260K"
    run_probe(model, quant)                       # may compile (cold cache) and write the cache
    r = run_probe(model, quant)
    assert r["misses"] == 0, f"kernels recompiled in a second process: {r}"
    assert not r["uncached"], f"kernels not loaded from the on-disk cache: {r['uncached']}"
    many = {k: v for k, v in r["sigs"].items() if v != 1}
    assert not many, f"kernels with more than one compiled signature: {many}"
    # prefill and decode both run the plan through the one executor
    assert "executor.run_plan_jit" in r["sigs"], r["sigs"]


MANGLE = r"""
import json, sys
import numpy as np
import numba
from numba.core import itanium_mangler
import minilm.kernels.executor as ex
from minilm.quant import FORMATS
for i in range(int(sys.argv[1])):                 # other record types first: other serial numbers
    numba.typeof(np.zeros(0, np.dtype([("pad%d" % i, np.uint8)])))
names = {f: itanium_mangler.mangle_type_or_value(numba.typeof(np.zeros(0, FORMATS[f].tag)))
         for f in ("q4_1", "q5_0", "q4_k")}
specs = ex._raw_formats(numba.typeof((np.zeros(0, FORMATS["q4_1"].tag), np.zeros(0, FORMATS["q5_0"].tag))))
chain = ex._raw_chain(specs, "rows").py_func.__qualname__
print("RESULT" + json.dumps({"names": names, "chain": chain}))
"""


def test_cached_symbols_name_what_they_compute():
    """Two processes that compiled executors for different formats must not leave equal symbol
    names in the shared cache (a third process loading both would link one to the other's code
    and compute garbage): record types and generated closures are named by content, not by a
    per-process counter."""
    res = []
    for pad in (0, 7):
        out = subprocess.run([sys.executable, "-c", MANGLE, str(pad)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        res.append(json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][6:]))
    assert res[0] == res[1]                       # the same names whatever came before
    assert len(set(res[0]["names"].values())) == 3
    fids = "-".join(str(FORMATS[f].fid) for f in ("q4_1", "q5_0"))
    assert res[0]["chain"].endswith(f"[{fids}]")  # the dispatch chain names its formats


SAME = r"""
import sys
import numpy as np
import minilm
m = minilm.load(sys.argv[1], quant=sys.argv[2], n_ctx=64)
ids = m.tokenizer.encode("ROMEO: But soft, what light through yonder window", add_special_tokens=True)
lg = [np.asarray(m.net.prefill(ids), np.float32)]
tok = int(np.argmax(lg[0]))
for _ in range(3):
    lg.append(np.asarray(m.net.decode(tok), np.float32))
    tok = int(np.argmax(lg[-1]))
np.save(sys.argv[3], np.stack(lg))
"""


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"shared models not found at {SHARED}")
@pytest.mark.parametrize("quant", ["q4_k", "int4"])
def test_compiling_and_cached_processes_compute_the_same_logits(tmp_path, quant):
    """The executor's copy of a kernel is optimised inside the executor, the kernel's own cached
    copy alone; a process that compiles the executor links one, a process that loads it from the
    cache the other. Their float operations whose order is part of the result must not get
    reassociated differently in the two (simd.EXACT): before, a Q4_K model's logits differed
    between the first (compiling) run and every later run (TinyLlama Q4_K_M: by up to 0.16)."""
    model = SHARED / "models" / "proxy-llama256-shakespeare"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), MINILM_COMPILE_HELPER="0")
    runs = []
    for name in ("compiling", "cached"):
        out = tmp_path / f"{name}.npy"
        r = subprocess.run([sys.executable, "-c", SAME, str(model), quant, str(out)], env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(np.load(out))
    assert (runs[0] == runs[1]).all(), f"{quant}: max diff {abs(runs[0] - runs[1]).max()}"
