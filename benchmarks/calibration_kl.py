"""Calibration against llama.cpp's own quantizer: mean KL against f32 and top-1 agreement of each
format made four ways, on evaluation text distinct from the calibration text.

    python benchmarks/calibration_kl.py [--models proxy-llama256-shakespeare,...] [--quants q4_0,...]
                                        [--llama-quantize PATH] [--out results.md]

  llama.cpp          llama-quantize's file of the f32 GGUF (minilm export), unweighted: its own
                     quantizers and mix rules (the issue's baseline)
  llama.cpp+imatrix  the same with minilm's imatrix written as llama.cpp's GGUF imatrix
                     (save_imatrix; llama-quantize --imatrix)
  minilm             minilm's unweighted quantization (ggml's reference quantizers)
  minilm calibrated  what `minilm.load(..., calibration=)` makes: the imatrix, and GPTQ error feedback
                     from the full input covariances where they fit (calibrate.GPTQ_MAX_BYTES)
Both minilm columns use the per-tensor types of llama.cpp's file (its ftype's rules: e.g. its Q4_0
has a Q4_0 token embedding and a Q6_K head, where minilm's q4_0 level keeps both Q8_0), so the
comparison is at the same bits; a fused q/k/v or gate/up matrix takes its widest part's type.

The GGUF files are run by minilm (its GGUF path agrees with llama.cpp on the same file:
tests/test_llamacpp_agree.py). Bits per weight: every matrix's bytes (embedding and head included)
over its weights, of each file. Calibration: Pride and Prejudice (chars 0-40000, up to 4096
tokens); evaluation: tinyshakespeare from char 500000, --eval-tokens tokens (default 2048) in
windows of the model's trained context (at most 512), each run from position 0 and scored per position
(stories260K: the second half of its TinyStories sample, calibration on the first). The KL
estimate's own noise: "ratio by quarter" is the calibrated / llama.cpp ratio on each of 4
interleaved quarters of the evaluation windows (min-max). Quantize s: CPU seconds of minilm's
quantization of the model, unweighted / calibrated (statistics collected once per model, not
included)."""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import minilm
from minilm.calibrate import collect_imatrix, save_imatrix
from minilm.config import Config
from minilm.gguf_io import export_gguf
from minilm.loader import quantize_loaded

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
QUANTIZE = Path.home() / ".cache" / "minilm" / "llama.cpp-0.3.36" / "build" / "bin" / "llama-quantize"
FTYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "iq4_nl": "IQ4_NL",
         "iq4_xs": "IQ4_XS", "q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M",
         "q6_k": "Q6_K"}


def kl_rows(ref, lg):
    """Per position: KL(softmax(ref) || softmax(lg)) and whether the top-1 tokens agree."""
    ref = np.asarray(ref, np.float64)
    lg = np.asarray(lg, np.float64)
    lp = ref - ref.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = lg - lg.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(1), lg.argmax(1) == ref.argmax(1)


def score(refs, model, windows):
    """(mean KL, top-1 agreement, KL per window) of `model` over the evaluation windows."""
    kl, top = zip(*(kl_rows(r, model.logits(w)) for r, w in zip(refs, windows)))
    return float(np.concatenate(kl).mean()), float(np.concatenate(top).mean()), np.array([k.mean() for k in kl])


def model_bits(m) -> float:
    mats = {id(t): t for t in m.tensors.values() if hasattr(t, "fmt")}.values()
    return sum(t.nbytes for t in mats) * 8 / sum(t.N * t.K for t in mats)


def gguf_bits(path: Path) -> float:
    from minilm.sources import open_gguf
    r = open_gguf(path)
    mats = [t for t in r.tensors if len(t.shape) == 2 and min(int(x) for x in t.shape) > 1]
    return sum(int(t.n_bytes) for t in mats) * 8 / sum(int(t.n_elements) for t in mats)


def gguf_formats(path: Path, cfg) -> dict:
    """{canonical matrix: minilm format} of a llama.cpp file (a fused matrix: its widest part)."""
    from minilm.imatrix_io import gguf_names
    from minilm.quant import FORMATS, GGML_TO_FMT
    from minilm.sources import open_gguf
    types = {t.name: GGML_TO_FMT[t.tensor_type.name] for t in open_gguf(path).tensors}
    out = {}
    for canon, names in gguf_names(cfg, present=set(types)).items():
        got = [types[g] for g in names if g in types]
        if got:
            out[canon] = max(got, key=lambda f: FORMATS[f].bits())
    return out


