#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint of a real model's shape (Llama layout, or
Gemma 3 / Phi-3 layout for the gemma3-270m and phi4-mini-4l shapes).

Used for speed benchmarks only: the weights are random (N(0, 0.02), RMSNorm
weights 1.0), so the text they produce is garbage, but every matmul has the
real model's size, so tokens/s and memory use match the real model.

Usage:
    python scripts/make_random_checkpoint.py --shape smollm2-135m --out /tmp/ckpt/smollm2-135m
    python scripts/make_random_checkpoint.py --shape smollm2-360m --out /tmp/ckpt/smollm2-360m --dtype bf16
    python scripts/make_random_checkpoint.py --shape tinyllama-1.1b --out /tmp/ckpt/tinyllama-1.1b
    python scripts/make_random_checkpoint.py --shape stories15m --out /tmp/ckpt/stories15m --dtype bf16
    python scripts/make_random_checkpoint.py --shape gemma3-270m --out /tmp/ckpt/gemma3-270m
    python scripts/make_random_checkpoint.py --shape phi4-mini-4l --out /tmp/ckpt/phi4-mini-4l

Output folder:
    config.json                LlamaForCausalLM, the real hyper-parameters
    generation_config.json     bos/eos ids
    model.safetensors          if the whole model fits in one shard (<= 1 GB), else
    model-0000K-of-0000N.safetensors + model.safetensors.index.json (weight_map)
    tokenizer.json, tokenizer_config.json   copied from --tokenizer

Tokenizer note: by default the tokenizer comes from <repo>/../shared/tokenizers:
llama2-32k for tinyllama-1.1b and stories15m (the right 32000-token vocab), gpt2
for smollm2-135m. The GPT-2 vocab (50257) is NOT the model's 49152 vocab, so
SmolLM2-shaped checkpoints have a tokenizer whose ids do not match the embedding
table one-to-one; that is fine for speed benchmarks (feed token ids < 49152),
not for anything that checks text.

Only numpy is needed (no torch, not even the safetensors package): the
safetensors format is written by hand (8-byte little-endian header length, JSON
header, raw little-endian tensor bytes), one tensor at a time, so peak memory is
about one tensor (the largest is TinyLlama's 32000x2048 embedding, 262 MB f32).
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZERS = os.path.join(REPO_ROOT, "..", "shared", "tokenizers")

MAX_SHARD_BYTES = 999_000_000  # tensor data per shard; < 1e9 bytes with the header

# Real hyper-parameters of the models we imitate.
SHAPES = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, tokenizer="gpt2",
    ),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(
        hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, head_dim=64, intermediate_size=2560,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, tokenizer="gpt2",
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, head_dim=64, intermediate_size=5632,
        vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tokenizer="llama2-32k",
    ),
    # karpathy/llama2.c stories15M
    "stories15m": dict(
        hidden_size=288, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=6, head_dim=48, intermediate_size=768,
        vocab_size=32000, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tokenizer="llama2-32k",
    ),
    # google/gemma-3-270m: 5 sliding (512) + 1 global layer, 262k vocabulary, tied
    "gemma3-270m": dict(
        arch="gemma3", hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, intermediate_size=2048,
        vocab_size=262144, tie_word_embeddings=True, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, sliding_window=512, sliding_window_pattern=6,
        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, max_position_embeddings=32768,
        bos_token_id=2, eos_token_id=1, tokenizer="gpt2",
    ),
    # microsoft/Phi-4-mini-instruct's layer shapes at 4 layers (of 32), so it fits a small machine:
    # fused qkv_proj / gate_up_proj, partial rotary 0.75, LongRoPE, 200k vocabulary, tied
    "phi4-mini-4l": dict(
        arch="phi3", hidden_size=3072, num_hidden_layers=4, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        vocab_size=200064, tie_word_embeddings=True, rope_theta=10000.0,
        partial_rotary_factor=0.75, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                      "long_factor": [1.0 + 0.5 * i for i in range(48)]},
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        bos_token_id=199999, eos_token_id=199999, tokenizer="gpt2",
    ),
}
# architecture -> (architectures, model_type) of config.json
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
         "phi3": ("Phi3ForCausalLM", "phi3")}

# dtype name -> (safetensors dtype string, torch_dtype string for config.json, bytes per element)
DTYPES = {
    "f32": ("F32", "float32", 4),
    "bf16": ("BF16", "bfloat16", 2),
    "f16": ("F16", "float16", 2),
}


