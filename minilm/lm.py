"""`LM`: what `minilm.load` returns — tokenizer + transformer + generate()/logits()/perplexity()."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .config import Config
from .generate import TextStream, check_generate_args, check_room, check_speculative, generate_tokens
from .model import Transformer
from .sampling import Sampler


class LM:
    def __init__(self, cfg: Config, tensors: dict, tokenizer, n_ctx: int, source: str = "", quant: str = "f32",
                 group_size: int = 32, kv_quant: str | None = None, n_ctx_note: str = ""):
        self.config = cfg
        self.tokenizer = tokenizer
        self.net = Transformer(cfg, tensors, n_ctx, kv_quant)
        self.n_ctx_note = n_ctx_note or f"n_ctx {n_ctx}"      # how n_ctx was chosen (the summary says it)
        self.tensors = tensors
        self.source = source
        self.quant = quant
        self.group_size = group_size
        eos = list(cfg.eos_token_ids)
        for e in tokenizer.eos_token_ids:
            if e not in eos:
                eos.append(e)
        self.eos_token_ids = eos

    @property
    def n_ctx(self) -> int:
        return self.net.n_ctx

    @property
    def kv_quant(self) -> str:
        """The KV cache's storage type: f16, q8_0 or f32."""
        return self.net.cache.kv_quant

    def reset(self) -> None:
        """Forget the cached context."""
        self.net.cache.reset()

    # ---- scoring ---------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """f32[len(ids), V]: logits at every position, fresh cache, positions 0..len-1."""
        ids = self._ids(ids)
        with self.net.busy:                                   # one call at a time per model
            self.reset()
            out = self.net.all_logits(ids)
            self.reset()
        return out

    def perplexity(self, ids, window: int | None = None) -> dict:
        """exp(mean NLL) over ids split into non-overlapping windows, each run from position 0."""
        ids = self._ids(ids)
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2):
            raise ValueError(f"window={window!r}: must be an integer >= 2")
        window = window or self.n_ctx
        nll, n = 0.0, 0
        for a in range(0, len(ids), window):
            w = ids[a:a + window]
            if len(w) < 2:
                continue
            lg = self.logits(w).astype(np.float64)[:-1]       # [T-1, V]
            lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
            nll += float((lse - lg[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
        return {"ppl": float(np.exp(nll / n)), "mean_nll": nll / n, "tokens": n}

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop=None, stream: bool = False, ignore_eos: bool = False,
                 json_schema=None, regex: str | None = None, grammar: str | None = None,
                 speculative: bool = True):
        """Continue `prompt` (text, or a list of token ids). Greedy when temperature == 0.

        Returns the new text, or with stream=True an iterator of text pieces that concatenate to
        exactly that text. Stops at an EOS id, at a stop string (not returned), or after
        max_new_tokens.

        Constrained output (at most one; see minilm/constrain.py): `json_schema` (a dict or its
        JSON text), `regex`, or `grammar` (Lark syntax, or GBNF). Every token is masked to keep
        the text a prefix of a match, and EOS is allowed only once it matches, so the text
        always matches unless max_new_tokens ran out first. Strings and arrays of a schema
        without maxLength / maxItems are bounded to fit the budget (`constrain.bound_schema`).
        A bad schema / regex / grammar raises
        `minilm.constrain.ConstraintError` (a ValueError) naming the argument.

        speculative: draft tokens from the prompt and the text so far and check them in one pass
        (minilm/generate.py `PromptLookup`): the same tokens as without it (greedy) or the same
        distribution (sampling), faster where the text repeats what it has seen; off under a
        constraint. False turns it off.
        """
        for name, v in (("stream", stream), ("ignore_eos", ignore_eos)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r}: must be True or False")
        pieces = self._generate(prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                                repetition_penalty, seed, stop, ignore_eos, json_schema, regex, grammar,
                                speculative)
        return pieces if stream else "".join(pieces)

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                  repetition_penalty, seed, stop, ignore_eos, json_schema=None, regex=None,
                  grammar=None, speculative=True) -> Iterator[str]:
        # validate eagerly (before the caller starts iterating)
        stop = check_generate_args(max_new_tokens, stop, seed=seed, temperature=temperature, top_k=top_k,
                                   top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        check_speculative(speculative)
        ids = self.encode_prompt(prompt)
        check_room(self, ids, max_new_tokens)
        state = None
        if json_schema is not None or regex is not None or grammar is not None:
            from .constrain import compile_constraint
            state = compile_constraint(self, json_schema, regex, grammar, max_tokens=max_new_tokens).start()
        sampler = Sampler(self.config.vocab_size, temperature, top_k, top_p, min_p, repetition_penalty, seed)
        toks = generate_tokens(self, ids, max_new_tokens, sampler, self.eos_token_ids, ignore_eos, state,
                               speculative)
        # under a constraint the grammar decides where the text ends (stop strings could cut it)
        return self._stream(toks, TextStream(self.tokenizer, ids, [] if state is not None else stop), state)

    @staticmethod
    def _stream(toks, ts: TextStream, state=None) -> Iterator[str]:
        for t in toks:
            piece = ts.push(t)
            if piece:
                yield piece
            if ts.done:
                toks.close()
                return
        tail = ts.finish()
        if tail:
            yield tail
        if state is not None and not (state.done or state.accepting):
            import warnings

            from .constrain import IncompleteOutputWarning
            warnings.warn(f"{state.c.param}: max_new_tokens ran out before the output was complete; "
                          f"the text is a valid prefix, not a full match", IncompleteOutputWarning, stacklevel=2)

    def generate_ids(self, prompt, max_new_tokens: int = 128, ignore_eos: bool = False, speculative: bool = True,
                     **sampling) -> list[int]:
        """Like generate() but returns the new token ids (no stop strings)."""
        unknown = set(sampling) - {"seed", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}
        if unknown:
            raise TypeError(f"generate_ids: unknown argument(s) {', '.join(sorted(unknown))}")
        check_generate_args(max_new_tokens, None, **sampling)
        seed = sampling.pop("seed", None)
        sampler = Sampler(self.config.vocab_size, seed=seed, **sampling)
        return list(generate_tokens(self, self.encode_prompt(prompt), max_new_tokens, sampler,
                                    self.eos_token_ids, ignore_eos, speculative=speculative))

    # ---- helpers ---------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        """A text prompt (str) or token ids (a list / tuple / 1-D integer array) -> checked ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise TypeError(f"prompt: must be a str or a list of token ids, got {type(prompt).__name__}")
        return [int(t) for t in self._ids(prompt)]

    def _ids(self, ids) -> np.ndarray:
        try:
            a = np.asarray(ids)
        except Exception:
            raise ValueError("ids must be a sequence of integers") from None
        if a.ndim != 1 or (a.size and (not np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)):
            raise ValueError(f"ids must be a 1-D sequence of integers, got shape {a.shape} of {a.dtype}")
        if a.size == 0:
            raise ValueError("ids is empty")
        V = self.config.vocab_size
        if a.min() < 0 or a.max() >= V:
            raise ValueError(f"ids contain a token id outside [0, {V}) (vocab_size): "
                             f"{int(a.min()) if a.min() < 0 else int(a.max())}")
        return a.astype(np.int64)

    # ---- saving and describing ------------------------------------------------------------
    def save(self, folder) -> None:
        """Write a pre-quantized folder that `minilm.load` maps back without requantizing."""
        from .prequant import save
        save(self, folder)

    def summary(self) -> str:
        """Per-type parameter counts, bytes and bits per weight, padded tensors, KV cache size."""
        from .mixes import mix_summary
        from .quant import Linear
        c = self.config
        by_type: dict[str, list] = {}
        padded = []
        seen = set()
        for name, t in self.tensors.items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, Linear):
                key, n, b = t.type_name, t.N * t.K, t.nbytes
                if t.Kp != t.K:
                    padded.append(f"{name} (K {t.K}->{t.Kp})")
            else:
                key, n, b = "f32 (norms, biases, positions)", t.size, t.nbytes
            e = by_type.setdefault(key, [0, 0, 0])
            e[0] += 1
            e[1] += n
            e[2] += b
        lines = [f"minilm model: {c.model_type} from {self.source}",
                 f"  layers {c.n_layers}, hidden {c.hidden_size}, heads {c.n_heads}/{c.n_kv_heads} "
                 f"(head_dim {c.head_dim}), ffn {c.intermediate_size}, vocab {c.vocab_size}, quant {self.quant}",
                 f"  {'type':32} {'tensors':>7} {'params':>12} {'MB':>9} {'bits/weight':>11}"]
        tp = tb = 0
        for k, (cnt, n, b) in sorted(by_type.items()):
            lines.append(f"  {k:32} {cnt:7d} {n:12,d} {b / 1e6:9.2f} {8 * b / max(n, 1):11.2f}")
            tp += n
            tb += b
        lines.append(f"  {'total':32} {'':7} {tp:12,d} {tb / 1e6:9.2f} {8 * tb / max(tp, 1):11.2f}")
        if padded:
            lines.append(f"  zero-padded to the block size: {', '.join(padded)}")
        lines += mix_summary(self.quant, c, self.tensors)
        kc = self.net.cache
        lines.append(f"  KV cache: {kc.kv_quant}, {kc.nbytes / 1e6:.2f} MB for n_ctx={self.n_ctx} "
                     f"({kc.nbytes / max(self.n_ctx, 1) / 1e3:.1f} kB per position; pages are mapped as "
                     f"positions fill)")
        lines.append(f"  context: {self.n_ctx_note}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    # ---- embeddings (minilm/embed.py) ------------------------------------------------------
    def embed(self, texts, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """f32[n, hidden]: pooled final-normed hidden states of each text (a string, a list of
        strings, or token id lists), each run from position 0. pooling "mean" | "last";
        normalize: unit L2 norm. Inputs longer than the context raise a ValueError naming the
        index. Resets the KV cache."""
        from .embed import embed
        return embed(self, texts, pooling, normalize)

    # ---- chat (minilm/chat.py) -------------------------------------------------------------
    def chat(self, messages, **kwargs):
        """Answer a conversation [{"role", "content"}, ...]: text, or pieces with stream=True."""
        from .chat import chat
        return chat(self, messages, **kwargs)

    def create_chat_completion(self, messages, **kwargs):
        """OpenAI-shaped "chat.completion" dict (or chunk iterator with stream=True)."""
        from .chat import create_chat_completion
        return create_chat_completion(self, messages, **kwargs)

    def create_completion(self, prompt, **kwargs):
        """OpenAI-shaped "text_completion" dict (or chunk iterator with stream=True)."""
        from .chat import create_completion
        return create_completion(self, prompt, **kwargs)
