"""minilm: on-device inference for small open language models.

    import minilm
    model = minilm.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a local folder
    print(model.generate("Once upon a time", max_new_tokens=64))
"""
import os

# Numba's OpenMP worker threads spin-wait between parallel regions. Unbounded spinning (libgomp's
# OMP_WAIT_POLICY=ACTIVE) is fastest on an idle machine but, on a busy 2-core one, steals the cores
# from the thread doing the work (launches measured in ms); sleeping at once (PASSIVE) costs a
# wake-up per kernel (~13 vs ~10 ms per SmolLM2-135M int4 token here). A bounded spin keeps the
# threads awake across the back-to-back kernels of one token and lets them sleep soon after.
# Must be set before the first parallel kernel runs; the user's own settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

from .errors import (
    ContextOverflowError,
    MinilmError,
    ModelLoadError,
    NonFiniteWeightsError,
    ResourceLimitError,
    TemplateError,
    UnsupportedModelError,
)
from .loader import load

__all__ = ["load", "MinilmError", "ModelLoadError", "UnsupportedModelError", "ContextOverflowError",
           "NonFiniteWeightsError", "ResourceLimitError", "TemplateError"]
__version__ = "0.1.0"
