#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench` from the llama.cpp sources vendored in the llama-cpp-python
# sdist, so `minilm bench --peers llama.cpp` can time llama.cpp the way its users run it (its
# defaults, repacked weights on, its own timing loop).
#
#   benchmarks/build_llama_bench.sh [--version 0.3.36] [--variant NAME] [--cmake-arg -DX=Y ...] [--jobs N]
#
# The result is cached under ${MINILM_CACHE:-~/.cache/minilm}/llama.cpp-<version>[-<variant>]/:
#   bin/llama-bench    the binary (ggml and llama linked statically)
#   build-info.json    llama-cpp-python version, vendored llama.cpp commit, cmake flags, variant
# A second run with the same version and variant finds the binary and only prints its path (the
# last line of stdout is always the binary's path). `--variant` names a build with extra cmake
# arguments, e.g. `--variant noamx --cmake-arg -DGGML_AMX_TILE=OFF --cmake-arg -DGGML_AMX_INT8=OFF`
# for a machine where the default build's AMX path dies of SIGILL while the AVX-512 repacked weights
# stay on; minilm bench reads the variant and flags from build-info.json and names them in its row.
# Needs: pip (to download the sdist), a C++17 compiler, cmake >= 3.14 (installed with apt-get or pip
# when missing). Takes 10-20 minutes on 2 cores. Without --version, a cached build of the variant
# is reused (newest version); otherwise the newest sdist is downloaded.
set -euo pipefail

VERSION=""
VARIANT="default"
JOBS="${JOBS:-2}"
EXTRA_CMAKE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION="$2"; shift 2 ;;
        --variant) VARIANT="$2"; shift 2 ;;
        --cmake-arg) EXTRA_CMAKE+=("$2"); shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build_llama_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$VARIANT" in
    *[!A-Za-z0-9_.-]*|"") echo "build_llama_bench.sh: --variant '$VARIANT' must be letters, digits, '.', '_' or '-'" >&2; exit 2 ;;
