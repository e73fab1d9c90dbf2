"""minilm: on-device inference for small open language models.

    import minilm
    model = minilm.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a local folder
    print(model.generate("Once upon a time", max_new_tokens=64))
"""
from .errors import ContextOverflowError, MinilmError, ModelLoadError, UnsupportedModelError
from .loader import load

__all__ = ["load", "MinilmError", "ModelLoadError", "UnsupportedModelError", "ContextOverflowError"]
__version__ = "0.1.0"
