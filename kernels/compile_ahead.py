"""A first run's compile on two cores: a helper process compiles (and caches) part of the kernels
while this process compiles the rest.

Numba compiles one function at a time in a process (its compiler lock), so on an empty cache a
model's first token waits for every kernel in turn while the machine's other core idles. `start`
runs a helper process (`python -m minilm.kernels.compile_ahead`) that compiles the given
dispatchers for the given signatures into the same on-disk cache; this process compiles the rest
and, when it needs one of the helper's functions, waits for it (`Helper.serving`) and loads it from
the cache instead of compiling it. benchmarks/README.md ("First start on two cores") has figures.

Robustness: the helper is an optimisation only. It is not started where it cannot help (one CPU,
a machine whose load average leaves no core idle, `MINILM_COMPILE_HELPER=0`, no on-disk cache, no
fcntl; `MINILM_COMPILE_HELPER=1` starts it whatever the load); if it fails, dies or is slow, `wait`
returns (at the latest when the helper exits, or after its timeout) and this process compiles
the function itself as before. Its output goes nowhere. Both processes write Numba's cache: its
files are replaced atomically, but an index update (read, add an entry, write) is not, so two
processes adding different signatures of one function at once could pair an entry with the other
one's data file; `_lock_cache_saves` serialises every save of a minilm process under an advisory
file lock in the cache directory. Loads need no lock (an entry whose data is not written yet
reads as a miss). A process that exits before its helper leaves it to finish into the cache.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import subprocess
import sys
import threading

try:
    import fcntl
except ImportError:                       # not POSIX: no lock, so no helper
    fcntl = None

_LOCK_NAME = ".minilm-save.lock"


def _lock_cache_saves() -> None:
    """Serialise Numba cache saves (index update + data file) across the processes that import
    this module, with an flock on one file per cache directory."""
    from numba.core import caching
    cls = caching.IndexDataCacheFile
    if fcntl is None or getattr(cls, "_minilm_locked", False):
        return
    orig = cls.save

    def save(self, key, data):
        try:
            fd = os.open(os.path.join(self._cache_path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:                   # a read-only cache directory: the save fails as before
            return orig(self, key, data)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return orig(self, key, data)
        finally:
            os.close(fd)                  # releases the lock
    cls.save = save
    cls._minilm_locked = True


_lock_cache_saves()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _busy() -> bool:
    """No core to spare: the load average (last minute) leaves less than one of this process's
    CPUs idle. There a helper only competes with this process for a core (measured on a 2-core
    machine at load 5-9: the first token came 15-20 % later, with 17 % more CPU time)."""
    try:
        return os.getloadavg()[0] > _cpus() - 1
    except OSError:
        return False


def _cached(disp) -> bool:
    """Whether disp writes an on-disk cache the helper's work can reach this process through."""
    c = getattr(disp, "_cache", None)
    return bool(getattr(c, "_enabled", False)) and type(c).__name__ != "NullCache"


