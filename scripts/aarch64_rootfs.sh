#!/usr/bin/env bash
# Library for scripts/check_aarch64.sh: the Debian bookworm arm64 root filesystem and the
# aarch64 wheels it installs offline. Sourced, not run; every function logs with `say`.
#
# Cached state (all under $MINILM_AARCH64_CACHE, default ~/.cache/minilm):
#   arm64-rootfs/            bookworm arm64 (minbase + python3) and /opt/minilm-venv with minilm's
#                            dependencies; .minilm-rootfs-ok holds the recipe key it was built by
#   arm64-wheels/            manylinux aarch64 cp311 wheels from `pip download` on the host
# Nothing of the build runs emulated except a few seconds of checks: debootstrap's first stage
# (download + unpack of the essential packages) and dpkg-deb unpack the rest on the host (the
# emulated second stage, which runs every maintainer script, took ~6 min and python needs none
# of them), and the host's pip installs the aarch64 wheels into the venv (--target --platform).
# A build goes to arm64-rootfs.partial and is renamed only when complete, so an interrupted build
# never leaves a half-made cache behind. Network steps have time limits, so nothing here hangs.

AARCH64_CACHE="${MINILM_AARCH64_CACHE:-$HOME/.cache/minilm}"
ROOTFS="$AARCH64_CACHE/arm64-rootfs"
WHEELS="$AARCH64_CACHE/arm64-wheels"
DEBIAN_MIRROR="${MINILM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# minilm's runtime dependencies (pyproject.toml) plus pytest; aarch64 wheels for CPython 3.11.
AARCH64_REQUIREMENTS=(
    "numpy>=1.24" "numba>=0.59" "safetensors>=0.4" "tokenizers>=0.15" "huggingface-hub>=0.20"
    "jinja2>=3.1" "tqdm>=4.60" "pytest>=7"
)

