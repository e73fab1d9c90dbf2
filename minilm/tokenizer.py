"""Tokenizer: the `tokenizers` library on tokenizer.json, special tokens as the checkpoint says.

Public surface (nothing outside this module reaches into the underlying object):
    encode(text) / decode(ids) / id_to_token(i) / token_to_id(s) / get_vocab_size()
    bos_token(_id), eos_token(_id), eos_token_ids, add_bos, config (tokenizer_config.json dict)
    hf            the underlying `tokenizers.Tokenizer` (for export and tools that need it)
    model_vocab_size   the model's vocabulary (config.json vocab_size) when known: ids at or
                  above it exist only in the tokenizer, and `encode` refuses text that produces one
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelLoadError
from .jsonfile import read_json_object

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(self, folder: Path, bos_token_id=None, eos_token_ids=(), model_vocab_size: int | None = None):
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{path}: tokenizer.json not found (minilm needs the fast-tokenizer file)")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise ModelLoadError(f"{path}: cannot read tokenizer ({e})") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config = {}
        if cfg_path.exists():
            self.config = read_json_object(cfg_path)
            for k in _SPECIAL_KEYS:
                t = self.config.get(k)
                if t is not None and not isinstance(t, str) and not (
                        isinstance(t, dict) and isinstance(t.get("content"), str)):
                    raise ModelLoadError(f"{cfg_path}: {k} must be a string or an object with a string "
                                         f"'content', got {t!r}")
            ab = self.config.get("add_bos_token")
            if ab is not None and not isinstance(ab, bool):
                raise ModelLoadError(f"{cfg_path}: add_bos_token must be true or false, got {ab!r}")
            ct = self.config.get("chat_template")
            if ct is not None and not isinstance(ct, (str, list)):
                raise ModelLoadError(f"{cfg_path}: chat_template must be a string or a list of "
                                     f"{{name, template}} objects, got {type(ct).__name__}")

        def tok_id(key):
            t = self.config.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            return self._tok.token_to_id(t) if isinstance(t, str) else None

        self.model_vocab_size = model_vocab_size
        self.bos_token_id = tok_id("bos_token") if tok_id("bos_token") is not None else bos_token_id
        self.eos_token_id = tok_id("eos_token")
        eos = list(eos_token_ids)
        if self.eos_token_id is not None and self.eos_token_id not in eos:
            eos.append(self.eos_token_id)
        self.eos_token_ids = eos
        self.bos_token = self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        self.eos_token = self._tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None
        self.add_bos = self.config.get("add_bos_token")     # None: as the post-processor does
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # ---- public API over the `tokenizers` object -----------------------------------------------
    @property
    def hf(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (read it; minilm's special-token handling is here)."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (None when the vocabulary has no such single token)."""
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        return self._tok.token_to_id(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._tok.get_vocab_size(with_added_tokens=with_added_tokens)

    def unreachable_ids(self) -> list[int]:
        """Tokenizer ids at or above the model's vocabulary (the model has no row for them)."""
        V = self.model_vocab_size
        if V is None or self.vocab_size <= V:
            return []
        return sorted(i for i in self._tok.get_vocab(with_added_tokens=True).values() if i >= V)

    # ---- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. Adds BOS as the checkpoint's tokenizer does, never twice.

        Raises ValueError for text that is not valid Unicode (a lone surrogate such as '\\ud800')
        and for text that produces a token id the model's vocabulary does not have."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_text(text, "text")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        b = self.bos_token_id
        if add_special_tokens and b is not None:
            if self.add_bos and (not ids or ids[0] != b):
                ids = [b] + ids                              # config asks for BOS, post-processor didn't
            while len(ids) >= 2 and ids[0] == b and ids[1] == b:
                ids = ids[1:]                                # text began with the BOS string itself
        self.check_ids(ids)
        return ids

    def check_ids(self, ids) -> None:
        """ValueError naming the token when an id is outside the model's vocabulary."""
        V = self.model_vocab_size
        if V is None:
            return
        for i in ids:
            if not 0 <= i < V:
                raise ValueError(f"token {self._tok.id_to_token(int(i))!r} (id {int(i)}) is outside the "
                                 f"model's vocabulary of {V} ids (config.json vocab_size): the tokenizer "
                                 "knows more tokens than the model; this text cannot be fed to it")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(i)


def check_text(text: str, name: str) -> None:
    """ValueError naming `name` when `text` is not encodable as UTF-8 (a lone surrogate)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: invalid Unicode: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start} (text must be valid UTF-8)") from None
