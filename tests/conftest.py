"""Shared fixtures of the minilm test suite.

    SHARED           Path of the shared read-only data (../shared from the repo root)
    SHARED_MODELS, ARCH_PROXIES, GOLDEN_MODELS   names of the shared models (../shared/models)
    shared_path(...) a path under SHARED, or pytest.skip with a clear message when it is absent
    shared_model     session-scoped cache: shared_model("stories260K", n_ctx=512) -> loaded LM
    untimed_drafts   greedy prompt-lookup drafting decided by the text alone (no timings), for
                     tests that count drafts (test_speculative, test_batch)
    make_checkpoint  factory writing a small random HF checkpoint folder into tmp_path
    hf_tensor_shapes HF tensor names -> shapes for a config dict (used by make_checkpoint)
    check_against_reference / check_greedy / check_reference_against_transformers /
    check_decode_equals_prefill
                     the cross-checks of random checkpoints that test_random_models (llama, GPT-2,
                     NeoX families) and test_archs (Granite ... LFM2) both run
    random_raw / dot_tol  random ggml block bytes with sane fp16 scales, and the float32 bound of a
                     ggml kernel against its numpy dot_ref (test_ggml_quants, test_ggml_repack,
                     test_row_kernels)

This is the one place that locates ../shared: test modules import SHARED / shared_path from here
(`from conftest import SHARED`) instead of computing the path. Nothing from ../shared is ever
copied into the repository; tokenizer.json files are copied into
pytest's tmp_path only.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()

SHARED_MODELS = ["stories260K", "proxy-gpt2-shakespeare", "proxy-neox-shakespeare",
                 "proxy-qwen2-shakespeare", "proxy-qwen3-shakespeare"]
# the architectures whose differences are plan steps (Granite, OLMo 2, SmolLM3, Gemma 3/2, Phi-3, LFM2)
ARCH_PROXIES = ["proxy-granite-shakespeare", "proxy-olmo2-shakespeare", "proxy-smollm3-shakespeare",
                "proxy-gemma3-shakespeare", "proxy-gemma2-shakespeare", "proxy-phi3-shakespeare",
                "proxy-lfm2-shakespeare"]
GOLDEN_MODELS = SHARED_MODELS + ARCH_PROXIES     # every shared model with transformers goldens


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (the ../shared folder beside the repo is "
                    f"needed for this test)")
    return p


@pytest.fixture
def untimed_drafts(monkeypatch):
    """Greedy speculative decoding drafts as sampling does, from the text alone: whether a
    draft pays is otherwise measured as it runs (minilm.generate.PromptLookup), so on an idle
    core a tiny model may draft almost nothing and a test that counts drafts would depend on
    the machine's load. The tokens never depend on it."""
    from minilm.generate import PromptLookup
    init = PromptLookup.__init__

    def untimed(self, ids, timed=True, before=None):
        init(self, ids, timed=False, before=before)
    monkeypatch.setattr(PromptLookup, "__init__", untimed)


# ---- loaded shared models, once per session --------------------------------------------------
_MODELS: dict = {}


@pytest.fixture(scope="session")
def shared_model():
    """shared_model(name, n_ctx=None) -> minilm LM, loaded once per session per (name, n_ctx).

    Tests that use it must leave no state behind that matters: LM.logits resets the cache and
    generate re-runs at least the last prompt token, so sharing one LM is safe.
    """
    import minilm

    def get(name: str, n_ctx: int | None = None):
        key = (name, n_ctx)
        if key not in _MODELS:
            folder = shared_path("models", name)
            _MODELS[key] = minilm.load(str(folder), n_ctx=n_ctx)
        return _MODELS[key]

    return get


