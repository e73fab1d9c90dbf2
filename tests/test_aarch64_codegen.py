"""The quantized kernels' generic path, cross-compiled for 64-bit ARM (what a Raspberry Pi runs).

minilm picks its integer dot-product code by CPU (kernels/qmatmul.py: SIMD = vnni | avx2 |
generic); ARM gets the generic path, portable LLVM IR. This test builds that path here
(MINILM_SIMD=generic, a fresh Numba cache, in a subprocess), takes the LLVM IR of the compiled
Q8_0 / Q4_0 GEMV and GEMM kernels (Dispatcher.inspect_llvm), retargets it with llvmlite to
aarch64-unknown-linux-gnu and checks the assembly:
  * cortex-a76 +dotprod (Raspberry Pi 5): Q8_0's int8 products are sdot/udot instructions;
    Q4_0's (the il16 layout, one row per i32 lane) are lane-exact widening NEON multiplies
    (qmatmul._dot4_lanes): the IR that lowers to sdot (llvm.vector.partial.reduce.add) leaves
    which products land in which lane to the target, and there every lane is a row;
  * cortex-a72 (Raspberry Pi 4, no dot product): LLVM compiles it without aborting, emits no
    dot-product instruction (that would be SIGILL there), and the products are NEON vector code
    (smull/smlal/umull on byte lanes), not a scalar loop.
Whether the compiled code computes the right numbers on those CPUs is checked under qemu by
scripts/check_aarch64.sh (QEMU_CPU=cortex-a76 and cortex-a72).
"""
import collections
import os
import re
import subprocess
import sys
import textwrap

import pytest

llvm = pytest.importorskip("llvmlite.binding")

TRIPLE = "aarch64-unknown-linux-gnu"

# Compiles the public quantized GEMV/GEMM entry points on the generic path and writes the LLVM IR
# of every compiled Numba kernel behind them to OUT/<name>.ll.
_DUMP_SCRIPT = textwrap.dedent(r"""
    import sys
    import numpy as np
    from numba.core.registry import CPUDispatcher
    from minilm.kernels import qmatmul as Q
    assert Q.SIMD == "generic", Q.SIMD
    out_dir = sys.argv[1]
    rng = np.random.default_rng(0)
    N, K = 8, 256
    w = rng.standard_normal((N, K)).astype(np.float32)          # f32[N, K]
    x = rng.standard_normal((3, K)).astype(np.float32)          # f32[M=3, K]
    q8 = Q.quantize_q8_0(w)
    for G in (32, 64, 128):
        q4 = Q.quantize_q4_0(w, G)
        Q.gemv_q4_0(x[0], *q4, np.empty(N, np.float32))
        Q.gemm_q4_0(x, *q4, np.empty((3, N), np.float32))
    Q.gemv_q8_0(x[0], *q8, np.empty(N, np.float32))
    Q.gemm_q8_0(x, *q8, np.empty((3, N), np.float32))
    names = []
    for name, obj in sorted(vars(Q).items()):
        if (isinstance(obj, CPUDispatcher) and obj.signatures and ("gemv" in name or "gemm" in name)
                and ("q8_0" in name or "q4_0" in name)):
            with open(f"{out_dir}/{name}.ll", "w") as f:
                f.write(obj.inspect_llvm(obj.signatures[0]))
            names.append(name)
    print(" ".join(names))
""")


def _aarch64_target():
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    try:
        return llvm.Target.from_triple(TRIPLE)
    except RuntimeError as e:       # an llvmlite built without the AArch64 backend
        pytest.skip(f"llvmlite has no AArch64 target: {e}")


