#!/usr/bin/env bash
# minilm on 64-bit ARM, emulated: runs a pytest subset and the README's `minilm generate` inside a
# Debian bookworm arm64 root filesystem through qemu-user (binfmt_misc), once per CPU model:
#   cortex-a76 (Raspberry Pi 5; ARMv8.2 dot product: the quantized kernels compile to sdot)
#   cortex-a72 (Raspberry Pi 4; no dot product: the NEON fallback)
# with QEMU_CPU and NUMBA_CPU_NAME set to the same model, so Numba compiles for that CPU and qemu
# refuses (SIGILL) any instruction it does not have.
#
# Usage: scripts/check_aarch64.sh [--build-only] [--cold] [--cpus "cortex-a76 cortex-a72"]
#        (--cold empties this tree's Numba cache first, to time a cold run;
#        MINILM_AARCH64_TESTS="pytest ids" runs those instead of the subset, for debugging;
#        MINILM_AARCH64_NO_BINFMT=1 runs the rootfs's python through qemu-aarch64-static -L;
#        MINILM_AARCH64_JOBS=N runs N jobs of the subset at a time, default nproc)
# Needs root, debootstrap and qemu-user-static (installed with apt-get when missing); binfmt_misc
# when it can be mounted (without it the python runs through qemu-aarch64-static -L); network
# only for the first build (Debian packages, PyPI aarch64 wheels), the emulated run is offline.
# Everything is cached under ${MINILM_AARCH64_CACHE:-~/.cache/minilm} (arm64-rootfs, arm64-wheels,
# and each tree's Numba cache inside the rootfs); the rootfs builds in ~1 min
# (scripts/aarch64_rootfs.sh). Checks of several trees may share the rootfs at the same time.
# Exit status: 0 passed, 1 failed, 77 skipped (the reason is printed).
# Prints one line at the end: "check_aarch64: PASSED|FAILED|SKIPPED ... in N s".
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/aarch64_rootfs.sh
source "$REPO/scripts/aarch64_rootfs.sh"
T0=${_MINILM_AARCH64_T0:-$(date +%s)}
ARGS=("$@")
BUILD_ONLY=0
COLD=0
CPUS="cortex-a76 cortex-a72"
while [ $# -gt 0 ]; do
    case "$1" in
        --build-only) BUILD_ONLY=1 ;;
        --cold) COLD=1 ;;
        --cpus) shift; CPUS="${1:-}" ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "check_aarch64: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

finish() {  # finish STATUS(PASSED|FAILED|SKIPPED) DETAIL EXIT
    echo "check_aarch64: $1 ($2) in $(( $(date +%s) - T0 )) s"
    exit "$3"
}

# ---- preflight -------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || finish SKIPPED "needs root: debootstrap, chroot, mounts" 77
# The check's mounts (the repo, ../shared, /proc, /dev, /sys, a private /tmp) live in a mount
# namespace of its own (unshare; they vanish with it, even when the run is killed), so checks of
# several trees can share one rootfs side by side, each seeing its own repo at /work/minilm.
# Without unshare they go to the host's namespace and one check at a time may use the rootfs.
MOUNT_NS=host
if [ -n "${_MINILM_AARCH64_NS:-}" ]; then
    MOUNT_NS=private
elif command -v unshare >/dev/null && unshare --mount --propagation private true 2>/dev/null; then
    _MINILM_AARCH64_NS=1 _MINILM_AARCH64_T0=$T0 \
        exec unshare --mount --propagation private "$BASH" "$REPO/scripts/check_aarch64.sh" "${ARGS[@]}"
fi
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || \
    finish SKIPPED "host $(uname -m) not supported (x86_64 with qemu, or aarch64 natively)" 77
SHARED="$(cd "$REPO/../shared" 2>/dev/null && pwd)" || \
    finish SKIPPED "../shared (test models and golden outputs) not found beside $REPO" 77
