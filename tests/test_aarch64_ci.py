"""The emulated aarch64 check's plumbing, without emulating anything (seconds).

scripts/check_aarch64.sh itself runs minutes to tens of minutes under qemu (root, network for its
first build); what is checked here is the contract `.ci/run` relies on:
  * `.ci/run`'s aarch64 block (run as written, against a stand-in check script): exit 77 is a
    skip that lets CI pass and says so, any other failure fails CI, running past
    MINILM_AARCH64_TIMEOUT fails CI with the limit named, MINILM_SKIP_AARCH64=1 skips;
  * the check skips (exit 77, one "check_aarch64: SKIPPED (reason)" line) when not root, and
    refuses an unknown argument;
  * the rootfs cache key (scripts/aarch64_rootfs.sh) changes when the recipe's code or its
    requirements change, and the wheel key does not depend on the rootfs recipe;
  * (as root, with the tools installed) checks share a built rootfs and a rebuild of one that
    another check is using is refused (SKIPPED), leaving it as it was.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _ci_block() -> str:
    text = (REPO / ".ci" / "run").read_text()
    start = text.index("# ---- aarch64 under qemu")
    return "set -euo pipefail\n" + text[start:] + "\necho CI-CONTINUES\n"


def _run_ci_block(tmp_path, check_body, **env):
    (tmp_path / "scripts").mkdir()
    check = tmp_path / "scripts" / "check_aarch64.sh"
    check.write_text("#!/usr/bin/env bash\n" + check_body + "\n")
    check.chmod(0o755)
    (tmp_path / "ci.sh").write_text(_ci_block())
    e = {k: v for k, v in os.environ.items() if not k.startswith("MINILM_")}
    e.update(env)
    return subprocess.run([BASH, "ci.sh"], cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=60)


def test_ci_block_pass(tmp_path):
    r = _run_ci_block(tmp_path, 'echo "check_aarch64: PASSED (x) in 1 s"; exit 0', CI="true")
    assert r.returncode == 0, r.stderr
    assert "check_aarch64: passed in" in r.stdout and "CI-CONTINUES" in r.stdout


def test_ci_block_skip_lets_ci_pass(tmp_path):
    r = _run_ci_block(tmp_path, 'echo "check_aarch64: SKIPPED (needs root) in 0 s"; exit 77',
                      CI="true")
    assert r.returncode == 0, r.stderr
    assert "check_aarch64: SKIPPED (needs root)" in r.stdout
    assert "SKIPPED after" in r.stdout and "CI-CONTINUES" in r.stdout


def test_ci_block_failure_fails_ci(tmp_path):
    r = _run_ci_block(tmp_path, 'echo "check_aarch64: FAILED (a76-models:pytest) in 9 s"; exit 1',
                      CI="true")
    assert r.returncode == 1
    assert "FAILED (exit 1)" in r.stdout and "CI-CONTINUES" not in r.stdout


def test_ci_block_timeout_fails_ci_and_names_the_limit(tmp_path):
    r = _run_ci_block(tmp_path, "sleep 30", CI="true", MINILM_AARCH64_TIMEOUT="1")
    assert r.returncode == 1
    assert "stopped at the 1 s limit (MINILM_AARCH64_TIMEOUT)" in r.stdout
    assert "CI-CONTINUES" not in r.stdout


def test_ci_block_opt_out(tmp_path):
    r = _run_ci_block(tmp_path, "exit 1", CI="true", MINILM_SKIP_AARCH64="1")
    assert r.returncode == 0
    assert "check_aarch64: SKIPPED (MINILM_SKIP_AARCH64=1)" in r.stdout


def test_check_skips_when_not_root(tmp_path):
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: cannot run the check as another user")
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", BASH,
               str(REPO / "scripts" / "check_aarch64.sh")]
    else:
        cmd = [BASH, str(REPO / "scripts" / "check_aarch64.sh")]
    env = dict(os.environ, MINILM_AARCH64_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 77, (r.stdout, r.stderr)
    assert "check_aarch64: SKIPPED (needs root" in r.stdout
    assert not (tmp_path / "cache").exists()       # skipped before touching anything


def test_check_refuses_unknown_argument():
    r = subprocess.run([BASH, str(REPO / "scripts" / "check_aarch64.sh"), "--bogus"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr


def _keys(extra=""):
    script = (f'source "{REPO}/scripts/aarch64_rootfs.sh"\n{extra}\n'
              'echo "$(wheels_key) $(rootfs_key)"')
    r = subprocess.run([BASH, "-c", script], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MINILM_AARCH64_CACHE="/nonexistent"))
    assert r.returncode == 0, r.stderr
    wheels, rootfs = r.stdout.split()
    assert len(wheels) == 16 and len(rootfs) == 16
    return wheels, rootfs


def test_cache_keys_follow_the_recipe():
    w0, r0 = _keys()
    assert _keys() == (w0, r0)                                        # deterministic
    w1, r1 = _keys('AARCH64_REQUIREMENTS+=("rich")')
    assert w1 != w0 and r1 != r0                                      # requirements: both
    w2, r2 = _keys('eval "$(declare -f unpack_debs | sed \'s/--skip-old-files/-k/\')"')
    assert w2 == w0 and r2 != r0                                      # rootfs recipe: rootfs only
    w3, r3 = _keys('DEBIAN_MIRROR=http://example.invalid/debian')
    assert w3 == w0 and r3 != r0


def _can_run_check_here():
    """Root, with the check's tools installed (so its preflight installs nothing), unshare and
    ../shared: what running the script's --build-only path needs without any network."""
    if os.geteuid() != 0:
        return "needs root"
    tools = ["debootstrap", "unshare", "flock"] + ([] if os.uname().machine == "aarch64" else ["qemu-aarch64-static"])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"]).returncode != 0:
        return "unshare --mount is not permitted here"
    if not (REPO.parent / "shared").is_dir():
        return "../shared not found"
    return None


def test_checks_share_a_built_rootfs_and_never_rebuild_one_in_use(tmp_path):
    """Checks of several trees use one rootfs side by side (each in its own mount namespace,
    under a shared lock), and none rebuilds a rootfs another check is using. Run against a stand-in
    rootfs stamped with this recipe's key, with the lock held shared as a running check holds it."""
    import fcntl
    why = _can_run_check_here()
    if why:
        pytest.skip(why)
    cache = tmp_path / "cache"
    stamp = cache / "arm64-rootfs" / ".minilm-rootfs-ok"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(_keys()[1] + "\n")
    env = dict(os.environ, MINILM_AARCH64_CACHE=str(cache))

    def build_only():
        return subprocess.run([BASH, str(REPO / "scripts" / "check_aarch64.sh"), "--build-only"],
                              env=env, capture_output=True, text=True, timeout=120)

    with open(cache / "check_aarch64.lock", "w") as running:
        fcntl.flock(running, fcntl.LOCK_SH)                   # another check uses the rootfs
        r = build_only()
        assert r.returncode == 0 and "check_aarch64: PASSED (rootfs ready" in r.stdout, (r.stdout, r.stderr)
        stamp.write_text("another-recipe\n")                  # this recipe would rebuild it
        r = build_only()
        assert r.returncode == 77, (r.stdout, r.stderr)
        assert "which this recipe would (re)build" in r.stdout
        assert stamp.read_text() == "another-recipe\n"        # left as it was