esac
if [ "$VARIANT" = "default" ] && [ ${#EXTRA_CMAKE[@]} -gt 0 ]; then
    echo "build_llama_bench.sh: --cmake-arg changes the build: give it a --variant name" >&2; exit 2
fi

CACHE="${MINILM_CACHE:-$HOME/.cache/minilm}"
mkdir -p "$CACHE"
PY="${PYTHON:-python3}"

# --- the sdist (its version names the cache folder) ---
DL="$CACHE/sdist"
mkdir -p "$DL"
if [ -z "$VERSION" ]; then
    SPEC="llama-cpp-python"
else
    SPEC="llama-cpp-python==$VERSION"
fi
if [ -z "$VERSION" ]; then
    # no version asked: a build of this variant already in the cache will do (newest version)
    SUFFIX=""; [ "$VARIANT" = "default" ] || SUFFIX="-$VARIANT"
    for d in $(ls -d "$CACHE"/llama.cpp-* 2>/dev/null | sort -V -r); do
        v="${d##*/llama.cpp-}"; v="${v%"$SUFFIX"}"
        case "$v" in *[!0-9.]*|"") continue ;; esac
        if [ "$d" = "$CACHE/llama.cpp-$v$SUFFIX" ] && [ -x "$d/bin/llama-bench" ] && [ -f "$d/build-info.json" ]; then
            echo ">> cached: $d/bin/llama-bench (pass --version X to build another version)" >&2
            echo "$d/bin/llama-bench"
            exit 0
        fi
    done
fi
SDIST=""
if [ -n "$VERSION" ] && [ -f "$DL/llama_cpp_python-$VERSION.tar.gz" ]; then
    SDIST="$DL/llama_cpp_python-$VERSION.tar.gz"
else
    echo ">> pip download --no-deps --no-binary :all: $SPEC" >&2
    "$PY" -m pip download -q --no-deps --no-binary :all: "$SPEC" -d "$DL" >&2
    if [ -n "$VERSION" ]; then
        SDIST="$DL/llama_cpp_python-$VERSION.tar.gz"
    else
        SDIST="$(ls -t "$DL"/llama_cpp_python-*.tar.gz | head -n 1)"
    fi
fi
[ -f "$SDIST" ] || { echo "build_llama_bench.sh: no sdist found in $DL after pip download" >&2; exit 1; }
VERSION="$(basename "$SDIST" .tar.gz)"; VERSION="${VERSION#llama_cpp_python-}"

NAME="llama.cpp-$VERSION"
[ "$VARIANT" = "default" ] || NAME="$NAME-$VARIANT"
ROOT="$CACHE/$NAME"
BIN="$ROOT/bin/llama-bench"
if [ -x "$BIN" ] && [ -f "$ROOT/build-info.json" ]; then
    echo ">> cached: $BIN" >&2
    echo "$BIN"
    exit 0
fi

# --- cmake ---
if ! command -v cmake >/dev/null 2>&1; then
    echo ">> cmake missing: installing it" >&2
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q cmake >&2 || "$PY" -m pip install -q cmake >&2
    else
        "$PY" -m pip install -q cmake >&2
    fi
fi
command -v cmake >/dev/null 2>&1 || { echo "build_llama_bench.sh: cmake is not available and could not be installed" >&2; exit 1; }
command -v c++ >/dev/null 2>&1 || { echo "build_llama_bench.sh: no C++ compiler (c++) on PATH: install g++ or clang" >&2; exit 1; }

# --- sources ---
SRC="$ROOT/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$ROOT/unpack"
    mkdir -p "$ROOT/unpack"
    TOP="llama_cpp_python-$VERSION"
    echo ">> unpacking $TOP/vendor/llama.cpp" >&2
    tar xzf "$SDIST" -C "$ROOT/unpack" "$TOP/vendor/llama.cpp"
    tar xzf "$SDIST" -C "$ROOT/unpack" "$TOP/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || true
    rm -rf "$SRC"
    mv "$ROOT/unpack/$TOP/vendor/llama.cpp" "$SRC"
    if [ -f "$ROOT/unpack/$TOP/.git/modules/vendor/llama.cpp/HEAD" ]; then
        cp "$ROOT/unpack/$TOP/.git/modules/vendor/llama.cpp/HEAD" "$ROOT/llama.cpp-commit"
    fi
    rm -rf "$ROOT/unpack"
fi
COMMIT="unknown"
[ -f "$ROOT/llama.cpp-commit" ] && COMMIT="$(head -c 40 "$ROOT/llama.cpp-commit")"

# --- build: llama.cpp's defaults for a native build, only what llama-bench needs ---
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_OPENSSL=OFF
    "-DLLAMA_BUILD_COMMIT=${COMMIT:0:7}"
    ${EXTRA_CMAKE[@]+"${EXTRA_CMAKE[@]}"}
)
echo ">> cmake ${CMAKE_ARGS[*]}" >&2
cmake -S "$SRC" -B "$ROOT/build" "${CMAKE_ARGS[@]}" >"$ROOT/cmake-configure.log" 2>&1 \
    || { tail -n 30 "$ROOT/cmake-configure.log" >&2; echo "build_llama_bench.sh: cmake configure failed (log: $ROOT/cmake-configure.log)" >&2; exit 1; }
echo ">> cmake --build -j$JOBS --target llama-bench (log: $ROOT/build.log)" >&2
cmake --build "$ROOT/build" -j"$JOBS" --target llama-bench >"$ROOT/build.log" 2>&1 \
    || { tail -n 30 "$ROOT/build.log" >&2; echo "build_llama_bench.sh: build failed (log: $ROOT/build.log)" >&2; exit 1; }
FOUND="$(find "$ROOT/build" -type f -name llama-bench -perm -u+x | head -n 1)"
[ -n "$FOUND" ] || { echo "build_llama_bench.sh: the build finished but no llama-bench binary was found under $ROOT/build" >&2; exit 1; }
mkdir -p "$ROOT/bin"
cp "$FOUND" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"

# what the benchmark row names: version, commit, flags, variant, compiler
"$PY" - "$ROOT/build-info.json" "$VERSION" "$COMMIT" "$VARIANT" "$(c++ --version | head -n 1)" "${CMAKE_ARGS[@]}" <<'EOF'
import json, sys
out, version, commit, variant, cxx, *flags = sys.argv[1:]
with open(out, "w") as f:
    json.dump({"llama_cpp_python": version, "llama_cpp_commit": commit, "variant": variant,
               "cmake_args": flags, "compiler": cxx}, f, indent=1)
EOF
echo ">> built $BIN" >&2
echo "$BIN"