# Tools: debootstrap (only to build the rootfs) and qemu-user-static (x86_64), from apt-get when
# missing. Every network step has a time limit; a failed one is environmental: SKIPPED.
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ "$(uname -m)" = aarch64 ] || [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || finish SKIPPED "${need[*]} missing and no apt-get" 77
    say "installing ${need[*]} with apt-get"
    apt_get() {
        DEBIAN_FRONTEND=noninteractive timeout -k 10 300 apt-get -q -o Acquire::http::Timeout=30 \
            -o Acquire::Retries=2 -o DPkg::Lock::Timeout=60 "$@" >/dev/null 2>&1
    }
    step_start
    { apt_get install -y "${need[@]}" || { apt_get update && apt_get install -y "${need[@]}"; }; } ||
        finish SKIPPED "apt-get could not install ${need[*]} (no network, no mirror, or apt locked)" 77
    step_done "apt-get install ${need[*]}"
fi
# binfmt_misc makes aarch64 programs run transparently in a chroot (the check's python and the
# processes it starts). Without it the rootfs still builds (its two emulated commands run
# through the static qemu) and its python runs explicitly through qemu-aarch64-static -L ROOTFS.
RUN_MODE=native
if [ "$(uname -m)" = x86_64 ]; then
    RUN_MODE=binfmt
    if [ "${MINILM_AARCH64_NO_BINFMT:-0}" = 1 ] || ! ensure_binfmt; then
        say "binfmt_misc is not usable: running the rootfs's python through qemu-aarch64-static -L"
        RUN_MODE=explicit
    fi
fi

# ---- cached rootfs + wheels ------------------------------------------------------------------
mkdir -p "$AARCH64_CACHE"
# The rootfs lock: checks in their own mount namespaces use the rootfs under a shared lock, side
# by side; building (or rebuilding, for another recipe) it takes the lock exclusively and is
# refused while any check uses it. In the host's namespace a check takes it exclusively (a
# second would unmount the first one's mounts).
exec 9> "$AARCH64_CACHE/check_aarch64.lock"
if [ "$MOUNT_NS" = private ]; then
    flock -s -w 900 9 || finish SKIPPED "the arm64 rootfs in $AARCH64_CACHE stayed locked (being built) for 900 s" 77
    if ! rootfs_ready; then
        flock -u 9
        flock -x -n 9 || finish SKIPPED "another check_aarch64 uses $ROOTFS, which this recipe would (re)build" 77
    fi
else
    say "unshare --mount is not available: mounting in the host's namespace, one check at a time"
    flock -n 9 || finish SKIPPED "another check_aarch64 is running on $AARCH64_CACHE" 77
fi
ensure_rootfs; rc=$?
case $rc in
    0) ;;
    2) finish SKIPPED "a download for the arm64 rootfs failed (network or mirror; see above)" 77 ;;
    *) finish FAILED "building the arm64 rootfs (see above)" 1 ;;
esac
[ "$MOUNT_NS" = private ] && flock -s 9       # built: others may use it beside this check
[ "$BUILD_ONLY" = 1 ] && finish PASSED "rootfs ready in $ROOTFS; --build-only" 0

# This tree's Numba cache, in the rootfs (one folder per CPU model below it): named by the
# tree's path, so trees never share or wipe each other's compiled kernels (the cache index is
# keyed by the source path, /work/minilm/... for every tree). --cold empties it first.
TREE_ID="$(basename "$REPO")-$(printf '%s' "$REPO" | sha256sum | cut -c1-8)"
NUMBA_DIR="/var/cache/minilm-numba/$TREE_ID"
mkdir -p "$ROOTFS$NUMBA_DIR"
exec 8> "$ROOTFS$NUMBA_DIR.lock"
flock -n 8 || finish SKIPPED "another check_aarch64 of this tree ($REPO) is running" 77
if [ "$COLD" = 1 ]; then
    say "--cold: emptying this tree's Numba cache ($NUMBA_DIR)"
    rm -rf --one-file-system "${ROOTFS:?}$NUMBA_DIR" && mkdir -p "$ROOTFS$NUMBA_DIR"
