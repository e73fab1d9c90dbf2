"""The forward pass: one plan built from the config, run by one executor.

    ids ─▶ embed (+ learned positions) ─▶ for each layer:
              norm ─▶ qkv (+bias) ─▶ (q/k norm) ─▶ RoPE ─▶ write k,v into the cache
                   ─▶ attention over the cache ─▶ out-proj (+bias) ─▶ residual
              norm ─▶ MLP (gate·up SiLU, or up GELU) ─▶ down (+bias) ─▶ residual
              (GPT-NeoX: both branches read the same x and add together: parallel residual)
         ─▶ final norm ─▶ lm head ─▶ logits

`build_plan(cfg)` below IS that network, written as data: a list of steps with named operands
(minilm/plan.py). Each architecture's differences (biases, q/k norms, partial rotary, sliding
windows, GELU or gated MLPs, parallel residual, learned positions) are visible there as which
steps and tensors it has. `Transformer` lowers the plan once to integer tables and runs it with
`kernels/executor.run_plan`, one Numba call and one parallel region per forward: decode is the
plan for M = 1 token (threads share every matrix), prefill the same plan for M tokens.

Shapes: M new tokens, D hidden, H query heads, Hkv kv heads, hd head dim, F ffn, V vocab.
Run-state buffers (f32[rows, width], allocated once): x [D] residual stream, xn [D] normed
input of a block, qkv [(H + 2Hkv) hd], att [H hd] attention output, o / o2 [D] branch outputs,
ff [2F gated | F] MLP hidden, act [F] SwiGLU output; LFM2 adds bcx [3D] (the convolution's
B, C, x) and cx [D] (its gated output).

Logits: the lm head runs outside the plan (`Transformer._head`, a `Linear` over the final-normed
rows, as before); Granite's logits_scaling and Gemma 2's final soft-cap are applied there on the
[M, V] logits with numpy: once per call on the head's output, so they need no step kind, no
buffer as wide as the vocabulary in the run state, and cost nothing for the other models.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading

import numba
import numpy as np

from .cache import KVCache
from .config import Config, rope_inv_freq
from .errors import MinilmError
from .kernels import compile_ahead
from .kernels.executor import ahead_jobs, run_plan
from .kernels.executor import compiled as executor_compiled
from .kernels.rope import rope_tables
from .plan import RESIDUAL, Step, lower, matmul, with_stats
from .quant import FORMATS, Linear

PREFILL_CHUNK = 256   # prompt rows per forward call: bounds the scratch buffers


def build_plan(c: Config) -> list[Step]:
    """The network as steps, for any number of tokens. Tensor names are the canonical ones
    (weights.py); a step naming a tensor the checkpoint lacks (a bias, a q/k norm) skips it.

    Architecture options appear only as steps of the models that have them: an embedding or
    residual multiplier is a `scale` step (Granite, Gemma), a post-norm is a `norm` of the branch
    output in place (Gemma's sandwich, OLMo 2's post-only layout, which feeds x itself to the
    projections), OLMo 2's q/k norm over the whole projection is a `qk_norm` step, Gemma's GeGLU a
    `gelu_mul`, and the RoPE table of a layer (Gemma 3 local/global, SmolLM3's none) is the qkv
    step's i0."""
    eps = c.norm_eps
    scale = c.attn_scale or 1.0 / math.sqrt(c.head_dim)
    L = c.n_layers
    post_only = c.norm_layout == "post"                      # OLMo 2: no norm before a branch
    post = c.norm_layout in ("post", "sandwich")             # a norm on each branch output
    res = c.residual_scale
    norm = lambda n: dict(w=f"{n}.w", b=f"{n}.b", eps=eps)     # RMSNorm when .b is absent
    plan: list[Step] = []
    if c.learned_pos:                                                   # GPT-2
        plan.append(Step("add_rows", dst="x", mat="pos_embd"))           # x[m] += pos_embd[p0 + m]
    if c.embed_scale != 1.0:                                            # Granite, Gemma
        plan.append(Step("scale", dst="x", scale=c.embed_scale))
    if not post_only:
        plan.append(Step("norm", dst="xn", src="x", **norm("l0.attn_norm")))
    inp = "x" if post_only else "xn"                                    # what the branches read

    def branch_out(p: str, which: str) -> list[Step]:
        """The branch output o before the residual add: post-norm, residual multiplier."""
        out = [Step("norm", dst="o", src="o", **norm(p + which))] if post else []
        if res != 1.0:
            out.append(Step("scale", dst="o", scale=res))
        return out

    kv = 0                                                              # KV cache layer of the next attention
    for i in range(L):
        p = f"l{i}."
        nxt = f"l{i + 1}.attn_norm" if i + 1 < L else "out_norm"
        if c.is_conv(i):                                                # LFM2: gated short convolution
            plan += matmul("bcx", inp, p + "wqkv", p + "bqkv")        # [M, D] -> [M, 3D] (B, C, x)
            plan.append(Step("conv", dst="cx", src="bcx", mat=p + "conv_hist", w=p + "conv_w",
                             b=p + "conv_b", i0=c.conv_kernel))         # -> [M, D], history in the cache
            plan += matmul("o", "cx", p + "wo", p + "bo")             # [M, D] -> [M, D]
            plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(p + "ffn_norm")))
            plan += _mlp(c, p, "o")
            plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(nxt)))
            continue
        # -- attention: xn -> qkv -> (q/k norm, RoPE, cache write) -> attention -> o
        plan += matmul("qkv", inp, p + "wqkv", p + "bqkv")            # [M, D] -> [M, (H + 2Hkv) hd]
        if c.qk_norm_full:                                              # OLMo 2: over all q, all k
            plan.append(Step("qk_norm", src="qkv", w=p + "q_norm", b=p + "k_norm", eps=eps))
        per_head = c.qk_norm and not c.qk_norm_full
        rope = c.layer_rope[i] if c.layer_rope else 0
        plan.append(Step("qkv", src="qkv", w=p + "q_norm" if per_head else None,
                         b=p + "k_norm" if per_head else None, layer=kv, eps=eps, i0=rope))
        plan.append(Step("attend", dst="att", src="qkv", layer=kv, i0=c.window(i), scale=scale,
                         cap=c.attn_softcap))
        plan.append(Step("merge", dst="att", layer=kv, i0=c.window(i)))  # join each token's attention splits
        kv += 1
        plan += matmul("o", "att", p + "wo", p + "bo")                # [M, H hd] -> [M, D]
        plan += branch_out(p, "post_attn_norm")
        # -- MLP
        if c.parallel_residual:                                         # x + attn(ln1 x) + mlp(ln2 x)
            plan.append(Step("norm", dst="xn", src="x", **norm(p + "ffn_norm")))
            plan += _mlp(c, p, "o2")
            plan.append(Step("add", dst="o", src="o2"))
        elif post_only:                                                 # x += attn; the MLP reads x
            plan.append(Step("add", dst="x", src="o"))
            plan += _mlp(c, p, "o", inp="x")
        else:                                                           # x += attn; xn = ln2(x)
            plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(p + "ffn_norm")))
            plan += _mlp(c, p, "o")
        plan += branch_out(p, "post_ffn_norm")
        if post_only and i + 1 < L:
            plan.append(Step("add", dst="x", src="o"))                  # x += branch
        else:
            plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(nxt)))  # x += branch; xn = next norm
    return plan


