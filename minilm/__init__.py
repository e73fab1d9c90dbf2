"""minilm: on-device inference for small open language models.

    import minilm
    model = minilm.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a local folder
    print(model.generate("Once upon a time", max_new_tokens=64))
"""
import os

# Numba's OpenMP worker threads spin-wait between parallel regions by default; on a 2-core or
# shared machine that steals the cores from the thread doing the work (a kernel launch measured
# ~8 ms instead of ~5 us). Must be set before the first parallel kernel runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ContextOverflowError, MinilmError, ModelLoadError, UnsupportedModelError
from .loader import load

__all__ = ["load", "MinilmError", "ModelLoadError", "UnsupportedModelError", "ContextOverflowError"]
__version__ = "0.1.0"
