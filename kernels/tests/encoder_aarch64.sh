#!/usr/bin/env bash
# The native encoder's AArch64 paths, built with Debian's cross compiler and run under qemu-user:
# kernels/tests/encoder_check.cpp (tiny random weights against a double-precision reference, every
# path the emulated CPU runs, bit-for-bit batch/padding/thread invariance) and the decoder's check.
#   - qemu's default CPU ("max": FEAT_DotProd, FEAT_I8MM): neon_i8mm, neon and generic;
#   - -cpu neoverse-n1 (dot product, no i8mm): neon and generic, chosen at run time;
#   - -cpu cortex-a53 (ARMv8.0, no dot product): only the generic path.
# Needs g++-aarch64-linux-gnu and qemu-user (apt); Python is not involved.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build="${1:-$(mktemp -d)/aarch64}"
cmake -S . -B "$build" -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DCMAKE_BUILD_TYPE=Release \
  -DSPANRT_BUILD_PYTHON=OFF -DSPANRT_BUILD_TESTS=ON -DSPANRT_CUDA=OFF -DSPANRT_ENCODER=ON \
  "-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64;-L;/usr/aarch64-linux-gnu" >"$build.cmake.log"
cmake --build "$build" -j2 --target encoder_check span_search_check
echo "-- ctest (every test program under qemu-aarch64)"
(cd "$build" && ctest --output-on-failure)
run() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$@"; }
echo "-- qemu-aarch64 (cpu max: dotprod, i8mm)"
out=$(run "$build/encoder_check")
echo "$out"
grep -q "paths here: neon_i8mm neon generic" <<<"$out" || { echo "expected the neon_i8mm, neon and generic paths on qemu's max CPU"; exit 1; }
echo "-- qemu-aarch64 -cpu neoverse-n1 (dot product, no i8mm)"
out=$(run -cpu neoverse-n1 "$build/encoder_check")
echo "$out"
grep -q "paths here: neon generic$" <<<"$out" || { echo "expected the neon and generic paths on a Neoverse N1"; exit 1; }
echo "-- qemu-aarch64 -cpu cortex-a53 (no dot product)"
out=$(run -cpu cortex-a53 "$build/encoder_check")
echo "$out"
grep -q "paths here: generic$" <<<"$out" || { echo "expected only the generic path on a Cortex-A53"; exit 1; }
echo "aarch64 checks passed"
