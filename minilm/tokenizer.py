"""Tokenizer: the `tokenizers` library on tokenizer.json, special tokens as the checkpoint says."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelLoadError


class Tokenizer:
    def __init__(self, folder: Path, bos_token_id=None, eos_token_ids=()):
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
            try:
                self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None

        def tok_id(key):
            t = self.config.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            return self._tok.token_to_id(t) if isinstance(t, str) else None

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

    @property
    def hf(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (the checkpoint's tokenizer.json), for libraries
        that take one (e.g. the grammar engine of minilm.constrain). Do not modify it."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. Adds BOS as the checkpoint's tokenizer does, never twice."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        b = self.bos_token_id
        if add_special_tokens and b is not None:
            if self.add_bos and (not ids or ids[0] != b):
                ids = [b] + ids                              # config asks for BOS, post-processor didn't
            while len(ids) >= 2 and ids[0] == b and ids[1] == b:
                ids = ids[1:]                                # text began with the BOS string itself
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(i)