def _mlp(c: Config, p: str, out: str, inp: str = "xn") -> list[Step]:
    if c.gated_mlp:                                                     # SwiGLU / GeGLU
        act = "gelu_mul" if c.act == "gelu_tanh" else "silu_mul"
        return [*matmul("ff", inp, p + "w_gate_up", p + "b_gate_up"),   # [M, D] -> [M, 2F]
                Step(act, dst="act", src="ff", i0=c.intermediate_size),  # -> [M, F]
                *matmul(out, "act", p + "w_down", p + "b_down")]        # [M, F] -> [M, D]
    return [*matmul("ff", inp, p + "w_up", p + "b_up",                 # [M, D] -> gelu -> [M, F]
                    act="gelu_tanh" if c.act == "gelu_tanh" else "gelu"),
            *matmul(out, "ff", p + "w_down", p + "b_down")]             # [M, F] -> [M, D]


def buffer_widths(c: Config) -> dict:
    """Logical width of every run-state buffer (lower() widens inputs of zero-padded matrices)."""
    D, F = c.hidden_size, c.intermediate_size
    w = {"x": D, "xn": D, "qkv": c.q_dim + 2 * c.kv_dim, "att": c.q_dim, "o": D, "o2": D,
         "ff": 2 * F if c.gated_mlp else F, "act": F}
    if any(c.layer_conv):                                               # LFM2: conv in/out
        w.update(bcx=3 * D, cx=D)
    return w


