"""Where a quantized model's KL against f32 comes from: the weights' rounding, or the int8
activation blocks the matmuls quantize their inputs to (ggml's Q8_0 / Q8_1 / Q8_K, which no
weight calibration changes), and which matrices' weights.

    python benchmarks/kl_sources.py [--model proxy-llama256-shakespeare] [--quants q8_0,q6_k,q5_k_m]
                                    [--eval-tokens 1024]

Llama-family models. The float64 forward of tests/reference_model.py is run with
  weights only   the quantized model's weights, dequantized; activations exact
  acts only      f32 weights; every matmul input quantized to the activation blocks its matrix's
                 format reads (what the engine and llama.cpp's CPU backend do), dequantized
  both           the two together (close to the engine's own KL, also printed)
and per matrix kind, the weights-only KL with only that kind quantized. Each format is made two
ways with llama.cpp's per-tensor types (those of llama-quantize's file of the model, else
minilm.mixes' rules; fused q/k/v, gate/up: the widest part):
unweighted (ggml's reference quantizers: llama.cpp's file) and calibrated (what
benchmarks/calibration_kl.py measures: imatrix + GPTQ, Pride and Prejudice chars 0-40000).
Evaluation: tinyshakespeare from char 500000, windows of the trained context (at most 512);
stories260K: the second half of the TinyStories sample (calibration on the first). A tied
embedding's two roles are measured apart: tok_embd its lookup, output its use as the lm head."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import minilm
from minilm.calibrate import collect_imatrix
from minilm.gguf_io import export_gguf
from minilm.kernels import ggml_quants as gq
from minilm.loader import quantize_loaded
from minilm.mixes import mix_formats
from minilm.quant import FORMATS, PRESETS, Linear
from minilm.sources import dequant

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
sys.path.insert(0, str(ROOT / "tests"))
from reference_model import RefModel  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_kl import FTYPE, QUANTIZE, gguf_formats, kl_rows, llama_quantize  # noqa: E402

KINDS = ("tok_embd", "output", "wqkv", "wo", "w_gate_up", "w_down")


def act_round_trip(x, kind):
    """Rows of x f64[T, K] through ggml's activation blocks of `kind` (q8_0 / q8_1 / q8_K), dequantized."""
    blk = 256 if kind == "q8_K" else 32
    K = x.shape[1]
    xp = np.zeros((x.shape[0], -(-K // blk) * blk))     # zero-padded to whole blocks, as the engine's Kp
    xp[:, :K] = x
    out = np.empty_like(xp)
    for t in range(x.shape[0]):
        q, d, _ = gq._ACT_REF[kind](xp[t].astype(np.float32))
        out[t] = (q.reshape(-1, blk).astype(np.float64) * d[:, None]).reshape(-1)
    return out[:, :K]


class Probe(RefModel):
    """The reference forward with some matrices replaced (HF names -> f64) and some matmul inputs
    quantized ({HF linear name: activation kind})."""

    def __init__(self, base: RefModel, mats: dict, acts: dict):
        self.__dict__.update(base.__dict__)
        w = dict(base.w)
        if "lm_head.weight" not in w:              # tied: the head role as its own matrix
            w["lm_head.weight"] = w["model.embed_tokens.weight"]
            self.cfg = {**base.cfg, "tie_word_embeddings": False}
        self.w = {**w, **mats}
        self.acts = acts

    def _lin(self, x, name, bias=True):
        kind = self.acts.get(name)
        return super()._lin(act_round_trip(x, kind) if kind else x, name, bias)


def hf_parts(ref: RefModel, name: str, a: np.ndarray) -> dict:
    """A canonical matrix (weights.py) -> {HF linear name: rows}, Llama layout."""
    if name == "tok_embd":      # tied: both roles (the lookup's and the head's, split by Probe)
        return {"model.embed_tokens": a} | ({} if "lm_head.weight" in ref.w else {"lm_head": a})
    if name == "output":
        return {"lm_head": a}
    i, kind = name[1:].split(".", 1)
    p = f"model.layers.{i}."
    if kind == "wqkv":
        q, k = ref.H * ref.hd, ref.Hkv * ref.hd
        return {p + "self_attn.q_proj": a[:q], p + "self_attn.k_proj": a[q:q + k], p + "self_attn.v_proj": a[q + k:]}
    if kind == "w_gate_up":
        F = a.shape[0] // 2
        return {p + "mlp.gate_proj": a[:F], p + "mlp.up_proj": a[F:]}
    return {p + {"wo": "self_attn.o_proj", "w_down": "mlp.down_proj"}[kind]: a}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="proxy-llama256-shakespeare")
    ap.add_argument("--quants", default="q8_0,q6_k,q5_k_m")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--llama-quantize", default=str(QUANTIZE), help="its files give the per-tensor types "
                    "(absent: minilm.mixes' rules for the presets, the level's format everywhere else)")
    a = ap.parse_args()
    folder = SHARED / "models" / a.model
    f32 = minilm.load(folder, n_ctx=512)
    ref = RefModel(folder)
    T = min(512, f32.n_ctx, f32.config.max_position_embeddings)
    calib = (SHARED / "texts" / "pride_and_prejudice_pg1342.txt").read_text()[:40000]
    ev = (SHARED / "texts" / "tinyshakespeare_input.txt").read_text()[500000:500000 + 8 * a.eval_tokens]
    if a.model == "stories260K":       # its own tokenizer and domain, as calibration_kl.py
        t = (SHARED / "texts" / "tinystories_sample_cs336.txt").read_text()
        calib, ev = t[:len(t) // 2], t[len(t) // 2:]
    ids = f32.tokenizer.encode(ev)
    wins = [ids[i:i + T] for i in range(0, min(len(ids), a.eval_tokens) - 1, T)]
    refs = [ref.logits(w) for w in wins]
    kl = lambda model: float(np.concatenate([kl_rows(r, model.logits(w))[0] for r, w in zip(refs, wins)]).mean())
    cov = collect_imatrix(f32, calib, max_tokens=4096, full=True)
    exe = Path(a.llama_quantize)
    work = Path(tempfile.mkdtemp(prefix="klsrc-"))
    src = export_gguf(f32, work / "f32.gguf", "f32", verbose=False) if exe.is_file() else None
    print(f"{a.model}: {sum(map(len, wins))} evaluation tokens; KL against the float64 reference"
          + (" (tied: tok_embd = its lookup role, output = its head role)" if "lm_head.weight" not in ref.w else "")
          + "\n")
    print("| quant | made | KL engine | KL both (f64) | KL weights only | KL acts only | "
          + " | ".join(f"weights only: {k}" for k in KINDS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(KINDS))
    for q in a.quants.split(","):
        if exe.is_file():           # the types of llama-quantize's own file, as calibration_kl.py
            dst = work / f"{q}.gguf"
            llama_quantize(exe, src, dst, FTYPE[q])
            fm = gguf_formats(dst, f32.config)
        else:
            fm = mix_formats(q, f32.config) if q in PRESETS else {n: q for n, t in f32.tensors.items() if isinstance(t, Linear)}
        for made, im in (("unweighted", None), ("calibrated", cov)):
            m = quantize_loaded(f32, q, im, n_ctx=512, formats=fm)
            mats, acts = {}, {}
            per_kind = {k: {} for k in KINDS}
            for name, t in m.tensors.items():
                if isinstance(t, Linear):
                    for hf, rows in hf_parts(ref, name, dequant(t).astype(np.float64)).items():
                        mats[hf + ".weight"] = rows
                        kind = "output" if hf == "lm_head" else name.split(".")[-1]
                        per_kind[kind][hf + ".weight"] = rows
                        if hf != "model.embed_tokens" and FORMATS[t.fmt].act in gq._ACT_REF:   # a lookup / float: exact input
                            acts[hf] = FORMATS[t.fmt].act
            row = [kl(m), kl(Probe(ref, mats, acts)), kl(Probe(ref, mats, {})), kl(Probe(ref, {}, acts))]
            row += [kl(Probe(ref, per_kind[k], {})) for k in KINDS]
            print(f"| {q} | {made} | " + " | ".join(f"{v:.2e}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
