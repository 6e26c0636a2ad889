#!/usr/bin/env bash
# Fuzzes rankwise's file readers and loaders: builds the libFuzzer programs of fuzz/ with clang under
# AddressSanitizer + UndefinedBehaviorSanitizer and runs each target for a bounded time from its
# corpus, as many at a time as there are cores (fuzz/targets.hpp lists the targets:
# safetensors, adapter_config, adapter_directory, checkpoint).
# Usage: scripts/fuzz.sh [--merge] [--seeds] [seconds per target] [target...]
#   seconds     default 30 (or FUZZ_SECONDS); continuous integration runs the default
#   target...   default: all of them
#   --merge     afterwards, add the inputs found that reach new code to the repository's corpus
#               (fuzz/corpus/<target>/, libFuzzer's -merge=1), to be committed
#   --seeds     first rebuild the seeds of the structured targets with the library's writers
#               (fuzz/make_seeds.cpp, into fuzz/corpus/; after a format change), then fuzz
# The corpus in the repository is only read while fuzzing; new inputs go to BUILD_DIR/corpus/<target>/.
# On a finding (crash, timeout, leak, out of memory) the input libFuzzer saved is copied to
# fuzz/corpus/<target>/ (crash-<sha1>, ...): the replay test (ctest fuzz_corpus_replay) then fails
# on it until the defect is fixed, and the file stays there as a regression input.
# Environment: BUILD_DIR (default build/fuzz), FUZZ_JOBS (targets at a time, default: the cores).
# Installs clang and its runtime libraries if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

all_targets=(safetensors adapter_config adapter_directory checkpoint)
merge=0
seeds=0
seconds="${FUZZ_SECONDS:-30}"
names=()
for arg in "$@"; do
  case "$arg" in
    --merge) merge=1 ;;
    --seeds) seeds=1 ;;
    --help | -h) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *[!0-9]*)
      [[ " ${all_targets[*]} " == *" $arg "* ]] || { echo "error: unknown target '$arg' (targets: ${all_targets[*]})" >&2; exit 2; }
      names+=("$arg") ;;
    *) seconds="$arg" ;;
  esac
done
[ "${#names[@]}" -gt 0 ] || names=("${all_targets[@]}")

rankwise_install_packages clang libclang-rt-dev
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/fuzz}"
echo "== configuring $build_dir (clang, -fsanitize=fuzzer,address,undefined)"
# -O1 -g1: about half the compile time of RelWithDebInfo's -O2 -g, for the same sanitizer checks.
rankwise_configure "$build_dir" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1" \
  -DRANKWISE_BUILD_FUZZERS=ON -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_EXAMPLES=OFF \
  -DRANKWISE_BUILD_BENCHMARKS=OFF -DRANKWISE_INSTALL=OFF
echo "== building"
# The fuzzers (all of them, in parallel, unless targets were named); the seed generator only with --seeds.
if [ "${#names[@]}" -eq "${#all_targets[@]}" ]; then
  cmake --build "$build_dir" -j "$(rankwise_jobs)"
else
  for name in "${names[@]}"; do cmake --build "$build_dir" -j "$(rankwise_jobs)" --target "${name}_fuzz"; done
fi
if [ "$seeds" -eq 1 ]; then
  cmake --build "$build_dir" -j "$(rankwise_jobs)" --target rankwise_fuzz_seeds
  echo "== writing the seeds of the structured targets into fuzz/corpus/"
  "$build_dir/fuzz/rankwise_fuzz_seeds" "$RANKWISE_ROOT/fuzz/corpus"
fi

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
jobs="${FUZZ_JOBS:-$(rankwise_jobs)}"
# One target per core at a time; each one's output goes to its log, printed when all are done.
fuzz_one() {
  local name="$1" work="$build_dir/corpus/$1" artifacts="$build_dir/artifacts/$1/"
  rm -rf "$artifacts"
  mkdir -p "$work" "$artifacts"
  # The first directory receives new inputs; the repository's corpus is only read.
  "$build_dir/fuzz/${name}_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -dict="$RANKWISE_ROOT/fuzz/$name.dict" -artifact_prefix="$artifacts" -print_final_stats=1 \
    "$work" "$RANKWISE_ROOT/fuzz/corpus/$name" >"$build_dir/$name.log" 2>&1
}
pids=()
running=0
for name in "${names[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true  # the statuses are collected below
    running=$((running - 1))
  fi
  echo "== fuzzing $name for ${seconds}s (corpus: fuzz/corpus/$name; log: $build_dir/$name.log)"
  fuzz_one "$name" &
  pids+=("$!")
  running=$((running + 1))
done

failed=0
for i in "${!names[@]}"; do
  name="${names[$i]}"
  status=0
  wait "${pids[$i]}" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "== $name: done; the end of its log:"
    tail -n 12 "$build_dir/$name.log"
    continue
  fi
  echo "== $name: exit status $status; its log:"
  cat "$build_dir/$name.log"
  failed=1
  for artifact in "$build_dir/artifacts/$name"/{crash,timeout,leak,oom}-*; do
    [ -e "$artifact" ] || continue
    cp "$artifact" "$RANKWISE_ROOT/fuzz/corpus/$name/"
    echo "== $name: the input is now fuzz/corpus/$name/$(basename "$artifact")"
    echo "   run it again: $build_dir/fuzz/${name}_fuzz fuzz/corpus/$name/$(basename "$artifact")"
    echo "   the replay test (ctest -R fuzz_corpus_replay) now fails on it; once the defect is fixed, commit it"
    echo "   with the fix: it stays in the corpus as a regression input"
  done
done
[ "$failed" -eq 0 ] || { echo "== fuzzing found a problem (the logs above say where)" >&2; exit 1; }

if [ "$merge" -eq 1 ]; then
  for name in "${names[@]}"; do
    before=$(find "$RANKWISE_ROOT/fuzz/corpus/$name" -type f | wc -l)
    "$build_dir/fuzz/${name}_fuzz" -merge=1 -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      "$RANKWISE_ROOT/fuzz/corpus/$name" "$build_dir/corpus/$name" >"$build_dir/$name.merge.log" 2>&1 ||
      { echo "== merging $name failed; its log:"; cat "$build_dir/$name.merge.log"; exit 1; }
    after=$(find "$RANKWISE_ROOT/fuzz/corpus/$name" -type f | wc -l)
    echo "== $name: merged $((after - before)) new input(s) into fuzz/corpus/$name ($after files)"
  done
fi
echo "== fuzzing found nothing"
