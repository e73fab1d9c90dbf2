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
ff [2F gated | F] MLP hidden, act [F] SwiGLU output.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numba
import numpy as np

from .cache import KVCache
from .config import Config, rope_inv_freq
from .errors import MinilmError
from .kernels.executor import run_plan
from .kernels.rope import rope_tables
from .plan import Step, lower, matmul
from .quant import Linear

PREFILL_CHUNK = 256   # prompt rows per forward call: bounds the scratch buffers


def build_plan(c: Config) -> list[Step]:
    """The network as steps, for any number of tokens. Tensor names are the canonical ones
    (weights.py); a step naming a tensor the checkpoint lacks (a bias, a q/k norm) skips it."""
    eps = c.norm_eps
    scale = 1.0 / math.sqrt(c.head_dim)
    L = c.n_layers
    norm = lambda n: dict(w=f"{n}.w", b=f"{n}.b", eps=eps)     # RMSNorm when .b is absent
    plan: list[Step] = []
    if c.learned_pos:                                                   # GPT-2
        plan.append(Step("add_rows", dst="x", mat="pos_embd"))           # x[m] += pos_embd[p0 + m]
    plan.append(Step("norm", dst="xn", src="x", **norm("l0.attn_norm")))
    for i in range(L):
        p = f"l{i}."
        nxt = f"l{i + 1}.attn_norm" if i + 1 < L else "out_norm"
        # -- attention: xn -> qkv -> (q/k norm, RoPE, cache write) -> attention -> o
        plan += matmul("qkv", "xn", p + "wqkv", p + "bqkv")           # [M, D] -> [M, (H + 2Hkv) hd]
        plan.append(Step("qkv", src="qkv", w=p + "q_norm", b=p + "k_norm", layer=i, eps=eps))
        plan.append(Step("attend", dst="att", src="qkv", layer=i, i0=c.window(i), scale=scale))
        plan.append(Step("merge", dst="att", layer=i, i0=c.window(i)))  # decode: join the splits
        plan += matmul("o", "att", p + "wo", p + "bo")                # [M, H hd] -> [M, D]
        # -- MLP
        if c.parallel_residual:                                         # x + attn(ln1 x) + mlp(ln2 x)
            plan.append(Step("norm", dst="xn", src="x", **norm(p + "ffn_norm")))
            plan += _mlp(c, p, "o2")
            plan.append(Step("add", dst="o", src="o2"))
        else:                                                           # x += attn; xn = ln2(x)
            plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(p + "ffn_norm")))
            plan += _mlp(c, p, "o")
        plan.append(Step("add_norm", dst="xn", src="x", src2="o", **norm(nxt)))  # x += branch; xn = next norm
    return plan


def _mlp(c: Config, p: str, out: str) -> list[Step]:
    if c.gated_mlp:                                                     # SwiGLU
        return [*matmul("ff", "xn", p + "w_gate_up", p + "b_gate_up"),  # [M, D] -> [M, 2F]
                Step("silu_mul", dst="act", src="ff", i0=c.intermediate_size),  # -> [M, F]
                *matmul(out, "act", p + "w_down", p + "b_down")]        # [M, F] -> [M, D]
    return [*matmul("ff", "xn", p + "w_up", p + "b_up"),                # [M, D] -> [M, F]
            Step("gelu", dst="ff", i0=1 if c.act == "gelu_tanh" else 0),
            *matmul(out, "ff", p + "w_down", p + "b_down")]             # [M, F] -> [M, D]


