"""Hugging Face transformers (PyTorch, CPU) peer benchmark.

Measures what the reference implementation does on the same checkpoint, so
minilm's numbers have something to be compared with:

    python benchmarks/bench_transformers.py --model /tmp/ckpt/smollm2-135m \
        [--threads 2] [--prompt-tokens 128] [--new-tokens 64] [--dtype fp32] \
        [--runs 3] [--json out.json]

Each run: prefill of a random prompt of --prompt-tokens ids (one forward pass
that fills the KV cache), then greedy decode of --new-tokens tokens, one
forward pass per token, feeding back past_key_values (a manual loop rather than
model.generate, so the decode time is just the model's forward passes plus
argmax). Reported: prefill tok/s = prompt_tokens / prefill_time and decode
tok/s = new_tokens / decode_time, medians over --runs runs after one warm-up.

Needs torch + transformers; if missing, prints how to install them and exits 2.
Install torch as the CPU wheel with this exact pin (a plain `pip install torch`
pulls GBs of CUDA packages):
    pip install torch==2.13.0 transformers
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

INSTALL_HINT = ("pip install torch==2.13.0   # exact pin: gets the CPU wheel, "
                "not the CUDA build\npip install transformers")


def main(argv=None):
    ap = argparse.ArgumentParser(description="transformers CPU prefill/decode benchmark")
    ap.add_argument("--model", required=True, help="HF checkpoint folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write results to this JSON file")
    args = ap.parse_args(argv)

    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        print(f"error: {e}\ntorch and transformers are needed; install them with:\n"
              f"{INSTALL_HINT}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    # Load the model (no tokenizer: the prompt is random token ids).
    config = AutoConfig.from_pretrained(args.model)
    total_len = args.prompt_tokens + args.new_tokens
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and total_len > max_pos:
        print(f"warning: {total_len} tokens > max_position_embeddings {max_pos}",
              file=sys.stderr)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    # Random prompt; avoid ids 0..2 (unk/bos/eos) for tidiness.
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_tokens), generator=gen)

    def one_run():
        """Return (prefill_seconds, decode_seconds, generated ids)."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            next_id = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            ids = []
            for _ in range(args.new_tokens):
                out = model(input_ids=next_id, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_id = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                ids.append(int(next_id))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ids

    one_run()  # warm-up
    prefill_s, decode_s = [], []
    for _ in range(max(1, args.runs)):
        p, d, ids = one_run()
        prefill_s.append(p)
        decode_s.append(d)

    res = {
        "engine": "transformers",
        "model": os.path.abspath(args.model),
        "params": n_params,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": len(prefill_s),
        "load_s": load_s,
        "prefill_s_median": statistics.median(prefill_s),
        "decode_s_median": statistics.median(decode_s),
        "prefill_tok_s": args.prompt_tokens / statistics.median(prefill_s),
        "decode_tok_s": args.new_tokens / statistics.median(decode_s),
        "prefill_tok_s_all": [args.prompt_tokens / t for t in prefill_s],
        "decode_tok_s_all": [args.new_tokens / t for t in decode_s],
        "first_generated_ids": ids[:8],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }

    rows = [
        ("model", res["model"]),
        ("params", f"{n_params / 1e6:.1f}M"),
        ("dtype / threads", f"{args.dtype} / {res['threads']}"),
        ("prompt / new tokens", f"{args.prompt_tokens} / {args.new_tokens}"),
        ("load time", f"{load_s:.2f} s"),
        ("prefill tok/s (median)", f"{res['prefill_tok_s']:.1f}"),
        ("decode tok/s (median)", f"{res['decode_tok_s']:.2f}"),
        ("torch / transformers", f"{torch.__version__} / {transformers.__version__}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