class Helper:
    """A running helper process; jobs are referred to by their names."""

    def __init__(self, proc: subprocess.Popen, jobs: list, timeout: float):
        self._proc = proc
        self._jobs = jobs                 # [(name, dispatcher)]; more come with submit
        self._names = [n for n, _ in jobs]
        self._timeout = timeout
        self._done = {n: threading.Event() for n in self._names}
        self._over = threading.Event()    # the helper exited (or its output ended)
        self._reader = None
        if jobs:
            self._start_reading()

    def _start_reading(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True, name="minilm-compile-helper")
        self._reader.start()

    def submit(self, jobs) -> bool:
        """Give a spawned helper its jobs [(name, dispatcher, signature)] (as `start`); False when
        none of them can go to it (then `close` it)."""
        jobs = [(n, d, tuple(s)) for n, d, s in jobs if _cached(d)]
        if not jobs or self._reader is not None:
            return False
        try:
            payload = pickle.dumps([(d.py_func.__module__, d.py_func.__qualname__, s) for _, d, s in jobs])
        except Exception:                 # a type that does not pickle: compile here, as before
            return False
        self._jobs = [(n, d) for n, d, _ in jobs]
        self._names = [n for n, _ in self._jobs]
        self._done = {n: threading.Event() for n in self._names}
        try:
            self._proc.stdin.write(payload)
            self._proc.stdin.close()
        except OSError:                   # it died: wait() will not wait for it
            pass
        self._start_reading()
        return True

    def close(self) -> None:
        """Let a spawned helper without jobs exit (it reads no jobs and ends)."""
        if self._reader is None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            threading.Thread(target=self._proc.wait, daemon=True).start()   # reap it

    def _read(self) -> None:
        try:
            for line in self._proc.stdout:
                parts = line.split()
                if len(parts) == 2 and parts[0] in (b"ok", b"fail") and parts[1].isdigit():
                    i = int(parts[1])
                    if i < len(self._names):
                        self._done[self._names[i]].set()
        except (OSError, ValueError):
            pass
        finally:
            self._over.set()
            for e in self._done.values():  # nothing more will come: nobody waits any longer
                e.set()
            with contextlib.suppress(OSError):
                self._proc.stdout.close()
            self._proc.wait()

    def wait(self, name: str) -> None:
        """Until job `name` has been compiled (or failed) by the helper, the helper has ended, or
        the timeout given to `start` has passed."""
        e = self._done.get(name)
        if e is not None:
            e.wait(self._timeout)

    @contextlib.contextmanager
    def serving(self):
        """Within this block, this process's first compile of one of the helper's dispatchers
        waits for the helper's job (`wait`) before it looks in the cache, so it loads the helper's
        result instead of compiling it a second time (or, past the wait, compiles it itself).
        The dispatchers' caches are swapped for waiting ones under Numba's compiler lock, which
        every compile in this process holds: no other thread compiles meanwhile."""
        from numba.core.compiler_lock import global_compiler_lock
        with global_compiler_lock:
            saved = [(d, d._cache) for _, d in self._jobs]
            for name, d in self._jobs:
                d._cache = _Waiting(d._cache, self, name)
            try:
                yield
            finally:
                for d, c in saved:
                    d._cache = c


class _Waiting:
    """A dispatcher's cache whose loads first wait for the helper's job (Helper.serving)."""

    def __init__(self, inner, helper: Helper, name: str):
        self._inner, self._helper, self._name = inner, helper, name

    def load_overload(self, sig, target_context):
        self._helper.wait(self._name)
        return self._inner.load_overload(sig, target_context)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def spawn(timeout: float = 300.0) -> Helper | None:
    """Start a helper process before its jobs are known (`Helper.submit` gives them; `close` lets
    it go unused): it imports minilm and readies Numba's compiler meanwhile, which is about a
    second of its side of a first start. None where no helper is started (see the module
    docstring)."""
    mode = os.environ.get("MINILM_COMPILE_HELPER", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"MINILM_COMPILE_HELPER must be 0 (no helper process) or 1 (one whatever the "
                         f"load), or unset (one when a core is idle); got {mode!r}")
    if mode == "0" or fcntl is None or _cpus() < 2 or mode != "1" and _busy():
        return None
    # the helper imports the minilm this process runs (the cache is keyed by source file)
    env = dict(os.environ, MINILM_COMPILE_HELPER="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "minilm.kernels.compile_ahead"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return None
    return Helper(proc, [], timeout)


def start(jobs, timeout: float = 300.0) -> Helper | None:
    """Compile jobs [(name, dispatcher, signature: tuple of Numba types)] in a helper process, in
    this order, into Numba's on-disk cache; None where no helper is started (see the module
    docstring). The dispatchers must be module-level functions of minilm.kernels."""
    h = spawn(timeout)
    if h is not None and not h.submit(jobs):
        h.close()
        return None
    return h


def _main() -> None:
    """The helper: compile each job in order, reporting "ok i" / "fail i" on stdout."""
    from numba.core.registry import cpu_target
    cpu_target.typing_context.refresh()      # what a first compile sets up, while the jobs are
    cpu_target.target_context.refresh()      # not yet known (spawn)
    cpu_target.target_context.codegen()
    data = sys.stdin.buffer.read()
    if not data:                             # closed unused
        return
    jobs = pickle.loads(data)
    out = sys.stdout.buffer
    for i, (mod, qualname, sig) in enumerate(jobs):
        ok = b"ok"
        try:
            disp = importlib.import_module(mod)
            for part in qualname.split("."):
                disp = getattr(disp, part)
            disp.compile(sig)
        except Exception:
            ok = b"fail"
        out.write(b"%s %d\n" % (ok, i))
        out.flush()


if __name__ == "__main__":
    _main()