def llama_quantize(exe: Path, src: Path, dst: Path, ftype: str, imatrix: Path | None = None) -> None:
    cmd = [str(exe)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(dst), ftype, "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="proxy-llama256-shakespeare,proxy-qwen2-shakespeare,stories260K")
    ap.add_argument("--quants", default=",".join(FTYPE))
    ap.add_argument("--llama-quantize", default=str(QUANTIZE))
    ap.add_argument("--out", default=None, help="also append the table rows to this file")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="evaluation tokens (windows of the context)")
    a = ap.parse_args()
    exe = Path(a.llama_quantize)
    if not exe.is_file():
        raise SystemExit(f"{exe}: no llama-quantize (build it with benchmarks/build_llama_bench.sh)")
    calib = (SHARED / "texts" / "pride_and_prejudice_pg1342.txt").read_text()[:40000]
    evtxt = (SHARED / "texts" / "tinyshakespeare_input.txt").read_text()[500000:500000 + 8 * a.eval_tokens]
    head = ("| model | quant | bpw llama.cpp / minilm | KL llama.cpp | KL llama.cpp+imatrix | KL minilm | "
            "KL minilm calibrated | ratio calibrated / llama.cpp | ratio by quarter | "
            "top-1 % llama.cpp / +imatrix / minilm / calibrated | quantize s plain / calibrated |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    out = open(a.out, "a") if a.out else None
    if out:
        print(head, file=out, flush=True)
    work = Path(tempfile.mkdtemp(prefix="calkl-"))
    for name in a.models.split(","):
        folder = SHARED / "models" / name
        nctx = min(512, Config.from_hf(json.loads((folder / "config.json").read_text())).max_position_embeddings)
        f32 = minilm.load(folder, n_ctx=nctx)       # learned positions (GPT-2): at most the model's
        cal, ev = calib, evtxt
        if name == "stories260K":      # its own tokenizer and domain: TinyStories text
            t = (SHARED / "texts" / "tinystories_sample_cs336.txt").read_text()
            cal, ev = t[:len(t) // 2], t[len(t) // 2:]
        ids = f32.tokenizer.encode(ev)[:a.eval_tokens]
        T = min(512, f32.n_ctx, f32.config.max_position_embeddings)   # within the trained context
        wins = [ids[i:i + T] for i in range(0, len(ids) - 1, T)]
        refs = [f32.logits(w) for w in wins]
        print(f"({name}: {len(ids)} evaluation tokens in {len(wins)} windows of up to {T})", flush=True)
        t0 = time.time()
        im = collect_imatrix(f32, cal, max_tokens=4096)
        cov = collect_imatrix(f32, cal, max_tokens=4096, full=True)
        tc = time.time() - t0
        src = export_gguf(f32, work / f"{name}-f32.gguf", "f32", verbose=False)
        imf = save_imatrix(im, work / f"{name}-imatrix.gguf", cfg=f32.config, dataset="pride_and_prejudice[:40000]")
        for q in a.quants.split(","):
            res = []
            for imat in (None, imf):
                dst = work / f"{name}-{q}{'-im' if imat else ''}.gguf"
                llama_quantize(exe, src, dst, FTYPE[q], imat)
                if imat is None:
                    fmts = gguf_formats(dst, f32.config)
                res.append((gguf_bits(dst),) + score(refs, minilm.load(dst, n_ctx=nctx), wins))
                dst.unlink()
            tq = []
            for imat in (None, cov):       # the llama.cpp file's types (fused q/k/v, gate/up: the widest)
                t1 = time.process_time()
                m = quantize_loaded(f32, q, imat, n_ctx=nctx, formats=fmts)
                tq.append(time.process_time() - t1)
                res.append((model_bits(m),) + score(refs, m, wins))
            (b0, k0, a0, w0), (_, k1, a1, _), (b2, k2, a2, _), (_, k3, a3, w3) = res
            qr = [w3[i::4].mean() / w0[i::4].mean() for i in range(min(4, len(wins)))]   # every 4th window
            row = (f"| {name} | {q} | {b0:.2f} / {b2:.2f} | {k0:.2e} | {k1:.2e} | {k2:.2e} | {k3:.2e} | "
                   f"**{k3 / k0:.2f}** | {min(qr):.2f}-{max(qr):.2f} | "
                   f"{100 * a0:.1f} / {100 * a1:.1f} / {100 * a2:.1f} / {100 * a3:.1f} | {tq[0]:.1f} / {tq[1]:.1f} |")
            print(row, flush=True)
            if out:
                print(row, file=out, flush=True)
        print(f"(imatrix and covariances of {name}: {tc:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
