#!/usr/bin/env bash
# Fuzzes rankwise's file readers: builds the libFuzzer targets of fuzz/ with clang under
# AddressSanitizer + UndefinedBehaviorSanitizer and runs each for a bounded time from its seed
# corpus (fuzz/corpus/<name>/, kept small in the repository; new inputs stay in the build tree).
# Usage: scripts/fuzz.sh [seconds per target]     (default 30, or FUZZ_SECONDS)
# Environment: BUILD_DIR (default build/fuzz). Installs clang and its runtime libraries if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

seconds="${1:-${FUZZ_SECONDS:-30}}"
rankwise_install_packages clang libclang-rt-dev
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/fuzz}"
echo "== configuring $build_dir (clang, -fsanitize=fuzzer,address,undefined)"
rankwise_configure "$build_dir" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRANKWISE_BUILD_FUZZERS=ON -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_EXAMPLES=OFF \
  -DRANKWISE_BUILD_BENCHMARKS=OFF -DRANKWISE_INSTALL=OFF
echo "== building"
cmake --build "$build_dir" -j "$(rankwise_jobs)" --target safetensors_fuzz adapter_config_fuzz

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for name in safetensors adapter_config; do
  work="$build_dir/corpus/$name"
  mkdir -p "$work"
  echo "== fuzzing $name for ${seconds}s (seeds: fuzz/corpus/$name)"
  # The first directory receives new inputs; the seed directory is only read.
  "$build_dir/fuzz/${name}_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -dict="$RANKWISE_ROOT/fuzz/$name.dict" -print_final_stats=1 "$work" "$RANKWISE_ROOT/fuzz/corpus/$name"
done
echo "== fuzzing found nothing"