fi

# ---- mounts: the repo and ../shared read-only, /proc /dev /sys ---------------------------------
# cleanup unmounts what is mounted below the rootfs, by the mount table's real paths (never by
# a path that a link could redirect), once (it runs from the signal trap and again at exit).
MOUNTED=0
cleanup() {
    if [ "$MOUNTED" = 1 ]; then MOUNTED=0; umount_under "$ROOTFS"; fi
}
trap cleanup EXIT
trap 'cleanup; finish FAILED "interrupted" 1' INT TERM
mnt() {  # mnt TARGET mount-args...
    local target="$1"; shift
    # never through a link: a mount point must be inside the rootfs, not on the host
    [ -L "$target" ] && { say "mount point $target is a symbolic link"; return 1; }
    mkdir -p "$target"
    MOUNTED=1
    mount "$@" "$target" || { say "mount $* $target failed"; return 1; }
}
ro_bind() {
    mnt "$2" --bind "$1" && mount -o remount,bind,ro "$2" || return 1
}
umount_under "$ROOTFS"
{ mnt "$ROOTFS/proc" -t proc proc &&
  mnt "$ROOTFS/sys" -t sysfs sys &&
  mnt "$ROOTFS/dev" --bind /dev &&
  mnt "$ROOTFS/dev/shm" -t tmpfs shm &&
  mnt "$ROOTFS/tmp" -t tmpfs -o mode=1777 tmp &&
  ro_bind "$REPO" "$ROOTFS/work/minilm" &&
  ro_bind "$SHARED" "$ROOTFS/work/shared"; } || finish FAILED "mounting into the rootfs" 1

# minilm from the mounted repo, importable as its editable install makes it (pyproject's
# package-dir: minilm.kernels is the folder kernels/): the repo on the venv's path and a finder
# for minilm.kernels, plus the `minilm` command.
# The same files for every tree (the repo is /work/minilm in each namespace), replaced atomically
# and only when they differ: another check's python may be reading them.
put() {  # put FILE MODE < content
    local tmp; tmp=$(mktemp "$1.XXXXXX") && cat > "$tmp" || return 1
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else chmod "$2" "$tmp" && mv -f "$tmp" "$1"; fi
}
SITE=$(ls -d "$ROOTFS"/opt/minilm-venv/lib/python3*/site-packages)
put "$SITE/_minilm_repo_finder.py" 644 <<'PY'
"""minilm.kernels -> /work/minilm/kernels (written by scripts/check_aarch64.sh)."""
import importlib.util
import sys


class _KernelsFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "minilm.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, "/work/minilm/kernels/__init__.py", submodule_search_locations=["/work/minilm/kernels"])


sys.meta_path.insert(0, _KernelsFinder)
PY
printf '/work/minilm\nimport _minilm_repo_finder\n' | put "$SITE/minilm-repo.pth" 644
printf '#!/opt/minilm-venv/bin/python\nimport sys\nfrom minilm.cli import main\nsys.exit(main())\n' |
    put "$ROOTFS/opt/minilm-venv/bin/minilm" 755

