"""Per-token cost of the grammar mask (minilm/constrain.py, llguidance) against decode time per token.

    python benchmarks/bench_constrain.py [--quant int4] [--tokens 96] [--rounds 5] [--threads 2]

Builds (in a temp folder, or --work DIR) a SmolLM2-135M-shaped random checkpoint whose tokenizer is
a real 49152-token byte-level BPE: the GPT-2 tokenizer of ../shared/tokenizers/gpt2 cut to its
first 49149 tokens (merges whose parts or result fall outside are dropped) plus SmolLM2's three
special tokens <|endoftext|>, <|im_start|>, <|im_end|> at ids 0-2, so the vocabulary, its id
range and the mask width are SmolLM2's. Then, per round:
  - decode: `--tokens` unconstrained greedy tokens (EOS ignored) -> ms per token (decode + sampling);
  - constrained: the same number of tokens under a realistic JSON schema (an order record with
    nested objects, arrays, enums, bounded numbers, free strings), sampled (temperature 1) so the
    grammar is exercised in strings, numbers and structure; the time inside the constraint
    (`ConstraintState.mask` + `advance`: computing the token bitmask, applying it to the logits,
    consuming the token) is summed and divided by the tokens it produced.
Prints the medians over rounds and mask / decode in percent; `--json` writes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
VOCAB = 49152
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string", "format": "email"},
            "tier": {"enum": ["free", "pro", "enterprise"]}},
            "required": ["name", "email", "tier"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "price": {"type": "number", "minimum": 0, "maximum": 10000}},
            "required": ["sku", "quantity", "price"]}},
        "paid": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "paid"],
}


def make_tokenizer(out: Path) -> None:
    """A 49152-token byte-level BPE (SmolLM2's size and special ids) from the GPT-2 tokenizer."""
    t = json.loads((GPT2 / "tokenizer.json").read_text())
    m = t["model"]
    keep = [tok for tok, _ in sorted(m["vocab"].items(), key=lambda kv: kv[1])][:VOCAB - len(SPECIALS)]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({tok: i + len(SPECIALS) for i, tok in enumerate(keep)})
    merges = [mg for mg in m["merges"]
              if (a := mg[0] if isinstance(mg, list) else mg.split(" ")[0]) in vocab
              and (b := mg[1] if isinstance(mg, list) else mg.split(" ")[1]) in vocab and a + b in vocab]
    m["vocab"], m["merges"] = vocab, merges
    t["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(t))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "add_prefix_space": False}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the tokenizer and checkpoint (kept)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="minilm-constrain-"))
    tok_dir, ckpt = work / "tokenizer", work / "smollm2-135m"
    if not (ckpt / "config.json").exists():
        make_tokenizer(tok_dir)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), "--shape",
                        "smollm2-135m", "--tokenizer", str(tok_dir), "--out", str(ckpt), "--dtype", "bf16"],
                       check=True)
    import minilm
    from minilm.constrain import ConstraintState, compile_constraint
    from minilm.generate import generate_tokens
    from minilm.sampling import Sampler

    model = minilm.load(str(ckpt), quant=a.quant, threads=a.threads)
    assert model.tokenizer.vocab_size == model.config.vocab_size == VOCAB
    prompt = model.tokenizer.encode("Write the order as JSON: ")
    t0 = time.perf_counter()
    c = compile_constraint(model, json_schema=SCHEMA, max_tokens=a.tokens)
    compile_s = time.perf_counter() - t0

    # time inside the constraint, wrapped around the real methods
    spent = [0.0, 0]
    mask0, adv0 = ConstraintState.mask, ConstraintState.advance

    def mask(self, logits):
        t = time.perf_counter()
        r = mask0(self, logits)
        spent[0] += time.perf_counter() - t
        return r

    def advance(self, tok):
        t = time.perf_counter()
        adv0(self, tok)
        spent[0] += time.perf_counter() - t
        spent[1] += 1
    ConstraintState.mask, ConstraintState.advance = mask, advance

    decode_ms, mask_ms, produced = [], [], []
    list(generate_tokens(model, prompt, 8, Sampler(VOCAB), (), True))          # warm-up
    for r in range(a.rounds):
        model.reset()
        t = time.perf_counter()
        n = len(list(generate_tokens(model, prompt, a.tokens, Sampler(VOCAB), (), True)))
        decode_ms.append((time.perf_counter() - t) * 1e3 / n)
        model.reset()
        spent[:] = [0.0, 0]
        st = c.start()
        toks = list(generate_tokens(model, prompt, a.tokens, Sampler(VOCAB, temperature=1.0, seed=r),
                                    model.eos_token_ids, False, st))
        mask_ms.append(spent[0] * 1e3 / max(spent[1], 1))
        produced.append(len(toks))
        if r == 0:
            print("sample constrained output:", model.tokenizer.decode(toks)[:300])
    ConstraintState.mask, ConstraintState.advance = mask0, adv0

    import llguidance
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu": _cpu_name(), "threads": a.threads, "quant": a.quant, "vocab": VOCAB,
           "llguidance": llguidance.__version__ if hasattr(llguidance, "__version__") else "?",
           "rounds": a.rounds, "tokens": a.tokens, "compile_s": round(compile_s, 3),
           "decode_ms_per_token": round(statistics.median(decode_ms), 3),
           "mask_ms_per_token": round(statistics.median(mask_ms), 3),
           "mask_pct_of_decode": round(100 * statistics.median(mask_ms) / statistics.median(decode_ms), 1),
           "constrained_tokens": produced, "decode_rounds_ms": [round(x, 3) for x in decode_ms],
           "mask_rounds_ms": [round(x, 3) for x in mask_ms]}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
