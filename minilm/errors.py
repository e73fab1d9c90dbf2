"""The exceptions minilm raises for bad input. Each names the file, tensor or parameter at fault."""


class MinilmError(Exception):
    """Base class of every error minilm raises on purpose."""


class ModelLoadError(MinilmError):
    """A model folder, config, tokenizer or weights file could not be used."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (model_type) is not one minilm runs."""


class ContextOverflowError(MinilmError, ValueError):
    """More tokens than the KV cache (n_ctx) holds."""


class NonFiniteWeightsError(ModelLoadError):
    """A float tensor of the weights holds NaN or Inf (names the file and tensor)."""


class ResourceLimitError(MinilmError, ValueError):
    """A parameter or file would need more memory than the machine has (says how much, and what fits)."""


class TemplateError(MinilmError, ValueError):
    """A chat template could not be rendered: syntax, a refused operation, or a limit
    (output length, loop iterations, render time) was hit. Names the problem."""