say() { printf '[check_aarch64 %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Step timing: `step_start` then `step_done LABEL` logs the wall time and the CPU time (user + sys)
# of every child process waited for in between (qemu included). CPU time is the steadier figure
# on a loaded machine. The counters are this shell's cutime + cstime (/proc/PID/stat, in ticks).
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# $BASHPID, not $$: a step may run in a background subshell (the CPU models run side by side).
_child_ticks() { local s; read -r -a s < "/proc/$BASHPID/stat"; TICKS=$(( s[15] + s[16] )); }
step_start() { STEP_T0=$(date +%s); _child_ticks; STEP_C0=$TICKS; }
step_done() {
    _child_ticks
    local c=$(( TICKS - STEP_C0 ))
    say "$1: $(( $(date +%s) - STEP_T0 )) s wall, $(( c / CLK_TCK )).$(( c * 10 / CLK_TCK % 10 )) s CPU"
}

# Makes aarch64 ELF binaries runnable through binfmt_misc. Returns 0 when they are, else 1 with
# the reason on stderr. Needs root (mounting binfmt_misc, registering the handler).
ensure_binfmt() {
    local bm=/proc/sys/fs/binfmt_misc
    if [ ! -e "$bm/status" ]; then
        mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null || {
            say "binfmt_misc is not mounted and cannot be mounted here"; return 1; }
    fi
    if [ ! -e "$bm/qemu-aarch64" ]; then
        if command -v update-binfmts >/dev/null; then
            update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
        fi
    fi
    if [ ! -e "$bm/qemu-aarch64" ]; then
        say "no qemu-aarch64 handler in $bm (update-binfmts --enable qemu-aarch64 did not register one)"
        return 1
    fi
    if ! grep -q '^enabled' "$bm/qemu-aarch64"; then
        echo 1 > "$bm/qemu-aarch64" 2>/dev/null || { say "qemu-aarch64 handler is disabled"; return 1; }
    fi
    # The F flag opens the interpreter at registration, so it works inside a chroot without a
    # copy of qemu there; without F the chroot needs /usr/bin/qemu-aarch64-static (copied anyway).
    return 0
}

# Cache keys: hashes of the code that builds a cache and of its inputs. A wheel cache or rootfs
# stamped with another key is rebuilt, so a recipe change is never masked by an old cache.
wheels_key() {
    { declare -f ensure_wheels; printf '%s\n' "${PIP_AARCH64[@]}" "${AARCH64_REQUIREMENTS[@]}"; } |
        sha256sum | cut -c1-16
}
rootfs_key() {
    { wheels_key; declare -f ensure_rootfs unpack_debs arm_exec; echo "$DEBIAN_MIRROR"; } | sha256sum | cut -c1-16
}
# pip's selection of aarch64 CPython 3.11 wheels (download and install use the same tags).
PIP_AARCH64=(--only-binary=:all: --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
             --platform manylinux_2_28_aarch64 --platform linux_aarch64 --python-version 3.11
             --implementation cp --abi cp311 --abi abi3 --abi none)

# Downloads (once) the aarch64 wheels minilm needs, with the host's pip and its configured
# indexes (the emulated run never touches the network). Returns 2 when the download fails (an
# environmental failure: no network or index), 0 when the wheels are there.
ensure_wheels() {
    local stamp="$WHEELS/.complete" key
    key=$(wheels_key)
    if [ -e "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        say "aarch64 wheels cached in $WHEELS ($(ls "$WHEELS"/*.whl | wc -l) wheels)"
        return 0
    fi
    python3 -m pip --version >/dev/null 2>&1 || { say "the host's python3 has no pip"; return 2; }
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    say "downloading aarch64 cp311 wheels into $WHEELS"
    step_start
    timeout -k 10 600 python3 -m pip download -q --timeout 30 --retries 3 --dest "$WHEELS" \
        "${PIP_AARCH64[@]}" "${AARCH64_REQUIREMENTS[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) ||
        { say "pip download of aarch64 wheels failed (network or package index)"; return 2; }
    echo "$key" > "$stamp"
    step_done "wheels: pip download ($(ls "$WHEELS"/*.whl | wc -l) wheels)"
}

# unpack_debs ROOT: unpacks into ROOT every package debootstrap's first stage downloaded but left
# packed (all but the essential set, which it unpacked itself). Files already there are kept,
# and the merged-/usr directory links (/bin -> usr/bin ...) are followed, as debootstrap does.
# umount_under DIR: lazily unmounts whatever is mounted at or below DIR (the check's /dev, /proc,
# repo binds, left behind by a killed run), deepest first. Called before DIR is deleted (rm -rf
# would otherwise descend into the host's /dev) or mounted into again.
umount_under() {
    local d m
    d=$(realpath -m "$1")
    awk -v d="$d" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" || say "umount -l $m failed"; done
}

# arm_exec ROOT PROGRAM ARGS...: runs one aarch64 program in ROOT: through the static qemu copied
# there on x86_64 (works with or without binfmt_misc), natively on aarch64.
arm_exec() {
    local root="$1" qemu=(); shift
    [ "$(uname -m)" = aarch64 ] || qemu=(/usr/bin/qemu-aarch64-static)
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$(command -v chroot)" "$root" "${qemu[@]}" "$@"
}

unpack_debs() {
    local deb
    for deb in "$1"/var/cache/apt/archives/*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | tar -x --skip-old-files --keep-directory-symlink -C "$1" -f - ||
            { say "unpacking $(basename "$deb") failed"; return 1; }
    done
}

# Builds (once) the bookworm arm64 root filesystem. Returns 0 when it is ready, 2 when a download
# failed (environmental), 1 when the build itself failed. Stages, each timed:
#   debootstrap --foreign (host): resolves, downloads and unpacks the essential packages
#   unpack (host): dpkg-deb unpacks python3 and the rest; /etc/passwd, /etc/group as base-passwd
#     would write them
#   venv (emulated, seconds): ldconfig, `python3 -m venv --without-pip`: proves the unpacked
#     python runs
#   wheels (host): pip installs the cached aarch64 wheels into the venv's site-packages
ensure_rootfs() {
    local key part="$ROOTFS.partial" site rc
    key=$(rootfs_key)
    if [ -e "$ROOTFS/.minilm-rootfs-ok" ] && [ "$(cat "$ROOTFS/.minilm-rootfs-ok")" = "$key" ]; then
        say "arm64 rootfs cached in $ROOTFS"
        return 0
    fi
    ensure_wheels || return $?
    umount_under "$part"; rm -rf --one-file-system "$part"
    if [ -e "$ROOTFS" ]; then
        say "rootfs $ROOTFS is from another recipe; rebuilding"
        umount_under "$ROOTFS"; rm -rf --one-file-system "$ROOTFS" || return 1
    fi
    mkdir -p "$part"
    say "debootstrap --foreign (bookworm arm64 minbase + python3) into $part"
    step_start
    timeout -k 10 900 debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 \
        bookworm "$part" "$DEBIAN_MIRROR" > "$AARCH64_CACHE/debootstrap-stage1.log" 2>&1 || {
        say "debootstrap --foreign failed (network or mirror $DEBIAN_MIRROR); see $AARCH64_CACHE/debootstrap-stage1.log"
        return 2; }
    step_done "rootfs: debootstrap --foreign"
    step_start
    local ndeb; ndeb=$(ls "$part"/var/cache/apt/archives/*.deb | wc -l)
    unpack_debs "$part" || return 1
    cp "$part/usr/share/base-passwd/passwd.master" "$part/etc/passwd" &&
        cp "$part/usr/share/base-passwd/group.master" "$part/etc/group" || return 1
    # The first stage leaves /proc a link to the host's /proc (the second stage would replace it):
    # a directory, so that the check's proc mount lands inside the rootfs.
    rm -f "$part/proc" && mkdir -p "$part/proc" || return 1
    rm -rf "$part/var/cache/apt/archives/"*.deb "$part/debootstrap"
    if [ -x /usr/bin/qemu-aarch64-static ]; then cp /usr/bin/qemu-aarch64-static "$part/usr/bin/"; fi
    step_done "rootfs: unpack $ndeb packages (host)"
    step_start
    { arm_exec "$part" /sbin/ldconfig && arm_exec "$part" /usr/bin/python3 -m venv --without-pip /opt/minilm-venv; } \
        > "$AARCH64_CACHE/rootfs-venv.log" 2>&1 || {
        say "the unpacked python3 did not run (ldconfig; python3 -m venv); see $AARCH64_CACHE/rootfs-venv.log"
        return 1; }
    step_done "rootfs: ldconfig + venv (emulated)"
    step_start
    site=$(ls -d "$part"/opt/minilm-venv/lib/python3*/site-packages) || return 1
    # The host's pip (same CPython 3.11 bytecode, so its .pyc files serve the emulated python)
    # installs the downloaded wheels as they are: no index, no dependency resolution.
    timeout -k 10 600 python3 -m pip install -q --no-index --no-deps --target "$site" "${PIP_AARCH64[@]}" \
        "$WHEELS"/*.whl > "$AARCH64_CACHE/rootfs-pip.log" 2>&1 || {
        say "pip install --target of the aarch64 wheels failed; see $AARCH64_CACHE/rootfs-pip.log"; return 1; }
    rm -rf "$site/bin"    # console scripts with the host's #! line; the check runs python -m
    step_done "rootfs: pip install --target (host)"
    echo "$key" > "$part/.minilm-rootfs-ok"
    mv "$part" "$ROOTFS"
}

# rootfs_ready: 0 when the rootfs is built and stamped with this recipe's key (ensure_rootfs
# would only say so), else 1.
rootfs_ready() {
    [ -e "$ROOTFS/.minilm-rootfs-ok" ] && [ "$(cat "$ROOTFS/.minilm-rootfs-ok")" = "$(rootfs_key)" ]
}
