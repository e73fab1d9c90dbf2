"""Calibration (imatrix, and imatrix + GPTQ error feedback) against unweighted quantization: mean
KL against f32 and top-1 agreement at the same formats, on evaluation text distinct from the
calibration text.

    python benchmarks/calibration_kl.py [--models proxy-llama256-shakespeare,...] [--quants q4_0,...]

Calibration: Pride and Prejudice (chars 0-40000, up to 4096 tokens); evaluation: tinyshakespeare
chars 500000-502500 (tokens 0-512), scored per position."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import minilm
from minilm.calibrate import collect_imatrix
from minilm.loader import quantize_loaded

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def kl_top1(ref, lg):
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lq = lg - lg.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float((p * (np.log(p) - lq)).sum(1).mean()), float((lg.argmax(1) == ref.argmax(1)).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="proxy-llama256-shakespeare,proxy-qwen2-shakespeare,stories260K")
    ap.add_argument("--quants", default="q4_0,q4_k_m,iq4_nl,q3_k_m,q2_k")
    a = ap.parse_args()
    calib = (SHARED / "texts" / "pride_and_prejudice_pg1342.txt").read_text()[:40000]
    evtxt = (SHARED / "texts" / "tinyshakespeare_input.txt").read_text()[500000:502500]
    print("| model | quant | bits/weight | KL unweighted | KL imatrix (ratio) | KL imatrix+GPTQ (ratio) "
          "| top-1 % unw. / imatrix / +GPTQ |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        folder = SHARED / "models" / name
        f32 = minilm.load(folder, n_ctx=512)
        if name == "stories260K":      # its own tokenizer and domain: TinyStories text
            t = (SHARED / "texts" / "tinystories_sample_cs336.txt").read_text()
            calib, ev = t[:len(t) // 2], t[len(t) // 2:]
        else:
            ev = evtxt
        ids = f32.tokenizer.encode(ev)[:min(512, f32.n_ctx)]
        ref = f32.logits(ids)
        t0 = time.time()
        im = collect_imatrix(f32, calib, max_tokens=4096)
        cov = collect_imatrix(f32, calib, max_tokens=4096, full=True)
        tc = time.time() - t0
        for q in a.quants.split(","):
            res = []
            for imat in (None, im, cov):
                m = quantize_loaded(f32, q, imat, n_ctx=512)
                bits = sum(t.nbytes for k, t in m.tensors.items() if hasattr(t, "fmt")) * 8 / sum(
                    t.N * t.K for k, t in m.tensors.items() if hasattr(t, "fmt"))
                res.append((bits,) + kl_top1(ref, m.logits(ids)))
            (b, k0, a0), (_, k1, a1), (_, k2, a2) = res
            print(f"| {name} | {q} | {b:.2f} | {k0:.2e} | {k1:.2e} ({k1 / k0:.2f}) | {k2:.2e} ({k2 / k0:.2f}) "
                  f"| {100 * a0:.1f} / {100 * a1:.1f} / {100 * a2:.1f} |", flush=True)
        print(f"(imatrix of {name}: {tc:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
