"""The report of a `minilm bench` run: the table (text and markdown), the side-by-side ratios
against llama.cpp, results.json / results.md, and the quality-vs-speed plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("engine", "engine", "{}"), ("quant", "quant", "{}"), ("kv_quant", "KV", "{}"), ("kv_cache_mb", "KV MB", "{:.1f}"),
    ("file_mb", "file MB", "{:.2f}"),
    ("bits_per_weight", "bits/w", "{:.2f}"), ("load_s", "load s", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("start_to_first_token_s", "start->1st s", "{:.2f}"),
    ("prefill", "prefill tok/s (min-max)", None), ("decode", "decode tok/s (min-max)", None),
    ("decode_gb_s", "GB/s", "{:.2f}"), ("pct_of_bw", "% of bw", "{:.0f}"),
    ("spec_accept_pct", "spec accept %", "{:.0f}"), ("spec_x_grounded", "spec x grounded", "{:.2f}"),
    ("spec_x_free", "spec x free", "{:.2f}"),
    ("ppl", "PPL", "{:.3f}"), ("kl_mean", "KL mean", "{:.4g}"), ("top1_agree_pct", "top-1 %", "{:.1f}"),
    ("version", "version", "{}"), ("config", "configuration that ran", "{}"), ("note", "note", "{}"),
]
OPTIONAL = ("version", "config", "note")        # columns left out when every row is empty there


def derive(r: dict, bw: float) -> dict:
    """Columns computed from a row and the machine's read bandwidth."""
    if r.get("file_bytes"):
        r["file_mb"] = r["file_bytes"] / 1e6
    if r.get("ttft_s") is not None:
        r["ttft_ms"] = 1000 * r["ttft_s"]
    if r.get("decode_gb_s") and bw and r.get("bytes_per_token"):
        r["pct_of_bw"] = 100 * r["decode_gb_s"] / bw
        r["ceiling_tok_s"] = bw * 1e9 / r["bytes_per_token"]
    return r


def _fmt_range(r, key):
    if r.get(f"{key}_tok_s") is None:
        return ""
    v, lo, hi = r[f"{key}_tok_s"], r[f"{key}_min"], r[f"{key}_max"]
    p = 1 if v >= 10 else 2
    return f"{v:.{p}f} ({lo:.{p}f}-{hi:.{p}f})"


def cells(r: dict) -> list[str]:
    out = []
    for key, _, f in COLUMNS:
        if key in ("prefill", "decode"):
            out.append(_fmt_range(r, key))
            continue
        v = r.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            out.append("")
        else:
            out.append(f.format(v))
    return out


def render_table(rows, markdown=False) -> str:
    heads = [h for _, h, _ in COLUMNS]
    keys = [k for k, _, _ in COLUMNS]
    body = [cells(r) for r in rows]
    keep = [i for i in range(len(heads)) if keys[i] not in OPTIONAL or any(b[i] for b in body)]
    heads = [heads[i] for i in keep]
    body = [[b[i] for i in keep] for b in body]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        return "\n".join(lines)
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    w = [min(x, 60) for x in w]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(heads))]
    lines += ["  ".join(b[i].ljust(w[i]) for i in range(len(heads))) for b in body]
    return "\n".join(lines)


def side_by_side(rows) -> list[dict]:
    """minilm level vs the llama.cpp row of the same GGUF type: medians and minilm / llama.cpp."""
    from .common import gguf_type
    peer = {r["quant"]: r for r in rows if r["engine"] == "llama.cpp" and r.get("decode_tok_s")}
    out = []
    for r in rows:
        if r["engine"] != "minilm" or not r.get("decode_tok_s"):
            continue
        try:
            t = gguf_type(r["quant"])
        except ValueError:
            t = None
        p = peer.get(t)
        if p is None:
            continue
        out.append({"minilm": r["quant"], "llama.cpp": t,
                    "decode": (r["decode_tok_s"], p["decode_tok_s"], r["decode_tok_s"] / p["decode_tok_s"]),
                    "prefill": (r["prefill_tok_s"], p["prefill_tok_s"], r["prefill_tok_s"] / p["prefill_tok_s"]),
                    "gb_s": (r.get("decode_gb_s"), p.get("decode_gb_s"))})
    return out


def render_side_by_side(pairs) -> str:
    if not pairs:
        return ""
    f = lambda v: "" if v is None else f"{v:.1f}"   # noqa: E731
    lines = ["| minilm | llama.cpp | decode tok/s minilm / llama.cpp | ratio | prefill tok/s minilm / llama.cpp "
             "| ratio | decode GB/s minilm / llama.cpp |", "|---|---|---|---|---|---|---|"]
    for p in pairs:
        d, pf, g = p["decode"], p["prefill"], p["gb_s"]
        lines.append(f"| {p['minilm']} | {p['llama.cpp']} | {d[0]:.1f} / {d[1]:.1f} | {d[2]:.2f}x | "
                     f"{pf[0]:.1f} / {pf[1]:.1f} | {pf[2]:.2f}x | {f(g[0])} / {f(g[1])} |")
    return "\n".join(lines)