def tensor_plan(s):
    """List of (name, shape, kind) in HF order; kind is 'normal' or 'ones'."""
    h, inter, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    nq, nkv = s["num_attention_heads"], s["num_key_value_heads"]
    arch = s.get("arch", "llama")
    plan = [("model.embed_tokens.weight", (s["vocab_size"], h), "normal")]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if arch == "phi3":
            plan += [
                (p + "input_layernorm.weight", (h,), "ones"),
                (p + "self_attn.qkv_proj.weight", ((nq + 2 * nkv) * hd, h), "normal"),
                (p + "self_attn.o_proj.weight", (h, nq * hd), "normal"),
                (p + "post_attention_layernorm.weight", (h,), "ones"),
                (p + "mlp.gate_up_proj.weight", (2 * inter, h), "normal"),
                (p + "mlp.down_proj.weight", (h, inter), "normal"),
            ]
            continue
        if arch == "gemma3":          # (1 + w) norms: w = 0 is the identity scale
            plan += [
                (p + "self_attn.q_norm.weight", (hd,), "zeros"),
                (p + "self_attn.k_norm.weight", (hd,), "zeros"),
                (p + "pre_feedforward_layernorm.weight", (h,), "zeros"),
                (p + "post_feedforward_layernorm.weight", (h,), "zeros"),
            ]
        plan += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (nq * hd, h), "normal"),
            (p + "self_attn.k_proj.weight", (nkv * hd, h), "normal"),
            (p + "self_attn.v_proj.weight", (nkv * hd, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, nq * hd), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
        ]
    if arch == "gemma3":
        plan = [(n, shape, "zeros" if kind == "ones" else kind) for n, shape, kind in plan]
    plan.append(("model.norm.weight", (h,), "zeros" if arch == "gemma3" else "ones"))
    if not s["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (s["vocab_size"], h), "normal"))
    return plan


def make_tensor(rng, shape, kind, dtype):
    """Generate one tensor as raw little-endian bytes in the requested dtype."""
    if kind == "ones":
        x = np.ones(shape, dtype=np.float32)
    elif kind == "zeros":
        x = np.zeros(shape, dtype=np.float32)
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(0.02)
    if dtype == "f32":
        return x.astype("<f4", copy=False).tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    # bf16: numpy has no bfloat16, so round-to-nearest-even on the float32 bits
    # and keep the upper 16 bits.
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype("<u2").tobytes()


def split_shards(plan, elem_bytes):
    """Greedily group consecutive tensors into shards of <= MAX_SHARD_BYTES."""
    shards, cur, cur_bytes = [], [], 0
    for name, shape, kind in plan:
        nbytes = int(np.prod(shape)) * elem_bytes
        if cur and cur_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, kind))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_shard(path, tensors, rng, dtype):
    """Write one safetensors file, generating and writing tensors one at a time."""
    st_dtype, _, elem = DTYPES[dtype]
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * elem
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # pad so tensor data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape, kind in tensors:
            f.write(make_tensor(rng, shape, kind, dtype))
    return 8 + len(hbytes) + offset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None,
                    help="folder holding tokenizer.json + tokenizer_config.json "
                         "(default: ../shared/tokenizers/{gpt2|llama2-32k})")
    args = ap.parse_args(argv)

    t0 = time.time()
    s = dict(SHAPES[args.shape])
    default_tok = s.pop("tokenizer")  # not a config key
    arch_name, model_type = ARCHS[s.get("arch", "llama")]
    tok_dir = args.tokenizer or os.path.join(SHARED_TOKENIZERS, default_tok)
    st_dtype, torch_dtype, elem = DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    total = 0

    # config.json: the architecture's config (a plain LlamaForCausalLM one by default).
    config = {
        "architectures": [arch_name],
        "model_type": model_type,
        **{k: v for k, v in s.items() if k != "arch"},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "rope_scaling": s.get("rope_scaling"),
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    gen_config = {"bos_token_id": s["bos_token_id"], "eos_token_id": s["eos_token_id"],
                  "do_sample": False}
    for fname, obj in (("config.json", config), ("generation_config.json", gen_config)):
        data = (json.dumps(obj, indent=2) + "\n").encode()
        with open(os.path.join(args.out, fname), "wb") as f:
            f.write(data)
        total += len(data)

    # Weights, shard by shard.
    rng = np.random.default_rng(args.seed)
    plan = tensor_plan(s)
    shards = split_shards(plan, elem)
    n_params = sum(int(np.prod(shape)) for _, shape, _ in plan)
    if len(shards) == 1:
        total += write_shard(os.path.join(args.out, "model.safetensors"), shards[0], rng, args.dtype)
    else:
        weight_map = {}
        for k, tensors in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += write_shard(os.path.join(args.out, fname), tensors, rng, args.dtype)
            weight_map.update({name: fname for name, _, _ in tensors})
            print(f"  wrote {fname} ({len(tensors)} tensors)", flush=True)
        index = {"metadata": {"total_size": n_params * elem}, "weight_map": weight_map}
        data = (json.dumps(index, indent=2) + "\n").encode()
        with open(os.path.join(args.out, "model.safetensors.index.json"), "wb") as f:
            f.write(data)
        total += len(data)

    # Tokenizer files (copyfile: the shared copies are read-only, ours need not be).
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(tok_dir, fname)
        if not os.path.exists(src):
            print(f"error: tokenizer file not found: {src}", file=sys.stderr)
            return 1
        shutil.copyfile(src, os.path.join(args.out, fname))
        total += os.path.getsize(src)

    print(f"{args.shape} ({n_params / 1e6:.1f}M params, {args.dtype}, {len(shards)} shard(s)) "
          f"-> {args.out}")
    print(f"total bytes written: {total} ({total / 1e9:.3f} GB) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
