#!/usr/bin/env bash
# Cross-compiles llama-cpp-python (the version pinned in pyproject.toml) for 64-bit ARM boards on an x86-64
# (or arm64) Debian workstation, without an ARM machine and without building on the board.
#
#   packaging/build-llama-aarch64.sh [OUT_DIR]      default OUT_DIR: /var/cache/edge-agent-arm64/wheels
#
# llama-cpp-python loads llama.cpp through ctypes, so its wheel is Python code plus .so files: built with
# Debian's aarch64 cross compiler (g++-aarch64-linux-gnu) it runs on any aarch64 Python (3.11 and 3.13 alike).
# One wheel serves every board: ggml is built with GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, one CPU backend
# per ARM feature level, and loads at run time the best one this CPU supports (armv8.0 on a Pi 3 / Zero 2 W /
# Pi 4, armv8.2 with dotprod and fp16 on a Pi 5). Measured: docs/operations.md, "The offline aarch64 bundle".
# Environment: WORK (build folder, default /var/cache/edge-agent-arm64/build), JOBS (parallel compiles, nproc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
OUT=${1:-/var/cache/edge-agent-arm64/wheels}
WORK=${WORK:-/var/cache/edge-agent-arm64/build}
JOBS=${JOBS:-$(nproc)}
version=$(grep -o 'llama-cpp-python==[0-9.]*' "$repo/pyproject.toml" | head -1 | cut -d= -f3)
[ -n "$version" ] || { echo "no llama-cpp-python==VERSION pin in pyproject.toml" >&2; exit 1; }

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v cmake >/dev/null || need+=(cmake)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "missing Debian packages: ${need[*]} (apt-get install them as root)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

mkdir -p "$OUT" "$WORK/sdist"
existing=$(ls "$OUT"/llama_cpp_python-"$version"-*linux_aarch64.whl 2>/dev/null | head -1 || true)
if [ -n "$existing" ]; then
  echo "==> $existing already built (remove it to build again)"
  exit 0
fi
# A build venv of our own: pip's build isolation fetches scikit-build-core; `wheel tags` retags the result.
[ -x "$WORK/venv/bin/python" ] || python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check wheel
sdist=$(ls "$WORK"/sdist/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
  "$WORK/venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "llama-cpp-python==$version" -d "$WORK/sdist"
  sdist="$WORK/sdist/llama_cpp_python-$version.tar.gz"
fi
src="$WORK/llama_cpp_python-$version"
rm -rf "$src" && tar -xzf "$sdist" -C "$WORK"

# GCC 12 (bookworm) cannot compile SME (-march=...+sme, the armv9.2 variants); no Pi-class board has SME.
if ! echo 'int f(void){return 0;}' | aarch64-linux-gnu-gcc -march=armv8.2-a+sme -x c -c -o /dev/null - 2>/dev/null; then
  sed -i '/ggml_add_cpu_backend_variant(armv9\.2_[0-9]/d' "$src/vendor/llama.cpp/ggml/src/CMakeLists.txt"
  echo "==> $(aarch64-linux-gnu-gcc -dumpversion): no SME support, the armv9.2 (SME) variants are left out"
fi
# With GGML_BACKEND_DL nothing loads a backend from the package's own folder (ggml looks next to the
# executable, python3, and in the current folder): load the best CPU variant from llama_cpp/lib when the
# module loads, before llama_backend_init() would look elsewhere.
python3 - "$src/llama_cpp/llama_cpp.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
anchor = "_lib = load_shared_library(_lib_base_name, _base_path)\n"
assert anchor in text, "llama_cpp.py changed: the CPU-variant loader needs a new anchor"
loader = anchor + '''
# edge-agent aarch64 bundle (packaging/build-llama-aarch64.sh): ggml's CPU backends are separate modules,
# one per ARM feature level; load the best one for this CPU from this folder.
# Through libllama's own handle: dlsym searches its dependencies, so this is the libggml it uses (a separate
# CDLL("libggml.so") would be a second copy with a registry of its own: wheels hold copies, not symlinks).
_lib.ggml_backend_reg_count.restype = ctypes.c_size_t
if _lib.ggml_backend_reg_count() == 0:
    _lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    _lib.ggml_backend_load_all_from_path(str(_base_path).encode())
'''
open(path, "w").write(text.replace(anchor, loader, 1))
PY

export CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$here/cmake/aarch64-linux-gnu.cmake \
 -DCMAKE_PROJECT_INCLUDE=$here/cmake/llama-cpu-variants.cmake \
 -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_OPENMP=OFF \
 -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
start=$(date +%s)
echo "==> cross-compiling llama-cpp-python $version for aarch64 ($JOBS jobs)"
rm -rf "$WORK/dist" && mkdir -p "$WORK/dist"
"$WORK/venv/bin/python" -m pip wheel -v --disable-pip-version-check --no-deps --no-cache-dir "$src" -w "$WORK/dist" \
    > "$WORK/pip-wheel.log" 2>&1 || { tail -40 "$WORK/pip-wheel.log" >&2; exit 1; }
built=$(ls "$WORK"/dist/llama_cpp_python-*.whl)
# Built on x86 the wheel is tagged linux_x86_64; what it holds is aarch64 code for any Python 3.
"$WORK/venv/bin/python" -m wheel tags --remove --platform-tag linux_aarch64 "$built" >/dev/null
wheel=$(ls "$WORK"/dist/llama_cpp_python-*linux_aarch64.whl)
check="$WORK/check" && rm -rf "$check" && mkdir -p "$check" && (cd "$check" && python3 -m zipfile -e "$wheel" .)
libs=$(ls "$check"/llama_cpp/lib/*.so)
for so in $libs; do
  file -b "$so" | grep -q 'ARM aarch64' || { echo "$so is not an aarch64 library" >&2; exit 1; }
done
variants=$(ls "$check"/llama_cpp/lib/ | sed -n 's/^libggml-cpu-\(.*\)\.so$/\1/p' | tr '\n' ' ')
[ -n "$variants" ] || { echo "no CPU variants in the wheel" >&2; exit 1; }
glibc=$(for so in $libs; do aarch64-linux-gnu-objdump -T "$so"; done | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
cp "$wheel" "$OUT/"
echo "==> $(basename "$wheel"): $(du -h "$wheel" | cut -f1), CPU variants: $variants; needs $glibc; built in $(( $(date +%s) - start )) s"
