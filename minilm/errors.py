"""The exceptions minilm raises for bad input. Each names the file, tensor or parameter at fault."""


class MinilmError(Exception):
    """Base class of every error minilm raises on purpose."""


class ModelLoadError(MinilmError):
    """A model folder, config, tokenizer or weights file could not be used."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (model_type) is not one minilm runs."""


class ContextOverflowError(MinilmError, ValueError):
    """More tokens than the KV cache (n_ctx) holds."""