def write_json(out: Path, meta: dict, rows: list[dict]) -> Path:
    p = out / "results.json"
    p.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return p


def write_markdown(out: Path, meta: dict, rows: list[dict], interrupted: bool) -> Path:
    m = meta
    md = [f"### minilm bench: {m['model']}", "",
          f"{m['date']}, CPU {m['cpu']} ({m['cpu_count']} logical), {m['threads']} threads, "
          f"read bandwidth {m['bandwidth']['read_gbs']:.1f} GB/s; prompt {m['prompt_tokens']} tokens, "
          f"{m['new_tokens']} decode steps, median of {m['runs']} runs (min-max); quality vs f32 over "
          f"{m['quality_positions']} positions of {m['text']}, windows of {m['ctx']}."
          + (" **Interrupted: partial.**" if interrupted else ""), "",
          render_table(rows, markdown=True), ""]
    sbs = render_side_by_side(side_by_side(rows))
    if sbs:
        md += ["Side by side (ratio = minilm / llama.cpp, medians):", "", sbs, ""]
    md += [f"note: {n}" for n in m.get("notes", [])]
    p = out / "results.md"
    p.write_text("\n".join(md) + "\n")
    return p


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    use_kl = any(r.get("kl_mean") is not None and math.isfinite(r["kl_mean"]) for r in rows)
    ykey, ylabel = ("kl_mean", "mean KL vs f32 (nats/token)") if use_kl else ("ppl", "perplexity")
    if not any(r.get(ykey) is not None for r in rows):
        ykey, ylabel = "prefill_tok_s", "prefill tokens/s (median)"   # no quality columns: speed vs speed
        use_kl = False
    pairs = side_by_side(rows)
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(18 if pairs else 12, 4.8))
    if pairs:
        _speed_bars(axes[2], rows, pairs)
    markers = {"minilm": ("o", "C0"), "llama.cpp": ("s", "C1"), "transformers": ("^", "C2")}
    ys = [r[ykey] for r in rows if r.get(ykey) is not None and math.isfinite(r[ykey])]
    for ax, (xkey, xlabel) in zip(axes[:2], [("decode_tok_s", "decode tokens/s (median)"),
                                             ("bits_per_weight", "bits per weight (file)")]):
        seen = set()
        for r in rows:
            x, y = r.get(xkey), r.get(ykey)
            if x is None or y is None or not math.isfinite(y):
                continue
            m, c = markers.get(r["engine"], ("x", "k"))
            y = max(y, 0.0) if use_kl else y        # a -1e-9 KL is rounding
            ax.scatter([x], [y], marker=m, color=c, s=60, label=None if r["engine"] in seen else r["engine"])
            seen.add(r["engine"])
            off = {"minilm": (5, 5), "llama.cpp": (5, -12), "transformers": (-30, 8)}.get(r["engine"], (5, 5))
            lab = r["quant"] + (f" kv {r['kv_quant']}" if r.get("kv_quant", "f16") != "f16" else "")
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=off, fontsize=8, color=c)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if use_kl and ys:
            pos = [y for y in ys if y > 0]
            ax.set_yscale("symlog", linthresh=(min(pos) / 2) if pos else 1e-6)
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_bars(ax, rows, pairs) -> None:
    """Decode and prefill medians (min-max whiskers) of each minilm level beside its llama.cpp row."""
    by = {(r["engine"], r["quant"]): r for r in rows}
    labels, xs = [], []
    for i, p in enumerate(pairs):
        for j, (eng, q, color) in enumerate((("minilm", p["minilm"], "C0"), ("llama.cpp", p["llama.cpp"], "C1"))):
            r = by[(eng, q)]
            for k, (key, hatch) in enumerate((("decode", ""), ("prefill", "//"))):
                x = i * 5 + k * 2 + j * 0.9
                v, lo, hi = r[f"{key}_tok_s"], r[f"{key}_min"], r[f"{key}_max"]
                ax.bar([x], [v], width=0.85, color=color, hatch=hatch, alpha=0.85,
                       yerr=[[v - lo], [hi - v]], capsize=3,
                       label=f"{eng} {key}" if i == 0 else None)
        labels.append(f"{p['minilm']} / {p['llama.cpp']}")
        xs.append(i * 5 + 1.45)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title("decode (plain) and prefill (hatched)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
