"""LLVM building blocks shared by the matmul kernels (numba.extending.intrinsic).

Numba has no float16 type, no vector types and no prefetch; these small intrinsics give the
kernels in matmul.py and qmatmul.py what they need, and LLVM inlines them:
  _h2f / _bf2f             one fp16 / bf16 element (uint16 bits) -> float32
  _f2h                     float32 -> fp16 bits (uint16; round to nearest even; vcvtps2ph)
  _stack_f32(n)            n float32 on the stack (the parfor body's entry block); accessed whole,
                           LLVM keeps them in vector registers (per-row accumulators)
  _ptr_add(p, n)           p + n elements
  _prefetch(arr, off)      prefetcht0 of the line holding arr[off] (never faults)
  _hsum16(p, off)          sum of p[off:off+16] as a shuffle tree
  _blk_fma16(acc, w, wo, x, xo, n, KIND)   acc[0:n] += f32(w[wo:wo+n]) * x[xo:xo+n] (masked tail)
  _blk_axpy16(acc, w, x, xo, n)            acc[0:n] += w * f32(x[xo:xo+n]) (x f32, fp16 bits or int8)
  _zero16(acc) / _blk_store16(acc, out, o, n)   acc[0:16] = 0 / out[o:o+n] = acc[0:n]
  _masked_load             a vector load whose lanes past n are zero and not read
"""
import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_V16I32 = ir.VectorType(_I32, 16)
_V16F32 = ir.VectorType(_F32, 16)


def _splat_idx(builder, v, idx):
    """shufflevector(v, undef, idx) -> vector of len(idx)."""
    return builder.shuffle_vector(v, ir.Constant(v.type, None),
                                  ir.Constant(ir.VectorType(_I32, len(idx)), list(idx)))


@intrinsic
def _h2f(typingctx, h):
    """uint16 fp16 bits -> float32 (fpext half; vectorises to vcvtph2ps)."""
    def codegen(ctx, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(16)) if args[0].type.width != 16 else args[0]
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _f2h(typingctx, x):
    """float32 -> fp16 bits as uint16 (fptrunc half: round to nearest even; vectorises to vcvtps2ph)."""
    def codegen(ctx, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _bf2f(typingctx, h):
    """uint16 bf16 bits -> float32 (zext, shl 16, bitcast)."""
    def codegen(ctx, builder, sig, args):
        v = builder.zext(args[0], ir.IntType(32)) if args[0].type.width < 32 else args[0]
        v = builder.shl(v, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to n float32 on the stack (n literal). alloca in the entry block of the
    function (the parfor body), promoted to registers by LLVM when accessed whole."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(ctx, builder, sig, args):
        ptr = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), size))
        return builder.bitcast(ptr, ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(n), codegen


def _elem_ptr(ctx, builder, aty, arr, off, elty):
    data = ctx.make_array(aty)(ctx, builder, arr).data
    p = builder.gep(data, [off])
    return builder.bitcast(p, elty.as_pointer())


# Flags for float operations an intrinsic emits whose order of rounding is part of a kernel's result
# (horizontal sums, scale products). Numba's fastmath pass gives every float operation that has no
# flags the function's fast-math flags, reassociation included, so an unflagged tree could be
# reordered differently by LLVM where the kernel is inlined into another function than where it is
# compiled alone: the executor's copy and the standalone copy then differ in the last bits, and a
# process that compiled the executor computes other logits than one that loaded it from the cache.
# "nsz" (signed zeros do not matter) marks the operation as flagged and allows no reordering.
EXACT = ("nsz",)

@intrinsic
def _hsum16(typingctx, accp, off):
    """sum(accp[off:off+16]) as a shuffle tree (the Numba loop compiles to 15 dependent adds)."""
    def codegen(ctx, builder, sig, args):
        p = builder.bitcast(builder.gep(args[0], [args[1]]), _V16F32.as_pointer())
        v = builder.load(p, align=4)
        n = 16
        while n > 1:
            h = n // 2
            a = _splat_idx(builder, v, list(range(h)))
            b = _splat_idx(builder, v, list(range(h, n)))
            v = builder.fadd(a, b, flags=EXACT)   # see EXACT: the same tree wherever it is inlined
            n = h
        return builder.extract_element(v, ir.Constant(_I32, 0))
    return types.float32(accp, off), codegen


@intrinsic
def _prefetch(typingctx, arr, off):
    """Software prefetch (prefetcht0) of the cache line holding element off of arr; never faults,
    so an offset past the end is harmless. The quantized gemvs are partly compute-bound: without
    it the hardware prefetcher does not run far enough ahead and memory time adds to compute time."""
    def codegen(ctx, builder, sig, args):
        p = _elem_ptr(ctx, builder, sig.args[0], args[0], args[1], _I8)
        f = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
            "llvm.prefetch.p0")
        builder.call(f, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return ir.Constant(_I8, 0)
    return types.int8(arr, off), codegen


@intrinsic
def _ptr_add(typingctx, p, n):
    def codegen(ctx, builder, sig, args):
        return builder.gep(args[0], [args[1]])
    return p(p, n), codegen


def _masked_load(builder, ptr, vty, n_valid, align):
    """Load vty from ptr, lanes >= n_valid (i64 value) are 0 and not read. With a constant
    n_valid == len(vty) LLVM folds this to a plain load."""
    n = vty.count
    ity = n_valid.type
    lanes = ir.Constant(ir.VectorType(ity, n), list(range(n)))
    nv = builder.insert_element(ir.Constant(ir.VectorType(ity, n), None), n_valid, ir.Constant(_I32, 0))
    nv = builder.shuffle_vector(nv, ir.Constant(ir.VectorType(ity, n), None),
                                ir.Constant(ir.VectorType(_I32, n), [0] * n))
    mask = builder.icmp_signed("<", lanes, nv)
    ety = vty.element
    suffix = {8: "i8", 16: "i16", 32: "i32"}.get(getattr(ety, "width", 0), "f32")
    if isinstance(ety, ir.FloatType):
        suffix = "f32"
    f = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vty, [vty.as_pointer(), _I32, ir.VectorType(ir.IntType(1), n), vty]),
        f"llvm.masked.load.v{n}{suffix}.p0")
    return builder.call(f, [builder.bitcast(ptr, vty.as_pointer()), ir.Constant(_I32, align), mask,
                            ir.Constant(vty, None)])



