#!/usr/bin/env bash
# Library for scripts/check_aarch64.sh: the Debian bookworm arm64 root filesystem and the
# aarch64 wheels it installs offline. Sourced, not run; every function logs with `say`.
#
# Cached state (all under $MINILM_AARCH64_CACHE, default ~/.cache/minilm):
#   arm64-rootfs/            debootstrap'd bookworm arm64 (minbase + python3 + python3-venv),
#                            /opt/minilm-venv inside with minilm's dependencies, .minilm-rootfs-ok
#   arm64-wheels/            manylinux aarch64 cp311 wheels from `pip download` on the host
# A build goes to arm64-rootfs.partial and is renamed only when complete, so an interrupted build
# never leaves a half-made cache behind.

AARCH64_CACHE="${MINILM_AARCH64_CACHE:-$HOME/.cache/minilm}"
ROOTFS="$AARCH64_CACHE/arm64-rootfs"
WHEELS="$AARCH64_CACHE/arm64-wheels"
DEBIAN_MIRROR="${MINILM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump when the recipe below changes: a rootfs with another stamp is rebuilt.
ROOTFS_RECIPE="bookworm-arm64-minbase-py311-v1"
# minilm's runtime dependencies (pyproject.toml) plus pytest; aarch64 wheels for CPython 3.11.
AARCH64_REQUIREMENTS=(
    "numpy>=1.24" "numba>=0.59" "safetensors>=0.4" "tokenizers>=0.15" "huggingface-hub>=0.20"
    "jinja2>=3.1" "tqdm>=4.60" "pytest>=7"
)

say() { printf '[check_aarch64 %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

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

# Downloads (once) the aarch64 wheels minilm needs. Uses only the host's pip and its configured
# indexes; the chroot never touches the network.
ensure_wheels() {
    local stamp="$WHEELS/.complete"
    if [ -e "$stamp" ]; then
        say "aarch64 wheels cached in $WHEELS ($(ls "$WHEELS"/*.whl | wc -l) wheels)"
        return 0
    fi
    mkdir -p "$WHEELS"
    say "downloading aarch64 cp311 wheels into $WHEELS"
    python3 -m pip download -q --dest "$WHEELS" --only-binary=:all: \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
        --platform manylinux_2_28_aarch64 --platform linux_aarch64 \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        "${AARCH64_REQUIREMENTS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) ||
        { say "pip download of aarch64 wheels failed"; return 1; }
    touch "$stamp"
}

# Builds (once) the bookworm arm64 root filesystem: debootstrap --foreign on the host, then the
# second stage emulated through qemu, then a venv with the cached wheels installed offline.
ensure_rootfs() {
    if [ -e "$ROOTFS/.minilm-rootfs-ok" ] && [ "$(cat "$ROOTFS/.minilm-rootfs-ok")" = "$ROOTFS_RECIPE" ]; then
        say "arm64 rootfs cached in $ROOTFS"
        return 0
    fi
    local part="$ROOTFS.partial" t0
    rm -rf "$part"
    [ -e "$ROOTFS" ] && { say "rootfs $ROOTFS is from another recipe; rebuilding"; rm -rf "$ROOTFS"; }
    mkdir -p "$part"
    t0=$(date +%s)
    say "debootstrap first stage (bookworm arm64 minbase) into $part"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv \
        bookworm "$part" "$DEBIAN_MIRROR" > "$AARCH64_CACHE/debootstrap-stage1.log" 2>&1 || {
        say "debootstrap first stage failed; see $AARCH64_CACHE/debootstrap-stage1.log"; return 1; }
    if [ -x /usr/bin/qemu-aarch64-static ]; then cp /usr/bin/qemu-aarch64-static "$part/usr/bin/"; fi
    say "first stage done in $(( $(date +%s) - t0 )) s; second stage under qemu (several minutes)"
    t0=$(date +%s)
    chroot "$part" /debootstrap/debootstrap --second-stage > "$AARCH64_CACHE/debootstrap-stage2.log" 2>&1 || {
        say "debootstrap second stage failed; see $AARCH64_CACHE/debootstrap-stage2.log"; return 1; }
    say "second stage done in $(( $(date +%s) - t0 )) s"
    t0=$(date +%s)
    mkdir -p "$part/opt/wheels"
    cp "$WHEELS"/*.whl "$part/opt/wheels/"
    # No network inside: pip installs only from the copied wheels.
    chroot "$part" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        /bin/sh -c 'python3 -m venv /opt/minilm-venv &&
            /opt/minilm-venv/bin/pip install -q --no-index --find-links /opt/wheels \
                numpy numba safetensors tokenizers huggingface-hub jinja2 tqdm pytest' \
        > "$AARCH64_CACHE/rootfs-pip.log" 2>&1 || {
        say "offline pip install inside the rootfs failed; see $AARCH64_CACHE/rootfs-pip.log"; return 1; }
    rm -rf "$part/opt/wheels" "$part/var/cache/apt/archives/"*.deb
    say "venv with minilm's dependencies installed in $(( $(date +%s) - t0 )) s"
    echo "$ROOTFS_RECIPE" > "$part/.minilm-rootfs-ok"
    mv "$part" "$ROOTFS"
}
