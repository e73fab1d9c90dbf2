"""python -m minilm.bench --child SPEC: the per-row worker process of `minilm bench`."""
import sys

from .cli import child

if len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(child(sys.argv[2]))
sys.exit("usage: minilm bench ... (python -m minilm.bench --child SPEC is the per-row worker)")