# ---- the subset --------------------------------------------------------------------------------
# Under qemu a cold Numba compile costs ~15x its native time and the compiles are most of the run,
# so the subset is what the check must cover, each kernel compiled once per CPU model:
#   the row kernels of every format in the traits table (tests/test_row_kernels.py: the GEMV and
#   GEMM the executor runs, one small shape per format reaching every code path, against the
#   numpy references; not the x86 suite's parametrized matrix of the public parallel wrappers,
#   whose parallel regions would each be one more compile), on both CPU models;
#   cortex-a76: golden f32 logits and greedy tokens of a Llama and a Qwen3, the README's command,
#   int4 accuracy, the int4 pre-quantized folder round trip and the Q8_0/Q4_0 quantizers;
#   cortex-a72: int8 accuracy (a whole model on the fallback path).
# The executor compiles once per weight-format set (f32, Q4_0, Q8_0), a job each. Jobs run side by
# side, one core each (MINILM_AARCH64_JOBS at a time, in the order below); each CPU model has its own
# Numba cache (this tree's, in the rootfs).
KERNEL_TESTS=("tests/test_row_kernels.py")
F32_TESTS=(
    "tests/test_golden.py::test_logits_match_reference[stories260K]"
    "tests/test_golden.py::test_logits_match_reference[proxy-qwen3-shakespeare]"
    "tests/test_golden.py::test_greedy_tokens_match_reference[stories260K]"
    "tests/test_golden.py::test_greedy_tokens_match_reference[proxy-qwen3-shakespeare]"
)
INT4_TESTS=(
    "tests/test_quant.py::test_int4_perplexity_within_12_percent[stories260K]"
    "tests/test_quant.py::test_save_load_round_trip_is_exact[stories260K-int4]"
    "tests/test_qmatmul.py::test_q8_fast_equals_ref"
    "tests/test_qmatmul.py::test_q4_fast_equals_ref"
)
INT8_TESTS=(
    "tests/test_quant.py::test_int8_keeps_greedy_tokens_and_perplexity[proxy-qwen3-shakespeare]"
)

in_arm() {  # in_arm CPU ARGS...: the rootfs's python with ARGS, in the repo, as that CPU model
    local cpu="$1"; shift
    local envs=(PATH=/opt/minilm-venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$cpu"
                NUMBA_CPU_NAME="$cpu" NUMBA_CPU_FEATURES= PYTHONDONTWRITEBYTECODE=1 "${EXTRA_ENV[@]}")
    case "$RUN_MODE" in
        binfmt|native)
            chroot "$ROOTFS" /usr/bin/env -i "${envs[@]}" NUMBA_CACHE_DIR="$NUMBA_DIR/$cpu" \
                /bin/sh -c 'cd /work/minilm && exec /opt/minilm-venv/bin/python "$@"' sh "$@" ;;
        explicit)
            # qemu -L looks every path up in ROOTFS first, then on the host: /usr/lib/python3.11,
            # /work/minilm and /work/shared resolve into the rootfs; the Numba cache is named by its
            # host path (a file qemu would create is created at the path as given).
            (cd "$ROOTFS/work/minilm" && env -i "${envs[@]}" \
                NUMBA_CACHE_DIR="$ROOTFS$NUMBA_DIR/$cpu" \
                /usr/bin/qemu-aarch64-static -L "$ROOTFS" -cpu "$cpu" -0 /opt/minilm-venv/bin/python \
                "$ROOTFS/usr/bin/python3.11" "$@") ;;   # argv[0] in the venv: Python finds pyvenv.cfg
    esac
}

# Which instructions really ran: qemu logs every block it translates (QEMU_LOG=in_asm); the words
# with the ARMv8.2 SDOT/UDOT (vector) encoding are counted. qemu 7.2's disassembler prints them as
# .byte, so the encoding is matched: (w & 0xbfe0fc00) == 0x0e809400 (sdot) or 0x2e809400 (udot).
PROBE='import numpy as np
from minilm.kernels import executor as E, ggml_quants as GQ, qmatmul as Q
rng = np.random.default_rng(0)
N, K = 8, 256
w = rng.standard_normal((N, K)).astype(np.float32)        # f32[N, K]
x = rng.standard_normal(K).astype(np.float32)             # f32[K]
xq, xd, xs = np.empty(K, np.int8), np.empty(K // 32, np.float32), np.empty(K // 32, np.float32)
out = np.empty(N, np.float32)
qs, d = Q.quantize_q8_0_ref(w)                            # the row kernels test_row_kernels compiled
Q._quantize_act_q8v(x, xq, xd, xs)
E._q8_groups(xq, xd, xs, qs, d.view(np.uint16), out, 0, 2)
ref = Q.dequantize_q8_0_ref(qs, d) @ x
assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), (out, ref)
qs, d = Q.quantize_q4_0_ref(w, 32)                        # Q4_0 on its il16 layout: NEON, no sdot
E._q4_groups(xq, xd, xs, *Q.repack_q4_0(qs, d), out, 0, 1)
ref = Q.dequantize_q4_0_ref(qs, d) @ x
assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), (out, ref)
s = GQ.SPECS["Q4_K"]
raw = s.quantize_ref(w)
xq, xd, xs = GQ.act_scratch(K)
s.act_quant(x, xq, xd, xs)
s.exec_gemv_groups(xq, xd, xs, s.repack(raw), out, 0, 2)
ref = s.dequantize_ref(raw, K) @ x
assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), (out, ref)'
count_dot() {  # count_dot LOGFILE -> number of distinct translated sdot/udot instructions
    python3 - "$1" <<'PY'
import re, sys
seen = set()
with open(sys.argv[1], errors="replace") as f:
    for line in f:
        m = re.match(r"(0x[0-9a-f]+):\s+([0-9a-f]{8})\s", line)
        if m and (int(m.group(2), 16) & 0xBFE0FC00) in (0x0E809400, 0x2E809400):
            seen.add(m.group(1))
print(len(seen))
PY
}

