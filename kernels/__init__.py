"""Numba kernels of minilm (installed as `minilm.kernels`).

Each module holds the fast kernels and, beside each, a plain-numpy `*_ref` function the tests
compare against. All kernels take float32 C-contiguous arrays and write into a caller-provided
`out` (no allocation per call); `cache=True` everywhere so a second process does not recompile.
"""