@intrinsic
def _blk_fma16(typingctx, accp, w, woff, x, xoff, n, KIND):
    """acc[0:16] += f32(w[woff:woff+16]) * x[xoff:xoff+16] over the first n (<= 16) lanes (the
    rest are not read; n = 16 is a plain load); KIND 0: w f32, 1: w fp16 bits (u16), 2: w bf16
    bits (u16). 16 f32 lanes per row on the stack (promoted to a zmm register)."""
    if not isinstance(KIND, types.IntegerLiteral):
        return None
    kind = KIND.literal_value

    def codegen(ctx, builder, sig, args):
        accp_, w_, woff_, x_, xoff_, n_ = args[:6]
        if n_.type.width != 64:
            n_ = builder.sext(n_, ir.IntType(64))
        if kind == 0:
            wv = _masked_load(builder, _elem_ptr(ctx, builder, sig.args[1], w_, woff_, _F32), _V16F32, n_, 4)
        else:
            v16 = ir.VectorType(_I16, 16)
            h = _masked_load(builder, _elem_ptr(ctx, builder, sig.args[1], w_, woff_, _I16), v16, n_, 2)
            if kind == 1:
                wv = builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), _V16F32)
            else:
                wv = builder.bitcast(builder.shl(builder.zext(h, _V16I32), ir.Constant(_V16I32, [16] * 16)),
                                     _V16F32)
        xv = _masked_load(builder, _elem_ptr(ctx, builder, sig.args[3], x_, xoff_, _F32), _V16F32, n_, 4)
        ap = builder.bitcast(accp_, _V16F32.as_pointer())
        a = builder.load(ap, align=4)
        # an explicit fma: whether LLVM would contract a fast fmul + fadd depends on where this is
        # inlined, and decode_step must give the same bits as the GEMV kernels
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3),
                                             "llvm.fma.v16f32")
        builder.store(builder.call(fma, [wv, xv, a]), ap, align=4)
        return ir.Constant(_I8, 0)
    return types.int8(accp, w, woff, x, xoff, n, KIND), codegen


def _blk_vec(ctx, builder, aty, arr, off, n):
    """x[off:off+16] (lanes >= n zero and not read) as 16 f32: x float32, fp16 bits (uint16) or
    int8 values, converted as Numba converts one element (fpext half, sitofp)."""
    dt = aty.dtype
    if dt == types.float32:
        return _masked_load(builder, _elem_ptr(ctx, builder, aty, arr, off, _F32), _V16F32, n, 4)
    if dt == types.uint16:
        h = _masked_load(builder, _elem_ptr(ctx, builder, aty, arr, off, _I16), ir.VectorType(_I16, 16), n, 2)
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), _V16F32)
    b = _masked_load(builder, _elem_ptr(ctx, builder, aty, arr, off, _I8), ir.VectorType(_I8, 16), n, 1)
    return builder.sitofp(b, _V16F32)


