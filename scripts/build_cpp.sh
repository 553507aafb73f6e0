#!/usr/bin/env bash
# Build the C++ consumer (examples/cpp) against the ONNX Runtime library of .venv's onnxruntime wheel.
#
#   bash scripts/build_cpp.sh            # -> build/cpp/bin/codegen_generate, codegen_tokenize
#
# The wheel ships libonnxruntime.so.1.<ver> but no headers; the C/C++ headers come from Debian's
# libonnxruntime-dev (trixie and later; 1.21 headers serve the newer library: the C API is ABI-stable), and
# nlohmann-json3-dev gives the JSON library. Both are fetched with `apt-get download` + `dpkg -x` into
# build/cpp/deps (no root, nothing installed system-wide): on Debian 13+ through the system's apt, on
# bookworm (which has no libonnxruntime-dev) through a private apt configuration for the trixie suite.
# Headers installed on the system (/usr/include/onnxruntime, /usr/include/nlohmann) are used as they are.
#
# Exit codes: 0 built; 77 a prerequisite cannot be had here (no compiler, CMake, onnxruntime wheel, apt or
# network): the tests skip with the printed reason; anything else is a real failure (a compile error).
# Re-running is cheap: fetched packages are kept and CMake rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${CODEGEN_CPP_BUILD:-$REPO/build/cpp}
DEPS=$OUT/deps
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

unavailable() { echo "build_cpp: unavailable: $*" >&2; exit 77; }

CXX_BIN=$(command -v "${CXX:-c++}" || command -v g++ || true)
[ -n "$CXX_BIN" ] || unavailable "no C++ compiler (install g++)"
command -v cmake >/dev/null || unavailable "no cmake (install cmake)"

# ONNX Runtime's library from the wheel, under the names the linker (libonnxruntime.so) and the loader
# (libonnxruntime.so.1, its SONAME) look for.
CAPI=$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' \
  2>/dev/null) || unavailable "no onnxruntime in $PYTHON (run scripts/setup.sh)"
LIBFILE=$(ls "$CAPI"/libonnxruntime.so.1.* 2>/dev/null | head -n 1)
[ -n "$LIBFILE" ] || unavailable "no libonnxruntime.so.1.* in $CAPI"
mkdir -p "$DEPS/lib"
ln -sfn "$LIBFILE" "$DEPS/lib/libonnxruntime.so"
ln -sfn "$LIBFILE" "$DEPS/lib/libonnxruntime.so.1"

# fetch PACKAGE: download and unpack a .deb into $DEPS/root (kept for the next run).
fetch() {
  local pkg=$1 dl=$DEPS/download/$1
  [ -e "$DEPS/root/.$pkg" ] && return 0
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || unavailable "no apt-get/dpkg to fetch $pkg"
  rm -rf "$dl" && mkdir -p "$dl"
  local codename
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
  # The system's apt first where its suite has the package (Debian 13 and later).
  if [ "$codename" != bookworm ] && [ "$codename" != bullseye ] \
    && (cd "$dl" && apt-get -q -o APT::Sandbox::User="$(id -un)" download "$pkg" >/dev/null 2>&1); then
    :
  else
    # A private apt configuration for trixie: its own sources, package lists and cache; the system's
    # sources, lists and dpkg status are neither read nor changed.
    [ -r "$KEYRING" ] || unavailable "no Debian archive keyring at $KEYRING to fetch $pkg from trixie"
    local apt=$DEPS/apt
    mkdir -p "$apt/lists/partial" "$apt/parts" "$apt/cache/archives/partial"
    echo "deb [signed-by=$KEYRING] $MIRROR trixie main" >"$apt/sources.list"
    local opts=(-q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts="$apt/parts"
      -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Dir::State::status=/dev/null
      -o APT::Sandbox::User="$(id -un)")
    if ! ls "$apt/lists/"*_Packages* >/dev/null 2>&1; then
      # apt-get update exits 0 when a mirror cannot be reached: the lists it wrote are the test.
      apt-get "${opts[@]}" update >"$apt/update.log" 2>&1
      ls "$apt/lists/"*_Packages* >/dev/null 2>&1 \
        || unavailable "cannot read the trixie package lists from $MIRROR ($(tail -n 1 "$apt/update.log"))"
    fi
    (cd "$dl" && apt-get "${opts[@]}" download "$pkg" >"$dl/download.log" 2>&1) \
      || unavailable "cannot download $pkg ($(tail -n 1 "$dl/download.log"))"
  fi
  dpkg -x "$dl"/"$pkg"_*.deb "$DEPS/root"
  touch "$DEPS/root/.$pkg"
}

if [ -n "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then
  ORT_INCLUDE=$ONNXRUNTIME_INCLUDE_DIR
elif [ -f /usr/include/onnxruntime/onnxruntime_cxx_api.h ]; then
  ORT_INCLUDE=/usr/include/onnxruntime
else
  fetch libonnxruntime-dev
  ORT_INCLUDE=$DEPS/root/usr/include/onnxruntime
fi
[ -f "$ORT_INCLUDE/onnxruntime_cxx_api.h" ] || unavailable "no onnxruntime_cxx_api.h in $ORT_INCLUDE"

PREFIX_PATH=""
if [ ! -f /usr/include/nlohmann/json.hpp ]; then
  fetch nlohmann-json3-dev
  PREFIX_PATH=$DEPS/root/usr
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
# A cache made by another generator cannot be reused: start that build folder again.
if [ -f "$OUT/build/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]:-Unix Makefiles}\$" \
  "$OUT/build/CMakeCache.txt"; then
  rm -rf "$OUT/build"
fi
cmake -S examples/cpp -B "$OUT/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$CXX_BIN" \
  -DONNXRUNTIME_INCLUDE_DIR="$ORT_INCLUDE" -DONNXRUNTIME_LIBRARY="$DEPS/lib/libonnxruntime.so" \
  -DCMAKE_PREFIX_PATH="$PREFIX_PATH" -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$OUT/bin" >"$OUT/cmake.log" 2>&1 \
  || { cat "$OUT/cmake.log" >&2; exit 1; }
nice cmake --build "$OUT/build" -j "${CODEGEN_CPP_JOBS:-2}"
echo "build_cpp: built $OUT/bin (ONNX Runtime $(basename "$LIBFILE"), headers $ORT_INCLUDE)"