class RunState:
    """Every scratch buffer of a forward call, for up to `rows` tokens, allocated once per model
    (nothing per token, nothing shared between models)."""

    def __init__(self, c: Config, low, rows: int, n_ctx: int, n_steps: int, threads: int):
        self.rows = rows
        self.buf = {n: np.zeros((rows, low.widths[n]), np.float32) for n in low.buffer_names}
        self.btab = np.array([[self.buf[n].ctypes.data, rows, low.widths[n]] for n in low.buffer_names], np.int64)
        K = low.kmax
        self.XQ = np.zeros((rows, K), np.int8)                 # quantized activations of one matmul
        self.XD = np.zeros((rows, K // 32), np.float32)        # their block scales
        self.XS = np.zeros((rows, K // 16), np.float32)        # their block sums (kernel bias; K-quants: per 16)
        self.tiles = np.zeros((threads, 4, K), np.float32)     # per thread: 16-bit rows as f32 (prefill)
        self.scores = np.zeros((threads, n_ctx), np.float32)  # attention scores, a row per thread
        # attention of each token: its cached positions in up to S = threads splits (as decode
        # cuts them), [rows, S, H, hd + 2] = (sum of e*v, max, sum of e), merged per token
        self.attn_part = np.zeros((rows, threads, c.n_heads, c.head_dim + 2), np.float32)
        self.ctr = np.zeros(2 * max(n_steps, 1), np.int64)    # executor phase counters
        self.logits = np.zeros((1, c.vocab_size), np.float32)  # decode logits
        self.ids = np.zeros(rows, np.int64)
        self.pos = np.zeros(rows, np.int64)                     # each row's position
        self.row = np.arange(rows, dtype=np.int64)              # 0..rows-1
        self.slot = np.zeros(rows, np.int64)                    # each row's KV-cache slot
        self.batch_logits = np.zeros((0, c.vocab_size), np.float32)  # decode_rows: [rows wanted, V]


_SERIAL_REGIONS = threading.RLock()


def _region_guard():
    """Numba's workqueue threading layer (used where neither OpenMP nor TBB is available) must not
    run two parallel regions at once: with it, models used from several threads take turns. The
    OpenMP and TBB layers need nothing (this returns a no-op)."""
    try:
        layer = numba.threading_layer()
    except ValueError:              # nothing parallel ran yet in this process: be safe once
        return _SERIAL_REGIONS
    return _SERIAL_REGIONS if layer == "workqueue" else contextlib.nullcontext()


def _compile_notice(fs=None, helper: bool = False):
    """Said once when a model's first forward compiles kernels (first run only; Numba caches them):
    at once when the executor is known not to be cached, with an estimate from fs (the formats:
    each of ggml's block formats adds its kernels) and whether a helper process compiles beside
    this one, else after a few seconds of a first forward."""
    import sys
    est = ""
    if fs is not None:
        from .quant import RAW_FIRST_FID
        n_raw = sum(1 for a in fs for n in (a.dtype.names or ()) if n in FORMATS and FORMATS[n].fid >= RAW_FIRST_FID)
        base, per = COMPILE_SECONDS[bool(helper)]
        est = f", ~{base + per * n_raw:.0f} s"
    print(f"minilm: compiling kernels for this CPU (first run only{est}; cached afterwards) ...",
          file=sys.stderr, flush=True)


# A first start's compile on an idle 2-core x86 (AMD EPYC Zen 4; benchmarks/README.md "First start
# in under 8 s"): (seconds for minilm's own formats, per ggml block format the model adds), in
# one process and with the compile helper beside it. SmolLM2-135M int4: 11.4 s / 6.8 s to the
# first token; a Q4_K_M GGUF (2 ggml formats): about 20 s / 10 s (the helper's earlier figures).
COMPILE_SECONDS = ((12, 4), (7, 2))


class Exclusive:
    """One call at a time on a model (its run state, KV cache and phase counters are single-use):
    other threads wait their turn; the thread that holds it re-entering (a second generation
    while its first stream is still open) gets an error instead of a deadlock or an interleaving."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None

    def __enter__(self):
        if self._owner == threading.get_ident():
            raise MinilmError("this model is already running a call in this thread (an unfinished "
                              "streamed generation?): exhaust or close() that stream first")
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._region = _region_guard()
        self._region.__enter__()
        return self

    def __exit__(self, *exc):
        self._region.__exit__(*exc)
        self._owner = None
        self._lock.release()


class Transformer:
    """Weights + plan + KV cache + run state of one model. Calls that use the run state hold
    `self.busy` (generate_tokens, LM.logits ...): one model serves one call at a time."""

    def __init__(self, cfg: Config, tensors: dict, n_ctx: int, kv_quant: str | None = None, stats: bool = False,
                 full: bool = False):
        """stats: calibration: every matmul's input rows add their squares into `self.stats`
        (matrix name -> f32[K] column sums of x^2; full: f32[K * K] sums of x x^T; and the residual
        stream's column sums of x^2 at each norm, "residual:<norm weight>"; plan.with_stats)."""
        c = self.cfg = cfg
        self.tok_embd: Linear = tensors["tok_embd"]                # [V, D]
        self.lm_head: Linear = tensors.get("output", self.tok_embd)  # [V, D]
        self.out_norm = (tensors["out_norm.w"], tensors.get("out_norm.b"))
        self.n_ctx = n_ctx
        self.plan = build_plan(c)
        self.stats = {}
        if stats:
            ks = {s.mat: tensors[s.mat].K for s in self.plan if s.op == "quant"}
            self.plan = with_stats(self.plan, ks if full else None)
            self.stats = {m: np.zeros(K * K if full else K, np.float32) for m, K in ks.items()}
            self.stats.update({s.w[len("imatrix:"):]: np.zeros(c.hidden_size, np.float32)
                               for s in self.plan if s.op == "stats" and s.w.startswith(f"imatrix:{RESIDUAL}")})
            tensors = dict(tensors, **{f"imatrix:{k}": v for k, v in self.stats.items()})
        convs = [i for i in range(c.n_layers) if c.is_conv(i)]
        self.cache = KVCache(c.n_kv_layers, c.n_kv_heads, n_ctx, c.head_dim, len(convs), c.hidden_size,
                             kv_quant=kv_quant)                # kv_quant None: the default (f16)
        self._tensors = tensors
        self.lowered = low = self._lower()
        threads = numba.get_num_threads()
        self.state = RunState(c, low, min(n_ctx, PREFILL_CHUNK), n_ctx, len(self.plan), threads)
        rs = c.rope_scaling or {}
        self._dynamic = bool(c.rotary_dim) and rs.get("rope_type") == "dynamic"
        self._long_from = rs["original_max_position_embeddings"] if (
            c.rotary_dim and rs.get("rope_type") == "longrope") else 0   # LongRoPE: long factors past this
        self.cos = self.sin = np.zeros((1, 1), np.float32)
        if c.rotary_dim:
            self.cos, self.sin = self._tables(None, n_ctx)            # [n_ctx, R * rot/2]
            if self._long_from:
                self._long = self._tables(self._long_from + 1, n_ctx)
        self._matrices = [tensors[s.mat] for s in self.plan if s.op == "matmul"]
        self.busy = Exclusive()
        self._ran = False
        self._helper = None            # a compile helper started at load (adopt_helper)
        self.last_lookup = None        # the last speculative generation's generate.PromptLookup

    def adopt_helper(self, helper) -> None:
        """A compile helper process (kernels/compile_ahead.py `spawn`) started before this model was
        built: the first forward gives it its jobs if the executor needs compiling, else closes it."""
        if self._ran:
            if helper is not None:
                helper.close()
        else:
            self._helper = helper

    def _lower(self):
        """The plan's tables; LFM2's conv histories point into the cache (all slots' rows)."""
        c, conv = self.cfg, self.cache.conv_all
        convs = [i for i in range(c.n_layers) if c.is_conv(i)]
        hist = {f"l{i}.conv_hist": conv[j].reshape(-1, c.hidden_size)   # [n_slots * n_ctx, D]
                for j, i in enumerate(convs)}
        return lower(self.plan, dict(self._tensors, **hist) if hist else self._tensors, buffer_widths(c))

    def set_slots(self, n: int) -> None:
        """Give the KV cache n sequence slots (slot 0, the library's, keeps its contents): the
        server's batched decode runs one sequence per slot. Call it holding `busy`."""
        self.cache.resize_slots(n)
        if self.cache.conv_all.shape[0]:
            self.lowered = self._lower()                   # the conv history moved
        s = self.state
        if s.batch_logits.shape[0] < n:
            s.batch_logits = np.zeros((n, self.cfg.vocab_size), np.float32)

    def _tables(self, seq_len, n):
        """cos/sin f32[n, R * rot/2]: table 0 (rope_theta with its scaling) and, for Gemma 3, table
        1 (the local layers' base) side by side; LongRoPE scales both by its attention factor."""
        c = self.cfg
        invs = [rope_inv_freq(c, seq_len=seq_len)]
        if c.rope_local_theta:
            invs.append(rope_inv_freq(c, theta=c.rope_local_theta))
        cs, ss = zip(*(rope_tables(inv, n) for inv in invs))
        cos, sin = np.concatenate(cs, axis=1), np.concatenate(ss, axis=1)
        if self._long_from:
            f = np.float32(c.rope_scaling["attention_factor"])
            cos, sin = cos * f, sin * f
        return np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)

    def rope_depends_on_length(self, end: int) -> bool:
        """True when RoPE frequencies change with the sequence length (dynamic NTK past max_pos,
        LongRoPE past its original context)."""
        if self._long_from:
            return end > self._long_from
        return bool(self._dynamic) and end > self.cfg.max_position_embeddings

    def _rope(self, end: int):
        """cos/sin tables; dynamic NTK scaling enlarges the base once the sequence outgrows
        max_position_embeddings (as transformers does, per forward call); LongRoPE uses the long
        factors for a sequence longer than its original context."""
        c = self.cfg
        if self._long_from and end > self._long_from:
            return self._long
        if self._dynamic and end > c.max_position_embeddings:
            return self._tables(end, end)
        return self.cos, self.sin

    def _restart(self, ids: np.ndarray, end: int, slot: int = 0) -> np.ndarray:
        """LongRoPE: when a sequence of `end` tokens needs the other factor set than the cached
        keys were rotated with, re-run the cached tokens too (as transformers' Phi-3 drops its
        cache when generation crosses the original context). Returns the ids to run."""
        cache = self.cache.slots[slot]
        if not self._long_from or cache.pos == 0 or (end > self._long_from) == cache.kv_long:
            return ids
        ids = np.concatenate([np.asarray(cache.tokens, np.int64), ids])
        cache.truncate(0)
        return ids

    def _head(self, h: np.ndarray, out: np.ndarray) -> None:
        """out f32[M, V] <- logits of the final-normed h f32[M, D]: the lm head, then Granite's
        logits_scaling and Gemma 2's final soft-cap (numpy on the logits; nothing for others)."""
        self.lm_head(h, out)
        c = self.cfg
        if c.logits_scaling != 1.0:
            out /= np.float32(c.logits_scaling)
        if c.final_softcap:
            cap = np.float32(c.final_softcap)
            out /= cap
            np.tanh(out, out=out)
            out *= cap

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every matrix of the plan and the lm head."""
        return sum(m.nbytes for m in self._matrices) + self.lm_head.nbytes

    # ---- the network ---------------------------------------------------------------------
    def forward(self, ids: np.ndarray, rope_end: int = 0, slot: int = 0) -> np.ndarray:
        """Run M = len(ids) <= state.rows new tokens at positions cache.pos.. of sequence slot
        `slot`, write their k/v into the cache, advance it, and return the final-normed hidden
        states f32[M, D]. rope_end: the length of the whole sequence this call belongs to (a
        prompt prefilled in chunks), which dynamic NTK RoPE scales by."""
        cache = self.cache.slots[slot]
        M = len(ids)
        cache.check_room(M)
        end = max(rope_end, cache.pos + M)
        cos, sin = self._rope(end)
        if self._long_from:
            cache.kv_long = end > self._long_from
        return self._rows(ids, int(slot), cos, sin)                     # [M, D], final-normed

    def _run(self, M: int, cos, sin) -> None:
        """The plan over the M rows whose embeddings, positions and slots are in the run state."""
        c, s, cache, low = self.cfg, self.state, self.cache, self.lowered
        args = (low.fs, low.steps, low.fpar, s.btab, low.mtab, low.vtab, M, s.pos[:M], s.slot[:M], cos, sin,
                cache.k_all, cache.v_all, s.XQ, s.XD, s.XS, s.tiles, s.scores, s.attn_part, c.n_heads,
                c.n_kv_heads, c.head_dim, c.rotary_dim, s.ctr)
        notice = helper = None
        if not self._ran:                   # the first call may compile the executor for this model
            early, self._helper = self._helper, None
            if not executor_compiled(*args):
                jobs = ahead_jobs(*args)    # a helper process compiles the matrix kernels and the
                if early is not None and early.submit(jobs):   # parallel region meanwhile
                    helper, early = early, None                # (started at load, or now)
                else:
                    helper = compile_ahead.start(jobs)
                _compile_notice(low.fs, helper is not None)
                if helper is not None:      # the lm head first: compiling _task waits for the
                    self._head(np.zeros((1, c.hidden_size), np.float32), s.logits)   # helper at its end
            else:                           # other kernels (the lm head's) may still compile
                notice = threading.Timer(3.0, _compile_notice)
                notice.daemon = True
                notice.start()
            if early is not None:           # a helper started at load, not needed: it exits
                early.close()
        try:
            with helper.serving() if helper is not None else contextlib.nullcontext():
                run_plan(*args)             # compiles what the helper does not; loads what it did
        finally:
            if notice is not None:
                notice.cancel()
            self._ran = True

    def prefill(self, ids, slot: int = 0) -> np.ndarray:
        """Run a prompt (in chunks of state.rows) on sequence slot `slot` and return the logits
        f32[V] of its last token (a buffer reused by the next call)."""
        for out in self.prefill_chunks(ids, slot):
            pass
        return out

    def prefill_chunks(self, ids, slot: int = 0):
        """`prefill` one chunk per step: an iterator that runs the next chunk of state.rows tokens
        each time it is advanced, yielding None after each chunk but the last and then the logits
        f32[V] of the last token (the server interleaves other sequences' steps in between)."""
        ids = np.asarray(ids, dtype=np.int64)
        cache = self.cache.slots[slot]
        cache.check_room(len(ids))
        end = cache.pos + len(ids)
        ids = self._restart(ids, end, slot)
        rows = self.state.rows
        for a in range(0, len(ids), rows):
            h = self.forward(ids[a:a + rows], end, slot)
            if a + rows < len(ids):
                yield None
        out = self.state.logits
        self._head(np.ascontiguousarray(h[-1:]), out)                  # [1, D] -> [1, V]
        yield out[0]

    def _needs_restart(self, cache) -> bool:
        """LongRoPE: the next token crosses the original context (the cache is re-run)."""
        return bool(self._long_from) and cache.pos > 0 and (cache.pos + 1 > self._long_from) != cache.kv_long

    def decode(self, token: int, slot: int = 0) -> np.ndarray:
        """One token at position cache.pos of slot `slot` -> logits f32[V] (a buffer reused by
        the next call)."""
        s = self.state
        if self._needs_restart(self.cache.slots[slot]):
            return self.prefill([token], slot)                          # re-runs the cache (_restart)
        s.ids[0] = token
        h = self.forward(s.ids[:1], 0, slot)                            # [1, D] (a contiguous row)
        self._head(h, s.logits)                                         # [1, D] -> [1, V]
        return s.logits[0]

    def decode_rows(self, tokens, slots=0, rows=None) -> np.ndarray:
        """The one multi-row pass: row m is tokens[m] at the next position of KV-cache slot
        slots[m] (an int: every row on that slot). A slot's rows are consecutive tokens of its
        sequence in order, so one pass can hold a speculative verify pass (k + 1 tokens of one
        sequence), one token of each of several sequences (batched decode) and a prompt chunk of
        another, all beside each other. Writes their k/v, advances each slot, and returns the
        logits f32[n, V] of rows `rows` (indices into tokens; None: all M rows), a buffer reused
        by the next call. Row m's logits are, bit for bit, what decode() of tokens[m] would
        return after that slot's earlier rows (kernels/executor.py; tests/test_decode_exact.py).

        Passes of more than state.rows rows run in pieces of state.rows (rows in order). The
        rows of a slot whose RoPE depends on the sequence length (dynamic NTK past
        max_position_embeddings, LongRoPE crossing its original context) run as one prefill of
        those rows on their own (`all_logits`): with one row, that is exactly decode()."""
        tokens = np.asarray(tokens)
        M = len(tokens) if tokens.ndim == 1 else 0
        one = isinstance(slots, (int, np.integer)) and not isinstance(slots, bool)   # all rows on one slot
        if not one:
            slots = np.asarray(slots)
        if tokens.ndim != 1 or M == 0 or not np.issubdtype(tokens.dtype, np.integer) or not one and (
                slots.shape != tokens.shape or not np.issubdtype(slots.dtype, np.integer)):
            raise ValueError(f"decode_rows: tokens and slots must be 1-D integer arrays of one length >= 1 "
                             f"(or slots one integer), got {tokens.dtype}{tokens.shape} and "
                             f"{np.asarray(slots).dtype}{np.asarray(slots).shape}")
        n_slots, V = self.cache.n_slots, self.cfg.vocab_size
        if (not 0 <= slots < n_slots) if one else (slots.min() < 0 or slots.max() >= n_slots):
            raise ValueError(f"decode_rows: slots {sorted(set(np.atleast_1d(slots).tolist()))} must be in [0, {n_slots})")
        if tokens.min() < 0 or tokens.max() >= V:
            raise ValueError(f"decode_rows: token ids must be in [0, {V}) (vocab_size)")
        if rows is not None:
            rows = [int(r) for r in rows]
            if any(r < 0 or r >= M for r in rows) or any(a >= b for a, b in zip(rows, rows[1:])):
                raise ValueError(f"decode_rows: rows {rows} must be increasing indices into the {M} tokens")
        count = {int(slots): M} if one else collections.Counter(slots.tolist())   # slot -> its rows
        for sl, k in count.items():
            self.cache.slots[sl].check_room(k)
        s = self.state
        n = M if rows is None else len(rows)
        if s.batch_logits.shape[0] < n:
            s.batch_logits = np.zeros((n, V), np.float32)
        out = s.batch_logits[:n]                                        # [n, V]
        alone = {sl for sl in count if self._needs_restart(self.cache.slots[sl]) or
                 self.rope_depends_on_length(self.cache.slots[sl].pos + count[sl])}
        if not alone and M <= s.rows:                                   # one pass, the plain RoPE table
            h = self._rows(tokens, int(slots) if one else slots, self.cos, self.sin)   # [M, D]
            h = h if rows is None else h[rows]                          # [n, D]
            self._head(h if h.flags.c_contiguous else np.ascontiguousarray(h), out)   # -> [n, V]
            return out
        if one:
            slots = np.full(M, slots, np.int64)
        rows = list(range(M)) if rows is None else rows
        plain = [m for m in range(M) if slots[m] not in alone] if alone else list(range(M))
        want = {r: j for j, r in enumerate(rows)}                       # row -> its place in out
        for a in range(0, len(plain), s.rows):                          # pieces of state.rows rows
            part = plain[a:a + s.rows]
            h = self._rows(tokens[part], slots[part], self.cos, self.sin)   # [len(part), D]
            got = [i for i, m in enumerate(part) if m in want]          # rows of h wanted, in order
            if not got:
                continue
            j0 = want[part[got[0]]]
            if want[part[got[-1]]] - j0 == len(got) - 1:                # they fill out[j0:j0 + len(got)]
                x = h if len(got) == len(part) else h[got]
                self._head(x if x.flags.c_contiguous else np.ascontiguousarray(x), out[j0:j0 + len(got)])
            else:                                                       # interleaved with `alone` rows
                for i in got:
                    self._head(np.ascontiguousarray(h[i:i + 1]), s.logits)
                    out[want[part[i]]] = s.logits[0]
        for sl in alone:                                                # length-dependent RoPE
            ms = [m for m in range(M) if slots[m] == sl]
            lg = self.all_logits(tokens[ms], sl)                        # [len(ms), V]
            for i, m in enumerate(ms):
                if m in want:
                    out[want[m]] = lg[i]
        return out

    def _rows(self, tokens: np.ndarray, slots, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """The plan over M = len(tokens) <= state.rows rows (forward, decode_rows): row m is
        tokens[m] at the next position of slot slots[m] (int64[M], or one int for all rows),
        with RoPE tables cos/sin. Writes their k/v, advances each slot, returns the final-normed
        hidden states f32[M, D]. Room in the cache is the caller's to check."""
        s, caches = self.state, self.cache.slots
        M = len(tokens)
        if isinstance(slots, int):                                      # one sequence: positions p0..
            nxt = {slots: caches[slots].pos + M}
            np.add(s.row, caches[slots].pos, out=s.pos)                 # (rows past M unused)
            s.slot[:M] = slots
        else:
            nxt = {}                                                    # slot -> its next position
            for m in range(M):
                sl = int(slots[m])
                p = nxt.get(sl, caches[sl].pos)
                s.pos[m] = p
                nxt[sl] = p + 1
            s.slot[:M] = slots
        s.ids[:M] = tokens
        self.tok_embd.rows(s.ids[:M], s.buf["x"][:M])                   # [M] -> [M, D]
        self._run(M, cos, sin)
        if len(nxt) == 1:
            caches[next(iter(nxt))].tokens.extend(s.ids[:M].tolist())
        else:
            for sl, t in zip(s.slot[:M].tolist(), s.ids[:M].tolist()):
                caches[sl].tokens.append(t)
        for sl, p in nxt.items():
            caches[sl].pos = p
        return s.buf["xn"][:M, :self.cfg.hidden_size]                   # [M, D], final-normed

    @property
    def length_dependent_rope(self) -> bool:
        """RoPE tables that change with the sequence length (dynamic NTK, LongRoPE)."""
        return bool(self._long_from or self._dynamic)

    def all_logits(self, ids, slot: int = 0) -> np.ndarray:
        """Logits f32[len(ids), V] (a new array) for every position of ids, on top of what slot
        `slot` holds (one prefill: the whole sequence's length sets a length-dependent RoPE)."""
        ids = np.asarray(ids, dtype=np.int64)
        cache = self.cache.slots[slot]
        cache.check_room(len(ids))
        n = len(ids)
        end = cache.pos + n
        ids = self._restart(ids, end, slot)                             # LongRoPE may re-run the cache
        out = np.empty((len(ids), self.cfg.vocab_size), np.float32)
        for a in range(0, len(ids), self.state.rows):
            h = self.forward(ids[a:a + self.state.rows], end, slot)
            self._head(np.ascontiguousarray(h), out[a:a + len(h)])
        return out[len(ids) - n:]
