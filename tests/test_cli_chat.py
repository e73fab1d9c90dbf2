"""`minilm chat` driven through a pseudo-terminal (two turns, Ctrl-C at the prompt, /reset,
/exit), piped stdin ending in EOF, and the argument parsers of `chat` and `serve`."""
import argparse
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minilm
import minilm.chat  # noqa: F401  (attaches LM.chat etc. if lm.py does not define them)
from minilm.cli_chat import add_subcommands

from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED / "models" / "stories260K"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def _parser():
    ap = argparse.ArgumentParser(prog="minilm")
    add_subcommands(ap.add_subparsers(dest="command", required=True))
    return ap


def test_parsers():
    a = _parser().parse_args(["serve", "-m", "some/model"])
    assert (a.host, a.port, a.api_key, a.quant, a.ctx) == ("127.0.0.1", 8000, None, None, None)
    a = _parser().parse_args(["serve", "-m", "x", "--quant", "int4", "--host", "0.0.0.0", "--port", "9", "--api-key", "k",
                              "--ctx", "512"])
    assert (a.host, a.port, a.api_key, a.quant, a.ctx) == ("0.0.0.0", 9, "k", "int4", 512)
    a = _parser().parse_args(["chat", "--system", "Be brief.", "--max-tokens", "5", "--temperature", "0"])
    assert a.model and (a.system, a.max_tokens, a.temperature) == ("Be brief.", 5, 0.0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["chat", "--max-tokens", "-1"])


@pytest.fixture(scope="module")
def model():
    if not (STORIES / "config.json").exists():
        pytest.skip(f"test model stories260K not found in {STORIES.parent} (../shared/models beside the repo)")
    return minilm.load(str(STORIES))


CMD = [sys.executable, "-m", "minilm.cli_chat", "chat", "-m", str(STORIES), "--max-tokens", "8",
       "--temperature", "0", "--threads", "1", "--system", "You tell stories."]


class Pty:
    def __init__(self, cmd):
        import pty
        self.master, slave = pty.openpty()
        def ctty():          # a new session with the pty as its controlling terminal: ^C -> SIGINT
            import fcntl
            import signal
            import termios
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # as in a terminal: a suite started in the background by a non-interactive shell
            # ignores SIGINT, and the child would inherit that and never see the ^C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.p = subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, preexec_fn=ctty,
                                  env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.buf = ""

    def expect(self, pattern, timeout=30):
        """Read until `pattern` (str) appears; return the text before it (ANSI codes removed)."""
        deadline = time.time() + timeout
        while pattern not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {self.buf!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:      # the child closed the terminal
                    data = ""
                if not data and self.p.poll() is not None:
                    raise AssertionError(f"program exited ({self.p.returncode}) before {pattern!r}: {self.buf!r}")
                self.buf += ANSI.sub("", data.replace("\r\n", "\n"))
        before, _, self.buf = self.buf.partition(pattern)
        return before

    def _pump(self):
        if select.select([self.master], [], [], 0)[0]:
            try:
                self.buf += ANSI.sub("", os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n"))
            except OSError:
                pass

    def send(self, s):
        os.write(self.master, s.encode())

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        os.close(self.master)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_chat_in_a_terminal(model):
    sys_msg = {"role": "system", "content": "You tell stories."}
    q1, q2 = "Tell me about Lily.", "What did she do next?"
    a1 = model.chat([sys_msg, {"role": "user", "content": q1}], max_tokens=8, temperature=0)
    a2 = model.chat([sys_msg, {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                     {"role": "user", "content": q2}], max_tokens=8, temperature=0)
    assert a1 != a2
    t = Pty(CMD)
    try:
        assert "/reset" in t.expect(">>> ")
        t.send(q1 + "\n")
        assert t.expect(">>> ").endswith(q1 + "\n" + a1 + "\n")
        t.send(q2 + "\n")                                   # second turn: the history is used
        assert t.expect(">>> ").endswith(q2 + "\n" + a2 + "\n")
        time.sleep(0.3)     # let input() block first (a ^C just before its select() is only seen at the next key)
        t.send("\x03")                                      # Ctrl-C at the prompt: not the end
        assert "/exit" in t.expect(">>> ")
        t.send("/reset\n")
        assert "conversation cleared" in t.expect(">>> ")
        t.send(q2 + "\n")                                   # after /reset: no history
        want = model.chat([sys_msg, {"role": "user", "content": q2}], max_tokens=8, temperature=0)
        assert t.expect(">>> ").endswith(q2 + "\n" + want + "\n")
        t.send("/exit\n")
        assert t.p.wait(20) == 0
    finally:
        t.close()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_ctrl_c_stops_the_answer_not_the_program(model):
    cmd = [a if a != "8" else "480" for a in CMD]          # a long answer to interrupt
    t = Pty(cmd)
    try:
        t.expect(">>> ")
        t.send("Tell me a long story.\n")
        t.expect("Tell me a long story.\n")
        while not t.buf:                                   # the answer has started
            time.sleep(0.002)
            t._pump()
        t.send("\x03")
        answer = t.expect(">>> ")
        # interrupted (the usual case) or, on a very fast machine, already finished
        print(f"\nanswer after Ctrl-C: {answer[-60:]!r}")
        assert "[stopped]" in answer or len(answer) > 100, answer
        t.send("Hi\n")                                     # still chatting
        t.expect("Hi\n")
        t.expect(">>> ")
        t.send("\x04")                                     # Ctrl-D at the prompt: exit
        assert t.p.wait(20) == 0
    finally:
        t.close()


def test_chat_piped_until_eof(model):
    a1 = model.chat([{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Hi"}],
                    max_tokens=8, temperature=0)
    r = subprocess.run(CMD, cwd=REPO, input="Hi\n/nonsense\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert a1 in r.stdout and "unknown command /nonsense" in r.stdout
