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
# The targets run side by side (one core each); each one's output goes to its log, printed when done.
pids=()
names=(safetensors adapter_config)
for name in "${names[@]}"; do
  work="$build_dir/corpus/$name"
  mkdir -p "$work"
  echo "== fuzzing $name for ${seconds}s (seeds: fuzz/corpus/$name; log: $build_dir/$name.log)"
  # The first directory receives new inputs; the seed directory is only read.
  "$build_dir/fuzz/${name}_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -dict="$RANKWISE_ROOT/fuzz/$name.dict" -print_final_stats=1 "$work" "$RANKWISE_ROOT/fuzz/corpus/$name" \
    >"$build_dir/$name.log" 2>&1 &
  pids+=("$!")
done
failed=0
for i in "${!names[@]}"; do
  status=0
  wait "${pids[$i]}" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "== ${names[$i]}: done; the end of its log:"
    tail -n 12 "$build_dir/${names[$i]}.log"
  else
    echo "== ${names[$i]}: exit status $status; its log:"
    cat "$build_dir/${names[$i]}.log"
    failed=1
  fi
done
[ "$failed" -eq 0 ] || { echo "== fuzzing found a problem (the logs above say where)" >&2; exit 1; }
echo "== fuzzing found nothing"
