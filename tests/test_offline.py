"""minilm works offline by design: importing it, loading a local model folder (float, quantized
while loading, and a pre-quantized folder it saved) and generating (Python API and the
`minilm generate` command) never opens a network connection, with no HF_HUB_OFFLINE or other
offline switch set.

The run is a subprocess whose sitecustomize replaces socket.socket (AF_INET / AF_INET6),
socket.create_connection and socket.getaddrinfo with functions that record the attempt (with
its stack) to a file and raise. An attempt that a library catches and shrugs off still fails the
test, because the file must stay empty. The guard checks itself before minilm is imported.
"""
import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, shared_path

_SITECUSTOMIZE = textwrap.dedent(r'''
    import os
    import socket
    import traceback

    _LOG = os.environ["MINILM_NET_LOG"]
    _Socket = socket.socket


    def _record(what):
        with open(_LOG, "a") as f:
            f.write(f"--- {what}\n" + "".join(traceback.format_stack()[:-2]))
        raise OSError(f"network disabled in this test process ({what})")


    class _NoNetSocket(_Socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            fam = socket.AF_INET if family == -1 else family
            if fileno is None and fam in (socket.AF_INET, socket.AF_INET6):
                _record(f"socket.socket(family={fam!r})")
            super().__init__(family, type, proto, fileno)


    socket.socket = _NoNetSocket
    socket.create_connection = lambda *a, **k: _record(f"socket.create_connection{a!r}")
    socket.getaddrinfo = lambda *a, **k: _record(f"socket.getaddrinfo{a!r}")
''')

_RUN = textwrap.dedent(r'''
    import io, json, os, socket, sys
    from contextlib import redirect_stdout
    log = os.environ["MINILM_NET_LOG"]
    # the guard is active: a connection attempt raises and is recorded, then the log is cleared
    try:
        socket.create_connection(("127.0.0.1", 9))
        raise SystemExit("the network guard is not installed")
    except OSError:
        pass
    assert os.path.getsize(log) > 0
    open(log, "w").close()

    import minilm
    from minilm.cli import main
    src, qwen, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
    res = {}
    m = minilm.load(src)
    res["f32"] = m.generate("Once upon a time", max_new_tokens=8)
    q = minilm.load(src, quant="int4")
    res["int4"] = q.generate("Once upon a time", max_new_tokens=8)
    q.save(os.path.join(tmp, "int4"))
    p = minilm.load(os.path.join(tmp, "int4"))
    res["prequant"] = p.generate("Once upon a time", max_new_tokens=8)
    c = minilm.load(qwen, quant="int8")
    res["qwen3"] = c.generate("ROMEO:", max_new_tokens=8)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["generate", "-m", src, "-p", "Once upon a time", "-n", "8"])
    res["cli_rc"], res["cli"] = rc, buf.getvalue()
    print(json.dumps(res))
''')


def test_local_folders_never_touch_the_network(tmp_path):
    src = shared_path("models", "stories260K")
    qwen = shared_path("models", "proxy-qwen3-shakespeare")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = tmp_path / "net.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    paths = [str(site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MINILM_NET_LOG"] = str(log)
    r = subprocess.run([sys.executable, "-c", _RUN, str(src), str(qwen), str(tmp_path)], env=env,
                       check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    attempts = log.read_text()
    assert attempts == "", "network access while offline:\n" + attempts[-4000:]
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("f32", "int4", "prequant", "qwen3"):
        assert isinstance(res[key], str) and res[key].strip(), (key, res)
    assert res["int4"] == res["prequant"]          # the saved folder reproduces the quantized model
    assert res["cli_rc"] == 0 and res["f32"] in res["cli"], res