# check_job JOB: one job of the subset (see above) in its own emulated processes; each failure is a
# line in $RESULTS/JOB.failed, pytest's output goes to $RESULTS/JOB.log and is printed whole when
# pytest ends (jobs run side by side).
check_job() {
    local job="$1" cpu t failed=() machine tests=() probe=0 generate=0 qlog host_qlog ndot gen out
    local EXTRA_ENV=()
    case "$job" in
        a76-kernels) cpu=cortex-a76; tests=("${KERNEL_TESTS[@]}"); probe=1 ;;
        a72-kernels) cpu=cortex-a72; tests=("${KERNEL_TESTS[@]}"); probe=1 ;;
        a76-f32) cpu=cortex-a76; tests=("${F32_TESTS[@]}"); generate=1 ;;
        a76-int4) cpu=cortex-a76; tests=("${INT4_TESTS[@]}") ;;
        a72-int8) cpu=cortex-a72; tests=("${INT8_TESTS[@]}") ;;
        *) cpu="$job"; tests=("${KERNEL_TESTS[@]}"); probe=1 ;;   # another CPU model (--cpus)
    esac
    if [ -n "${MINILM_AARCH64_TESTS:-}" ]; then   # debugging: these pytest ids instead
        read -r -a tests <<< "$MINILM_AARCH64_TESTS"
    fi
    [ "$RUN_MODE" = native ] && probe=0
    t=$(date +%s)
    mkdir -p "$ROOTFS$NUMBA_DIR/$cpu"
    step_start
    machine=$(in_arm "$cpu" -c "import platform, minilm.kernels.qmatmul as Q; print(platform.machine(), Q.SIMD)")
    step_done "$job: import minilm as $cpu ($machine)"
    if [ "$machine" != "aarch64 generic" ]; then
        echo "$job:setup" > "$RESULTS/$job.failed"; return
    fi
    say "$job: pytest (${#tests[@]} test groups)"
    step_start
    in_arm "$cpu" -m pytest -q -p no:cacheprovider --durations=12 "${tests[@]}" > "$RESULTS/$job.log" 2>&1 ||
        failed+=("$job:pytest")
    flock "$RESULTS" sh -c 'echo "---- pytest, $1:"; cat "$2"' sh "$job ($cpu)" "$RESULTS/$job.log" >&2
    step_done "$job: pytest"
    if [ "$probe" = 1 ]; then
        qlog="/tmp/minilm-qemu-$job.log"; host_qlog="$ROOTFS$qlog"
        [ "$RUN_MODE" = explicit ] && qlog="$host_qlog"
        rm -f "$host_qlog"
        EXTRA_ENV=(QEMU_LOG=in_asm QEMU_LOG_FILENAME="$qlog")
        step_start
        in_arm "$cpu" -c "$PROBE" || failed+=("$job:probe")
        EXTRA_ENV=()
        ndot=$(count_dot "$host_qlog"); rm -f "$host_qlog"
        step_done "$job: sdot probe (the $cpu GEMVs executed $ndot distinct sdot/udot instructions)"
        case "$cpu" in
            cortex-a76) [ "$ndot" -gt 0 ] || failed+=("$job:no-sdot-executed") ;;
            cortex-a72) [ "$ndot" = 0 ] || failed+=("$job:sdot-on-a-cpu-without-it") ;;
        esac
    fi
    if [ "$generate" = 1 ]; then
        # the README's command, from the repo root as the README runs it
        gen=(generate -m ../shared/models/stories260K -p "Once upon a time" -n 64)
        step_start
        if [ "$RUN_MODE" = explicit ]; then   # the `minilm` script's code, without its #! line
            out=$(in_arm "$cpu" -m minilm.cli "${gen[@]}")
        else
            out=$(in_arm "$cpu" -c 'import os, sys; os.execv("/opt/minilm-venv/bin/minilm", ["minilm"] + sys.argv[1:])' "${gen[@]}")
        fi &&
            [ "${#out}" -gt 20 ] && printf '%s\n' "$out" | head -3 >&2 || failed+=("$job:minilm-generate")
        step_done "$job: minilm generate -m ../shared/models/stories260K -p 'Once upon a time' -n 64"
    fi
    say "$job: done in $(( $(date +%s) - t )) s"
    printf '%s\n' "${failed[@]}" > "$RESULTS/$job.failed"
}