def retarget_asm(ir_text, cpu, features):
    """Assembly for `cpu` of Numba's (host-optimized) LLVM IR: host CPU attributes, triple and
    data layout removed; functions that use host-only intrinsics (Numba's NRT_decref gets
    llvm.x86.atomic.* from the host backend) become available_externally + noinline, so they are
    called but not compiled; everything else is kept, optimized at O3 for `cpu` and emitted."""
    tm = _aarch64_target().create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic")
    ir_text = re.sub(r'"(target-cpu|target-features|tune-cpu)"="[^"]*"', "", ir_text)
    ir_text = re.sub(r"^target (datalayout|triple) = .*$", "", ir_text, flags=re.MULTILINE)
    mod = llvm.parse_assembly(ir_text)
    mod.triple = TRIPLE
    mod.data_layout = str(tm.target_data)
    for fn in mod.functions:
        if fn.is_declaration:
            continue
        if "@llvm.x86." in str(fn):
            fn.linkage = "available_externally"
            fn.add_function_attribute("noinline")
        else:
            fn.linkage = "external"
    mod.verify()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def _mnemonics(asm):
    """Counter of instruction mnemonics; 'bytemul' counts NEON widening multiplies of byte lanes
    (smull/smull2/umull/umull2/smlal/smlal2/umlal/umlal2 with .8h results), 'scalarmul' integer
    multiplies on general registers."""
    c = collections.Counter()
    for line in asm.splitlines():
        if not line.startswith("\t") or line.startswith("\t."):
            continue
        parts = line.split(None, 1)
        if not parts:
            continue
        c[parts[0]] += 1
        if re.match(r"[su]m(ull|lal)2?$", parts[0]) and re.search(r"v\d+\.8h", line):
            c["bytemul"] += 1
        ops = parts[1] if len(parts) > 1 else ""
        scalar_ops = ("mul", "madd", "smaddl", "umaddl", "smull", "umull")
        if parts[0] in scalar_ops and not re.search(r"\bv\d+\.", ops):
            c["scalarmul"] += 1
    return c


@pytest.fixture(scope="module")
def generic_ir(tmp_path_factory):
    from minilm.kernels import qmatmul as Q
    if not getattr(Q, "_PARTIAL_REDUCE", False):
        pytest.skip("llvmlite's LLVM is older than 22: the generic path uses the shuffle-add form, "
                    "which does not lower to sdot")
    out = tmp_path_factory.mktemp("ir")
    env = dict(os.environ, MINILM_SIMD="generic",
               NUMBA_CACHE_DIR=str(tmp_path_factory.mktemp("numba_cache")))
    env.pop("NUMBA_CPU_NAME", None)
    r = subprocess.run([sys.executable, "-c", _DUMP_SCRIPT, str(out)], env=env, check=False,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    names = r.stdout.split()
    assert any("q8_0" in n for n in names) and any("q4_0" in n for n in names), names
    return {n: (out / f"{n}.ll").read_text() for n in names}


def test_generic_ir_is_target_neutral(generic_ir):
    for name, ir_text in generic_ir.items():
        hot = re.findall(r"@llvm\.x86\.[a-z0-9_.]+", ir_text)
        # the only x86 intrinsic allowed is the host backend's atomic in Numba's refcounting
        assert set(hot) <= {"@llvm.x86.atomic.sub.cc.i64", "@llvm.x86.atomic.add.cc.i64"}, (name, set(hot))
        if "q8_0" in name:
            assert "llvm.vector.partial.reduce.add" in ir_text, name


def test_cortex_a76_q4_0_is_neon_lane_exact(generic_ir):
    for name, ir_text in generic_ir.items():
        if "q4_0" in name:
            c = _mnemonics(retarget_asm(ir_text, "cortex-a76", "+dotprod"))
            assert c["bytemul"] >= 32, (name, c["bytemul"])          # widening NEON multiplies
            assert c["scalarmul"] < c["bytemul"] / 4, (name, c["scalarmul"], c["bytemul"])


def test_cortex_a76_uses_dot_product(generic_ir):
    for name, ir_text in generic_ir.items():
        if "q8_0" not in name:
            continue
        c = _mnemonics(retarget_asm(ir_text, "cortex-a76", "+dotprod"))
        dots = c["sdot"] + c["udot"]
        assert dots >= 8, (name, dots)
        # (nearly) all int8 products go through the dot product; LLVM leaves a few groups as
        # smull where it merged them differently (8 of ~430 in the Q4_0 GEMV with LLVM 22)
        assert c["bytemul"] <= 0.05 * dots, (name, dots, c["bytemul"])


def test_cortex_a72_fallback_is_neon_without_dot_product(generic_ir):
    for name, ir_text in generic_ir.items():
        asm = retarget_asm(ir_text, "cortex-a72", "")
        c = _mnemonics(asm)
        # sdot/udot (ARMv8.2 dotprod) and usdot/sudot (i8mm) are illegal instructions on a72
        assert not re.search(r"\t(sdot|udot|usdot|sudot)\t", asm), name
        assert c["bytemul"] >= 32, (name, c["bytemul"])          # widening NEON multiplies
        assert c["scalarmul"] < c["bytemul"] / 4, (name, c["scalarmul"], c["bytemul"])
