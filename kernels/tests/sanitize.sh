#!/usr/bin/env bash
# The decoder and the native encoder under AddressSanitizer + UndefinedBehaviorSanitizer: builds
# engine._kernels and the C++ check drivers with SPANRT_SANITIZE=ON (CPU only) in a temporary folder,
# runs the drivers (C++ decoder against a brute-force loop, edge cases + random cases; the encoder on
# every path this CPU runs against a double-precision reference), then the Python decoder tests
# (tests/test_decode.py, binding included) against that build.
#   usage: kernels/tests/sanitize.sh [PYTHON]     (PYTHON needs numpy, pytest, hypothesis, pybind11)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="$(command -v "${1:-python}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cmake -S "$repo" -B "$work/build" -DSPANRT_SANITIZE=ON -DSPANRT_CUDA=OFF -DSPANRT_ENCODER=ON \
  -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE="$python" \
  -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >"$work/configure.log" \
  || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" -j "$(nproc)"
(cd "$work/build" && ctest --output-on-failure)

# A copy of the engine package holding the sanitized module.
mkdir -p "$work/site"
cp -r "$repo/engine" "$work/site/engine"
rm -f "$work/site/engine"/_kernels*.so "$work/site/engine"/_encoder*.so
cmake --install "$work/build" --prefix "$work/site" >/dev/null

cd "$work/site"  # `python -m` puts the current folder first on sys.path
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# `python -S` skips site-packages' .pth files, so an editable install's import hook cannot route
# `engine` back to the repository's unsanitized module; the packages come from PYTHONPATH instead.
# The check below fails loudly if the wrong module is imported anyway.
export PYTHONPATH="$("$python" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["platlib"])')"
preload="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" "$python" -S -c "
import engine._kernels as k
assert k.SANITIZED, 'imported an unsanitized engine._kernels: ' + k.__file__
print('sanitized module:', k.__file__)"
LD_PRELOAD="$preload" "$python" -S -m pytest "$repo/tests/test_decode.py" -q -p no:cacheprovider