JOBS_LIST=()
for cpu in $CPUS; do
    case "$cpu" in cortex-a76|cortex-a72|cortex-a55|cortex-a53|neoverse-n1) ;;
        *) finish FAILED "unknown CPU model '$cpu'" 1 ;; esac
done
job_cpu() { case "$1" in a76-*) echo cortex-a76 ;; a72-*) echo cortex-a72 ;; *) echo "$1" ;; esac; }
# Order (cold CPU seconds, benchmarks/README.md): the two kernel jobs side by side first (~295 s
# each); then a76-int4 (~345 s, reusing the Q4_0 row kernels a76-kernels compiled) and a72-int8
# (~200 s), and a76-f32 (~120 s) in whichever slot frees first: both cores busy to near the end.
for job in a76-kernels a72-kernels a76-int4 a72-int8 a76-f32 cortex-a55 cortex-a53 neoverse-n1; do
    case " $CPUS " in *" $(job_cpu "$job") "*) JOBS_LIST+=("$job") ;; esac
done
if [ -n "${MINILM_AARCH64_TESTS:-}" ]; then   # debugging: one job per CPU model
    JOBS_LIST=(); for cpu in $CPUS; do JOBS_LIST+=("$cpu"); done
fi
RESULTS=$(mktemp -d /tmp/check_aarch64.XXXXXX)
# Side by side, as many as there are cores (each emulated process compiles on one core).
JOBS=${MINILM_AARCH64_JOBS:-$(nproc)}
say "jobs: ${JOBS_LIST[*]} ($JOBS at a time)"
running=0
for job in "${JOBS_LIST[@]}"; do
    if [ "$JOBS" -gt 1 ]; then
        if [ "$running" -ge "$JOBS" ]; then wait -n; running=$(( running - 1 )); fi
        check_job "$job" & running=$(( running + 1 ))
    else
        check_job "$job"
    fi
done
wait
FAILED=()
for job in "${JOBS_LIST[@]}"; do
    if [ -e "$RESULTS/$job.failed" ]; then
        while read -r f; do [ -n "$f" ] && FAILED+=("$f"); done < "$RESULTS/$job.failed"
    else
        FAILED+=("$job:no-result")
    fi
done
rm -rf "$RESULTS"

if [ ${#FAILED[@]} -eq 0 ]; then
    finish PASSED "aarch64 under qemu: $CPUS" 0
else
    finish FAILED "${FAILED[*]}" 1
fi