def buffer_widths(c: Config) -> dict:
    """Logical width of every run-state buffer (lower() widens inputs of zero-padded matrices)."""
    D, F = c.hidden_size, c.intermediate_size
    return {"x": D, "xn": D, "qkv": c.q_dim + 2 * c.kv_dim, "att": c.q_dim, "o": D, "o2": D,
            "ff": 2 * F if c.gated_mlp else F, "act": F}


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
        self.scores = np.zeros((max(c.n_heads, threads), n_ctx), np.float32)  # attention scores
        # decode attention: one split of the cached positions per thread, [S, H, hd + 2] =
        # (sum of e*v, max, sum of e)
        self.attn_part = np.zeros((threads, c.n_heads, c.head_dim + 2), np.float32)
        self.ctr = np.zeros(2 * max(n_steps, 1), np.int64)    # executor phase counters
        self.logits = np.zeros((1, c.vocab_size), np.float32)  # decode logits
        self.ids = np.zeros(rows, np.int64)


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

    def __init__(self, cfg: Config, tensors: dict, n_ctx: int):
        c = self.cfg = cfg
        self.tok_embd: Linear = tensors["tok_embd"]                # [V, D]
        self.lm_head: Linear = tensors.get("output", self.tok_embd)  # [V, D]
        self.out_norm = (tensors["out_norm.w"], tensors.get("out_norm.b"))
        self.n_ctx = n_ctx
        self.plan = build_plan(c)
        self.lowered = low = lower(self.plan, tensors, buffer_widths(c))
        self.cache = KVCache(c.n_layers, c.n_kv_heads, n_ctx, c.head_dim)
        threads = numba.get_num_threads()
        self.state = RunState(c, low, min(n_ctx, PREFILL_CHUNK), n_ctx, len(self.plan), threads)
        self.cos = self.sin = np.zeros((1, 1), np.float32)
        if c.rotary_dim:
            self.cos, self.sin = rope_tables(rope_inv_freq(c), n_ctx)   # [n_ctx, rot/2]
        self._dynamic = c.rotary_dim and (c.rope_scaling or {}).get("rope_type") == "dynamic"
        self._matrices = [tensors[s.mat] for s in self.plan if s.op == "matmul"]
        self.busy = Exclusive()

    def rope_depends_on_length(self, end: int) -> bool:
        """True when RoPE frequencies change with the sequence length (dynamic NTK past max_pos)."""
        return bool(self._dynamic) and end > self.cfg.max_position_embeddings

    def _rope(self, end: int):
        """cos/sin tables; dynamic NTK scaling enlarges the base once the sequence outgrows
        max_position_embeddings (as transformers does, per forward call)."""
        c = self.cfg
        if self._dynamic and end > c.max_position_embeddings:
            return rope_tables(rope_inv_freq(c, seq_len=end), end)
        return self.cos, self.sin

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every matrix of the plan and the lm head."""
        return sum(m.nbytes for m in self._matrices) + self.lm_head.nbytes

    # ---- the network ---------------------------------------------------------------------
    def forward(self, ids: np.ndarray, rope_end: int = 0) -> np.ndarray:
        """Run M = len(ids) <= state.rows new tokens at positions cache.pos.., write their k/v
        into the cache, advance it, and return the final-normed hidden states f32[M, D].
        rope_end: the length of the whole sequence this call belongs to (a prompt prefilled in
        chunks), which dynamic NTK RoPE scales by."""
        c, s, cache, low = self.cfg, self.state, self.cache, self.lowered
        M = len(ids)
        p0 = cache.pos
        cache.check_room(M)
        self.tok_embd.rows(ids, s.buf["x"][:M])                        # [M] -> [M, D]
        cos, sin = self._rope(max(rope_end, p0 + M))
        run_plan(low.fs, low.steps, low.fpar, s.btab, low.mtab, low.vtab, M, p0, cos, sin,
                 cache.k, cache.v, s.XQ, s.XD, s.XS, s.tiles, s.scores, s.attn_part,
                 c.n_heads, c.n_kv_heads, c.head_dim, c.rotary_dim, s.ctr)
        cache.pos += M
        cache.tokens.extend(int(t) for t in ids)
        return s.buf["xn"][:M, :c.hidden_size]                          # [M, D], final-normed

    def prefill(self, ids) -> np.ndarray:
        """Run a prompt (in chunks of state.rows) and return the logits f32[V] of its last token."""
        ids = np.asarray(ids, dtype=np.int64)
        self.cache.check_room(len(ids))
        end = self.cache.pos + len(ids)
        for a in range(0, len(ids), self.state.rows):
            h = self.forward(ids[a:a + self.state.rows], end)
        out = self.state.logits
        self.lm_head(np.ascontiguousarray(h[-1:]), out)                # [1, D] -> [1, V]
        return out[0]

    def decode(self, token: int) -> np.ndarray:
        """One token at position cache.pos -> logits f32[V] (a buffer reused by the next call)."""
        s = self.state
        s.ids[0] = token
        h = self.forward(s.ids[:1])                                     # [1, D] (a contiguous row)
        self.lm_head(h, s.logits)                                       # [1, D] -> [1, V]
        return s.logits[0]

    def all_logits(self, ids) -> np.ndarray:
        """Logits f32[len(ids), V] for every position of ids, on top of the current cache."""
        ids = np.asarray(ids, dtype=np.int64)
        self.cache.check_room(len(ids))
        out = np.empty((len(ids), self.cfg.vocab_size), np.float32)
        end = self.cache.pos + len(ids)
        for a in range(0, len(ids), self.state.rows):
            h = self.forward(ids[a:a + self.state.rows], end)
            self.lm_head(np.ascontiguousarray(h), out[a:a + len(h)])
        return out