@intrinsic
def _blk_axpy16(typingctx, accp, w, x, xoff, n):
    """acc[0:16] += w * f32(x[xoff:xoff+16]) over the first n (<= 16) lanes (the rest are not
    read), x float32, fp16 bits (uint16) or int8 values: the multiply and add carry "contract", so
    each lane is what Numba's fastmath `out[i] += w * x[i]` computes (one FMA where the target has
    it). The 16 accumulators on the stack stay in a register across a loop of these."""
    if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.uint16, types.int8)):
        return None

    def codegen(ctx, builder, sig, args):
        accp_, w_, x_, xoff_, n_ = args
        if n_.type.width != 64:
            n_ = builder.sext(n_, ir.IntType(64))
        xv = _blk_vec(ctx, builder, sig.args[2], x_, xoff_, n_)
        wf = w_ if w_.type == _F32 else builder.fptrunc(w_, _F32)
        wv = _splat_idx(builder, builder.insert_element(ir.Constant(_V16F32, None), wf, ir.Constant(_I32, 0)),
                        [0] * 16)
        ap = builder.bitcast(accp_, _V16F32.as_pointer())
        a = builder.load(ap, align=4)
        builder.store(builder.fadd(a, builder.fmul(wv, xv, flags=("contract",)), flags=("contract",)), ap, align=4)
        return ir.Constant(_I8, 0)
    return types.int8(accp, types.float32, x, xoff, n), codegen


@intrinsic
def _zero16(typingctx, accp):
    """acc[0:16] = 0 (one vector store: the accumulators stay promotable to a register)."""
    def codegen(ctx, builder, sig, args):
        builder.store(ir.Constant(_V16F32, [0.0] * 16), builder.bitcast(args[0], _V16F32.as_pointer()), align=4)
        return ir.Constant(_I8, 0)
    return types.int8(accp), codegen


@intrinsic
def _blk_store16(typingctx, accp, out, off, n):
    """out[off:off+n] = acc[0:n] (n <= 16; a masked store, lanes past n untouched), out float32."""
    if not (isinstance(out, types.Array) and out.dtype == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        accp_, out_, off_, n_ = args
        if n_.type.width != 64:
            n_ = builder.sext(n_, ir.IntType(64))
        v = builder.load(builder.bitcast(accp_, _V16F32.as_pointer()), align=4)
        lanes = ir.Constant(ir.VectorType(n_.type, 16), list(range(16)))
        nv = builder.insert_element(ir.Constant(ir.VectorType(n_.type, 16), None), n_, ir.Constant(_I32, 0))
        nv = _splat_idx(builder, nv, [0] * 16)
        mask = builder.icmp_signed("<", lanes, nv)
        f = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_V16F32, _V16F32.as_pointer(), _I32,
                                                            ir.VectorType(ir.IntType(1), 16)]),
            "llvm.masked.store.v16f32.p0")
        builder.call(f, [v, builder.bitcast(_elem_ptr(ctx, builder, sig.args[1], out_, off_, _F32),
                                            _V16F32.as_pointer()), ir.Constant(_I32, 4), mask])
        return ir.Constant(_I8, 0)
    return types.int8(accp, out, off, n), codegen


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """old = arr[idx]; arr[idx] += val, atomically (seq_cst); arr: int64[:]."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(ctx, builder, sig, args):
        p = _elem_ptr(ctx, builder, sig.args[0], args[0], args[1], ir.IntType(64))
        v = args[2] if args[2].type.width == 64 else builder.sext(args[2], ir.IntType(64))
        return builder.atomic_rmw("add", p, v, "seq_cst")
    return types.int64(arr, idx, val), codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] read atomically with acquire ordering (what other threads wrote before their
    atomic_add of it is visible after); arr: int64[:]."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(ctx, builder, sig, args):
        p = _elem_ptr(ctx, builder, sig.args[0], args[0], args[1], ir.IntType(64))
        return builder.load_atomic(p, "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 PAUSE hint inside a spin-wait loop (nothing elsewhere)."""
    import platform

    def codegen(ctx, builder, sig, args):
        if platform.machine().lower() in ("x86_64", "amd64"):
            f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                               "llvm.x86.sse2.pause")
            builder.call(f, [])
        return ir.Constant(_I8, 0)
    return types.int8(), codegen


# Giving the CPU back inside a spin-wait (a shared machine: another process may need the core
# the waiting thread spins on). libc's sched_yield / usleep where the process has them (POSIX);
# elsewhere these compile to nothing and the wait keeps spinning.
def _libc_has(name):
    import llvmlite.binding as llvm
    try:
        return bool(llvm.address_of_symbol(name))
    except Exception:  # pragma: no cover
        return False


_HAVE_YIELD = _libc_has("sched_yield")
_HAVE_USLEEP = _libc_has("usleep")


@intrinsic
def cpu_yield(typingctx):
    """sched_yield(): let another runnable thread have this core."""
    def codegen(ctx, builder, sig, args):
        if _HAVE_YIELD:
            f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(f, [])
        return ir.Constant(_I8, 0)
    return types.int8(), codegen


@intrinsic
def sleep_us(typingctx, us):
    """usleep(us): sleep this thread for about `us` microseconds."""
    def codegen(ctx, builder, sig, args):
        if _HAVE_USLEEP:
            f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32)]),
                                               "usleep")
            builder.call(f, [builder.trunc(args[0], ir.IntType(32))])
        return ir.Constant(_I8, 0)
    return types.int8(types.int64), codegen
