"""The one timing loop every engine goes through where the engine lets us drive it token by token
(minilm, transformers, llama-cpp-python). llama.cpp's own `llama-bench` times itself; its samples
are summarised by `summarize` here, so every row's median and min-max mean the same thing.

A run: reset the engine, prefill the prompt and take the argmax of the last position (TTFT and
prefill tok/s = prompt tokens / that time), then `new_tokens` greedy decode steps (decode tok/s =
new_tokens / their time). Medians over the runs, with min and max."""
from __future__ import annotations

import statistics
import time
from typing import Protocol, Sequence

from .common import progress


class Steppable(Protocol):
    """What the timing loop needs from an engine adapter (see engines.py)."""

    def reset(self) -> None: ...
    def prefill(self, ids: list[int]) -> int: ...     # argmax of the last position's logits
    def decode(self, tok: int) -> int: ...            # argmax of the next logits


def summarize(samples: Sequence[float], key: str) -> dict:
    """{key}_tok_s (median), {key}_min, {key}_max of tokens/s samples."""
    if not samples:
        raise ValueError(f"no {key} samples to summarize")
    return {f"{key}_tok_s": float(statistics.median(samples)), f"{key}_min": float(min(samples)),
            f"{key}_max": float(max(samples)), f"{key}_samples": [float(x) for x in samples]}


def first_token(engine: Steppable, prompt_ids: list[int], t_start: float) -> float:
    """Prefill once (JIT compile / cache load happens here); seconds since t_start (wall clock of
    the parent when it started this process)."""
    engine.reset()
    engine.prefill(prompt_ids)
    return time.time() - t_start


def time_loop(engine: Steppable, prompt_ids: list[int], new_tokens: int, runs: int, desc: str = "speed") -> dict:
    """Run the prefill + greedy decode loop `runs` times; medians and min-max of tok/s, TTFT."""
    if runs < 1 or new_tokens < 1 or not prompt_ids:
        raise ValueError(f"time_loop: runs {runs}, new_tokens {new_tokens}, prompt of {len(prompt_ids)} "
                         "tokens: each must be >= 1")
    ttft, prefill, decode = [], [], []
    bar = progress(total=runs, desc=desc, unit="run")
    for _ in range(runs):
        engine.reset()
        t = time.perf_counter()
        tok = engine.prefill(prompt_ids)
        dt = time.perf_counter() - t
        ttft.append(dt)
        prefill.append(len(prompt_ids) / dt)
        t = time.perf_counter()
        for _ in range(new_tokens):
            tok = engine.decode(tok)
        decode.append(new_tokens / (time.perf_counter() - t))
        bar.update(1)
    bar.close()
    engine.reset()
    out = {"ttft_s": float(statistics.median(ttft)), "timing": "minilm bench loop (wall clock, greedy argmax)"}
    out.update(summarize(prefill, "prefill"))
    out.update(summarize(decode, "decode"))
    return out


def speculation(model, prompts: dict, new_tokens: int, runs: int) -> dict:
    """Prompt-lookup speculative decoding against plain decoding (minilm only): for each prompt
    (name -> ids; "grounded" continues a passage that is in the prompt, "free" does not), greedy
    decode tok/s with and without it, the two interleaved in every run (the machine's drift hits
    both alike); medians. Columns: spec_accept_pct (drafted tokens accepted, grounded),
    spec_x_<name> (median speculative / median plain decode tok/s), spec_<name>_tok_s /
    plain_<name>_tok_s, spec_<name>_cpu_ms / plain_<name>_cpu_ms (median CPU time of the
    process per token: on a shared machine, wall time also counts the waits for the cores)."""
    from ..generate import generate_tokens
    from ..sampling import Sampler

    def one(ids, speculative):
        model.reset()
        it = generate_tokens(model, ids, new_tokens + 1, Sampler(model.config.vocab_size),
                             model.eos_token_ids, ignore_eos=True, speculative=speculative)
        next(it)                                       # the prompt's token: prefill, not timed
        t, c = time.perf_counter(), time.process_time()
        n = sum(1 for _ in it)
        return n / (time.perf_counter() - t), 1000.0 * (time.process_time() - c) / max(n, 1), model.net.last_lookup

    out: dict = {}
    bar = progress(total=runs * len(prompts), desc="speculative", unit="run")
    for name, ids in prompts.items():
        plain, spec, plain_cpu, spec_cpu, prop, acc = [], [], [], [], 0, 0
        for _ in range(runs):
            p, pc, _lk = one(ids, False)
            s, sc, lk = one(ids, True)
            plain.append(p)
            spec.append(s)
            plain_cpu.append(pc)
            spec_cpu.append(sc)
            prop, acc = prop + lk.proposed, acc + lk.accepted
            bar.update(1)
        out[f"plain_{name}_tok_s"] = float(statistics.median(plain))
        out[f"spec_{name}_tok_s"] = float(statistics.median(spec))
        out[f"spec_x_{name}"] = out[f"spec_{name}_tok_s"] / out[f"plain_{name}_tok_s"]
        out[f"spec_{name}_samples"] = [float(x) for x in spec]
        out[f"plain_{name}_samples"] = [float(x) for x in plain]
        out[f"spec_{name}_accept_pct"] = 100.0 * acc / prop if prop else 0.0
        out[f"plain_{name}_cpu_ms"] = float(statistics.median(plain_cpu))
        out[f"spec_{name}_cpu_ms"] = float(statistics.median(spec_cpu))
    bar.close()
    model.reset()
    if "grounded" in prompts:
        out["spec_accept_pct"] = out["spec_grounded_accept_pct"]
    return out


def gb_s(bytes_per_token: int | float | None, tok_s: float | None) -> float | None:
    """Weight bytes streamed per second at tok_s decode tokens/s (GB = 1e9 bytes)."""
    if not bytes_per_token or not tok_s:
        return None
    return bytes_per_token * tok_s / 1e9