# ---- random checkpoints ----------------------------------------------------------------------
def _geti(cfg, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def hf_tensor_shapes(cfg: dict, gpt2_prefix: bool = True) -> dict:
    """HF tensor name -> shape for the architectures minilm supports, from a config dict."""
    mt = cfg["model_type"]
    V = cfg["vocab_size"]
    s = {}
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
        H = cfg["num_attention_heads"]
        Hkv = cfg.get("num_key_value_heads") or H
        hd = cfg.get("head_dim") or D // H
        F = cfg["intermediate_size"]
        attn_bias = cfg.get("attention_bias", False)
        qkv_bias = True if mt == "qwen2" else attn_bias
        o_bias = False if mt in ("qwen2", "mistral") else attn_bias
        mlp_bias = cfg.get("mlp_bias", False) if mt == "llama" else False
        s["model.embed_tokens.weight"] = (V, D)
        for i in range(L):
            p = f"model.layers.{i}."
            s[p + "input_layernorm.weight"] = (D,)
            s[p + "post_attention_layernorm.weight"] = (D,)
            s[p + "self_attn.q_proj.weight"] = (H * hd, D)
            s[p + "self_attn.k_proj.weight"] = (Hkv * hd, D)
            s[p + "self_attn.v_proj.weight"] = (Hkv * hd, D)
            s[p + "self_attn.o_proj.weight"] = (D, H * hd)
            if qkv_bias:
                s[p + "self_attn.q_proj.bias"] = (H * hd,)
                s[p + "self_attn.k_proj.bias"] = (Hkv * hd,)
                s[p + "self_attn.v_proj.bias"] = (Hkv * hd,)
            if o_bias:
                s[p + "self_attn.o_proj.bias"] = (D,)
            if mt == "qwen3":
                s[p + "self_attn.q_norm.weight"] = (hd,)
                s[p + "self_attn.k_norm.weight"] = (hd,)
            s[p + "mlp.gate_proj.weight"] = (F, D)
            s[p + "mlp.up_proj.weight"] = (F, D)
            s[p + "mlp.down_proj.weight"] = (D, F)
            if mlp_bias:
                s[p + "mlp.gate_proj.bias"] = (F,)
                s[p + "mlp.up_proj.bias"] = (F,)
                s[p + "mlp.down_proj.bias"] = (D,)
        s["model.norm.weight"] = (D,)
        if not cfg.get("tie_word_embeddings", False):
            s["lm_head.weight"] = (V, D)
    elif mt == "gpt2":
        D, L = cfg["n_embd"], cfg["n_layer"]
        F = cfg.get("n_inner") or 4 * D
        P = cfg["n_positions"]
        pre = "transformer." if gpt2_prefix else ""
        s[pre + "wte.weight"] = (V, D)
        s[pre + "wpe.weight"] = (P, D)
        for i in range(L):
            p = f"{pre}h.{i}."
            s[p + "ln_1.weight"] = (D,)
            s[p + "ln_1.bias"] = (D,)
            s[p + "attn.c_attn.weight"] = (D, 3 * D)
            s[p + "attn.c_attn.bias"] = (3 * D,)
            s[p + "attn.c_proj.weight"] = (D, D)
            s[p + "attn.c_proj.bias"] = (D,)
            s[p + "ln_2.weight"] = (D,)
            s[p + "ln_2.bias"] = (D,)
            s[p + "mlp.c_fc.weight"] = (D, F)
            s[p + "mlp.c_fc.bias"] = (F,)
            s[p + "mlp.c_proj.weight"] = (F, D)
            s[p + "mlp.c_proj.bias"] = (D,)
        s[pre + "ln_f.weight"] = (D,)
        s[pre + "ln_f.bias"] = (D,)
    elif mt == "gpt_neox":
        D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
        F = cfg["intermediate_size"]
        bias = cfg.get("attention_bias", True)
        s["gpt_neox.embed_in.weight"] = (V, D)
        for i in range(L):
            p = f"gpt_neox.layers.{i}."
            for n in ("input_layernorm", "post_attention_layernorm"):
                s[p + n + ".weight"] = (D,)
                s[p + n + ".bias"] = (D,)
            s[p + "attention.query_key_value.weight"] = (3 * D, D)
            s[p + "attention.dense.weight"] = (D, D)
            if bias:
                s[p + "attention.query_key_value.bias"] = (3 * D,)
                s[p + "attention.dense.bias"] = (D,)
            s[p + "mlp.dense_h_to_4h.weight"] = (F, D)
            s[p + "mlp.dense_h_to_4h.bias"] = (F,)
            s[p + "mlp.dense_4h_to_h.weight"] = (D, F)
            s[p + "mlp.dense_4h_to_h.bias"] = (D,)
        s["gpt_neox.final_layer_norm.weight"] = (D,)
        s["gpt_neox.final_layer_norm.bias"] = (D,)
        if not cfg.get("tie_word_embeddings", False):
            s["embed_out.weight"] = (V, D)
    else:
        raise ValueError(f"no tensor layout for model_type {mt!r}")
    return s


def random_tensors(shapes: dict, std: float = 0.2, seed: int = 0) -> dict:
    """N(0, std) matrices and biases; norm weights around 1 (so activations keep their scale)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if ("norm" in name or "ln_" in name or "layernorm" in name) and name.endswith(".weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            a = std * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def write_safetensors(tensors: dict, path: Path, dtype: str = "F32") -> None:
    """Write with the safetensors library (numpy API); dtype F32 | F16 | BF16."""
    from safetensors.numpy import save_file

    if dtype == "F32":
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    elif dtype == "F16":
        save_file({k: np.ascontiguousarray(v, np.float16) for k, v in tensors.items()}, str(path))
    elif dtype == "BF16":
        # numpy has no bfloat16: write uint16 bits with the library, then relabel them BF16 in
        # the header (same byte length, so offsets stay valid).
        save_file({k: _f32_to_bf16_bits(v) for k, v in tensors.items()}, str(path))
        raw = Path(path).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for k, e in header.items():
            if k != "__metadata__":
                e["dtype"] = "BF16"
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-(len(h) + 8) % 8)          # data offsets are relative to the data start
        Path(path).write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    else:
        raise ValueError(dtype)


TOKENIZER_DIR = {"gpt2": "gpt2", "llama2-32k": "llama2-32k"}


def write_checkpoint(folder: Path, config: dict, tokenizer: str | None = "gpt2", dtype: str = "F32",
                     shards: int = 1, gpt2_prefix: bool = True, std: float = 0.2, seed: int = 0,
                     tensors: dict | None = None) -> Path:
    """Write a random HF checkpoint into `folder` (see make_checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tensors is None:
        tensors = random_tensors(hf_tensor_shapes(config, gpt2_prefix), std=std, seed=seed)
    if shards <= 1:
        write_safetensors(tensors, folder / "model.safetensors", dtype)
    else:
        names = list(tensors)
        parts = np.array_split(np.arange(len(names)), shards)
        wm = {}
        for k, idx in enumerate(parts):
            fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors({names[j]: tensors[names[j]] for j in idx}, folder / fn, dtype)
            wm.update({names[j]: fn for j in idx})
        total = sum(int(np.asarray(t).nbytes) for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    if tokenizer is not None:
        src = shared_path("tokenizers", TOKENIZER_DIR[tokenizer])
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            if (src / fn).exists():
                shutil.copyfile(src / fn, folder / fn)
    return folder


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(config, tokenizer="gpt2", dtype="F32", shards=1, gpt2_prefix=True,
    std=0.2, seed=0, name="ckpt", tensors=None) -> folder under tmp_path.

    Writes config.json (HF spelling, as given), random weights (or `tensors`, a dict of f32
    arrays) as model.safetensors or `shards` files + model.safetensors.index.json, and copies
    tokenizer.json (+ tokenizer_config.json) from ../shared/tokenizers/<tokenizer> (skips the
    test when ../shared is absent; tokenizer=None writes no tokenizer).
    """
    def make(config: dict, name: str = "ckpt", **kw) -> Path:
        return write_checkpoint(tmp_path / name, config, **kw)

    return make


# ---- random checkpoints against the float64 reference, and the reference against transformers ---
HAVE_HF = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers + torch not installed (the cross-check of the "
                                                  "numpy reference on random checkpoints runs on dev machines)")


def check_greedy(tokens, ref, prompt, rel: float = 1e-3) -> None:
    """Each of `tokens` is the reference's greedy choice after `prompt`, teacher forced through
    the reference's incremental cache (which follows transformers' generate); a near tie (gap <=
    rel * logit range) is accepted."""
    cache = ref.new_cache()
    lg = ref.forward(prompt, cache)[-1]
    for i, t in enumerate(tokens):
        best = int(np.argmax(lg))
        rng = float(lg.max() - lg.min())
        assert t == best or lg[best] - lg[t] <= rel * rng, (
            f"step {i}: got token {t}, reference argmax {best} (gap {lg[best] - lg[t]:.3g}, "
            f"logit range {rng:.3g}); tokens {tokens}")
        lg = ref.forward([t], cache)[-1]


def check_against_reference(folder, ids, n_ctx: int, n_new: int = 16, **load_kw) -> None:
    """minilm.load(folder, n_ctx, **load_kw): logits of `ids` within 1e-3 of the logit range of
    the float64 reference (tests/reference_model.py), and `n_new` greedy tokens that are the
    reference's greedy choices (check_greedy)."""
    import minilm

    from reference_model import RefModel

    model = minilm.load(str(folder), n_ctx=n_ctx, **load_kw)
    ref = RefModel(folder)
    got, want = model.logits(ids), ref.logits(ids)
    V = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    assert got.shape == want.shape == (len(ids), V)
    rng = float(want.max() - want.min())
    assert rng > 1.0, "random model too flat to be a useful test"
    err = float(np.abs(got - want).max())
    assert err <= 1e-3 * rng, f"{folder}: max |logits - reference| = {err:.3g}, logit range {rng:.3g}"
    toks = model.generate_ids(ids, n_new, ignore_eos=True)
    assert len(toks) == n_new
    check_greedy(toks, ref, ids)


def check_reference_against_transformers(folder, ids, n_new: int = 16) -> None:
    """The reference's logits of `ids` within 1e-4 of the range of transformers' (eager
    attention, float32), and transformers' greedy generate (its own KV cache: what dynamic RoPE
    and LongRoPE depend on) the reference's greedy choices. Needs torch + transformers (needs_hf)."""
    import torch
    import transformers

    from reference_model import RefModel

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)           # torch's threads and Numba's would fight over 2 cores
    ref = RefModel(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].double().numpy()
    got = ref.logits(ids)
    rng = float(want.max() - want.min())
    err = float(np.abs(got - want).max())
    assert err <= 1e-4 * rng, f"{folder}: reference vs transformers max err {err:.3g}, range {rng:.3g}"
    hf.generation_config.eos_token_id = None      # ignore_eos (min_new_tokens would mask EOS)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(ids) + n_new
    check_greedy([int(t) for t in out[0, len(ids):]], ref, ids)


def check_decode_equals_prefill(m) -> None:
    """Eight tokens decoded one at a time (the executor with M = 1) after a 9-token prefill get
    the final hidden states they get inside one 17-token prefill (M > 1), bit for bit: every
    format's prefill runs each token with its decode arithmetic (the row kernels of the quantized
    formats, the gemv's order of sums for the float ones)."""
    net = m.net
    prompt, toks = [3, 17, 29, 5, 88, 41, 7, 12, 60], [9, 100, 4, 31, 2, 77, 15, 8]
    net.cache.reset()
    net.forward(np.array(prompt))
    dec = np.concatenate([net.forward(np.array([t])).copy() for t in toks])     # [8, D]
    assert net.cache.pos == 17 and net.cache.tokens[-1] == 8
    net.cache.reset()
    full = net.forward(np.array(prompt + toks))[len(prompt):].copy()            # [8, D]
    np.testing.assert_array_equal(dec, full)


# ---- a live `minilm serve` for the server tests ------------------------------------------------
# ---- ggml blocks (kernels/ggml_quants.py) ------------------------------------------------------
# byte offsets of the fp16 scale fields in each block (random bytes get sane values there)
FP16_FIELDS = {"Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}


def random_raw(spec, N, K, rng):
    """Random block bytes of a ggml format (spec: ggml_quants.TypeSpec) with finite, moderate
    fp16 scales."""
    raw = rng.integers(0, 256, (N, spec.row_bytes(K)), dtype=np.uint8)
    bl = raw.reshape(-1, spec.type_size)
    for o in FP16_FIELDS[spec.name]:
        v = rng.uniform(-0.05, 0.05, bl.shape[0]).astype(np.float16)
        bl[:, o:o + 2] = np.ascontiguousarray(v).view(np.uint8).reshape(-1, 2)
    return raw


def dot_tol(spec, raw, x):
    """Float32 rounding bound for a ggml kernel vs spec.dot_ref (same integer sums, other float
    order)."""
    K = x.shape[0]
    return 1e-5 * (np.abs(spec.dequantize_ref(raw, K)) @ np.abs(x)) + 1e-6


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m minilm.server -m PATH` on a free loopback port, returned once /health answers
    (or RuntimeError with the server's log after `wait_s`)."""

    def __init__(self, path, extra_args=(), wait_s: float = 90):
        import subprocess
        import sys
        import tempfile
        import time

        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "minilm.server", "-m", str(path), "--port", str(self.port),
               "--threads", "1", "--log-level", "warning", *extra_args]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + wait_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up in {wait_s:.0f} s: {self.logs()}")
            time.sleep(0.1)

    def logs(self):
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self):
        import subprocess
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class LiveServer(ServerProcess):
    """`python -m minilm.server -m ../shared/models/NAME [--ctx CTX]` with an openai client."""

    def __init__(self, name, ctx=None):
        import openai
        path = shared_path("models", name)
        super().__init__(path, ["--ctx", str(ctx)] if ctx else [], wait_s=90)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def post(self, path, body):
        import httpx
        return httpx.post(self.url + path, json=body, timeout=120)

    def healthy(self) -> bool:
        import httpx
        return httpx.get(self.url + "/health", timeout=10).json()["status"] == "ok"


def live_server(name, ctx=None) -> LiveServer:
    """A LiveServer (the caller stops it), or skip the test when the server extra is missing."""
    for mod in ("fastapi", "uvicorn", "openai", "httpx"):
        pytest.importorskip(mod, reason=f"{mod} not installed (pip install 'minilm[test]')")
    return LiveServer(name, ctx)


@pytest.fixture(scope="session")
def live_servers():
    """live_servers(name, ctx=None) -> a LiveServer started once per session per (name, ctx) and
    stopped at its end (test_constrain and test_embed share one). Tests that use it leave the
    server as they found it (requests only; nothing that stops or reconfigures it)."""
    servers = {}

    def get(name, ctx=None):
        if (name, ctx) not in servers:
            servers[name, ctx] = live_server(name, ctx)
        return servers[name, ctx]

    yield get
    for s in servers.values():
        s.stop()
