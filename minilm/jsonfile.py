"""Reading the JSON files a model folder holds (config.json, generation_config.json,
tokenizer_config.json, minilm.json): untrusted input, so every failure is a ModelLoadError
naming the file."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (ModelLoadError for a missing, unreadable, malformed, too deeply
    nested or non-object file)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw
