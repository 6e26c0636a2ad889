#!/usr/bin/env bash
# Runs every benchmark in one go and gathers the results in one directory (docs/benchmarks.md, "How to
# run everything"): builds the benchmarks in Release, records the machine, compiler, flags, Eigen, BLAS
# backend, threads and the environment variables that change the numbers, runs lora_layer,
# bench_adapters and bench_allocator (Google Benchmark: JSON and console text), toy_transformer and
# io_bandwidth (their output), and compare_variants with its plots once that program exists.
#
# Usage: scripts/bench.sh [options]
#   --quick           one small case of each program, minimum times (seconds, not minutes; the test
#                     suite runs it); the environment check only warns
#   --native          build with -DRANKWISE_NATIVE=ON (-march=native)
#   --blas            build with -DRANKWISE_USE_BLAS=ON (OpenBLAS, Debian's libopenblas-dev)
#   --build-dir DIR   build there (default: build/bench, build/bench-native, build/bench-blas or
#                     build/bench-native-blas, so that switching flags does not rebuild everything)
#   --prebuilt DIR    run the programs already built in the CMake build directory DIR; build nothing
#                     (--native and --blas then come from DIR's own configuration)
#   --out DIR         results directory, absent or empty (default: build/bench-results/<date>_<time>,
#                     "-quick" appended in quick mode; build/bench-results/latest points to the newest
#                     full run)
#   --min-time S      --benchmark_min_time of the Google Benchmark programs
#   --repetitions N   --benchmark_repetitions of the Google Benchmark programs (with aggregates)
#   --skip A,B        do not run these programs (names as above; the suite skips toy_transformer,
#                     which its own smoke test runs)
#   --allow-env       run although the environment distorts the numbers (the values are recorded)
# Exit status: 0 all ran; 1 a program failed or wrote nothing; 2 refused (usage, build type, environment).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

die() {
  echo "bench.sh: $*" >&2
  exit 2
}

quick=0 native=0 blas=0 allow_env=0 build_dir="" prebuilt="" out="" min_time="" repetitions="" skip=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --native) native=1 ;;
    --blas) blas=1 ;;
    --allow-env) allow_env=1 ;;
    --build-dir | --prebuilt | --out | --min-time | --repetitions | --skip)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --build-dir) build_dir="$2" ;;
        --prebuilt) prebuilt="$2" ;;
        --out) out="$2" ;;
        --min-time) min_time="$2" ;;
        --repetitions) repetitions="$2" ;;
        --skip) skip="$2" ;;
      esac
      shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (scripts/bench.sh --help lists them)" ;;
  esac
  shift
done
if [ -n "$min_time" ] && ! [[ "$min_time" =~ ^[0-9]*\.?[0-9]+$ ]]; then die "--min-time must be seconds, e.g. 0.5 (got '$min_time')"; fi
if [ -n "$repetitions" ] && ! [[ "$repetitions" =~ ^[1-9][0-9]*$ ]]; then die "--repetitions must be a positive integer (got '$repetitions')"; fi

# --- the build: configure and build, or take a prebuilt one --------------------------------------
cache_get() {  # cache_get VAR: VAR's value in the build directory's CMakeCache.txt
  sed -n "s/^$1:[A-Z]*=//p" "$build_dir/CMakeCache.txt" | head -n 1
}
on_off() { case "${1^^}" in ON | 1 | TRUE | YES) echo ON ;; *) echo OFF ;; esac; }

programs=(lora_layer bench_adapters bench_allocator toy_transformer io_bandwidth)
skipped=",$skip,"
for name in ${skip//,/ }; do
  [[ " ${programs[*]} peers compare_variants " == *" $name "* ]] ||
    die "--skip: unknown program '$name' (one of: ${programs[*]} peers compare_variants)"
done
if [ -n "$prebuilt" ]; then
  [ "$native$blas" = "00" ] || die "--native and --blas configure a build; --prebuilt uses '$prebuilt' as it was configured"
  [ -z "$build_dir" ] || die "give --build-dir or --prebuilt, not both"
  build_dir="$(cd "$prebuilt" 2>/dev/null && pwd)" || die "--prebuilt '$prebuilt': no such directory"
  [ -f "$build_dir/CMakeCache.txt" ] || die "--prebuilt '$prebuilt' is not a CMake build directory (no CMakeCache.txt)"
  for p in "${programs[@]}"; do
    [[ "$skipped" == *",$p,"* ]] || [ -x "$build_dir/benchmarks/$p" ] || die "--prebuilt '$prebuilt' has no benchmarks/$p (build it first, in a build without RANKWISE_SANITIZE)"
  done
  [ "$(on_off "$(cache_get RANKWISE_USE_BLAS)")" = ON ] && blas=1
  [ "$(on_off "$(cache_get RANKWISE_NATIVE)")" = ON ] && native=1
else
  if [ -z "$build_dir" ]; then
    build_dir="$RANKWISE_ROOT/build/bench"
    if [ $native = 1 ]; then build_dir+="-native"; fi
    if [ $blas = 1 ]; then build_dir+="-blas"; fi
  fi
fi
build_type_expected=Release

# --- the environment ----------------------------------------------------------------------------
# Variables that change the numbers. Distorting ones make a full run refuse; OpenBLAS's own only
# matter when OpenBLAS runs the products (--blas).
distorting=()
report_env=()
for var in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS GOTO_NUM_THREADS OMP_NUM_THREADS \
  OMP_THREAD_LIMIT OMP_DYNAMIC OMP_WAIT_POLICY OMP_PROC_BIND OMP_PLACES GLIBC_TUNABLES RANKWISE_BENCH_MALLOPT; do
  if [ -z "${!var+set}" ]; then
    report_env+=("$var=(unset)")
    continue
  fi
  value="${!var}" why=""
  case "$var" in
    OPENBLAS_CORETYPE | OPENBLAS_L2_SIZE) why="forces OpenBLAS's kernel choice (often its slower AVX2 kernels)" ;;
    OPENBLAS_NUM_THREADS | GOTO_NUM_THREADS) why="sets OpenBLAS's thread count behind the programs' backs" ;;
    OMP_NUM_THREADS | OMP_THREAD_LIMIT | OMP_DYNAMIC) why="changes or caps the OpenMP thread count of Eigen's products" ;;
    OMP_PROC_BIND | OMP_PLACES) why="pins OpenMP threads (on a shared 2-core machine this serialises them)" ;;
    OMP_WAIT_POLICY) [ "${value^^}" = PASSIVE ] && why="makes Eigen's OpenMP products 8-33 % slower" ;;
  esac
  if [ -n "$why" ] && [ $blas = 0 ] && [[ "$var" == OPENBLAS_* || "$var" == GOTO_* ]]; then
    report_env+=("$var=$value (inert: OpenBLAS is not linked without --blas)")
  elif [ -n "$why" ]; then
    report_env+=("$var=$value (DISTORTS: $why)")
    distorting+=("$var")
  else
    report_env+=("$var=$value")
  fi
done
if [ ${#distorting[@]} -gt 0 ]; then
  unset_args=""
  for var in "${distorting[@]}"; do unset_args+=" -u $var"; done
  message="the environment distorts the numbers:"
  for line in "${report_env[@]}"; do [[ "$line" == *DISTORTS* ]] && message+=$'\n'"  $line"; done
  message+=$'\n'"  (docs/benchmarks.md, \"Traps\"; /proc/cpuinfo decides OpenBLAS's kernel when OPENBLAS_CORETYPE is unset)"
  if [ $quick = 1 ]; then
    echo "bench.sh: warning (quick mode runs anyway): $message" >&2
  elif [ $allow_env = 0 ]; then
    die "refusing to run: $message
  run without them:  env$unset_args scripts/bench.sh ...
  or keep them and have them recorded:  scripts/bench.sh --allow-env ..."
  fi
fi

# --- build ----------------------------------------------------------------------------------------
has_variants=0
if [ -f "$RANKWISE_ROOT/benchmarks/compare_variants.cpp" ]; then has_variants=1; fi
if [ -z "$prebuilt" ]; then
  packages=()
  [ $blas = 1 ] && packages+=(libopenblas-dev)
  rankwise_install_packages "${packages[@]}"
  echo "== configuring $build_dir"
  rankwise_configure "$build_dir" -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_EXAMPLES=OFF -DRANKWISE_INSTALL=OFF \
    -DRANKWISE_BUILD_BENCHMARKS=ON -DRANKWISE_SANITIZE=OFF \
    -DRANKWISE_NATIVE="$([ $native = 1 ] && echo ON || echo OFF)" -DRANKWISE_USE_BLAS="$([ $blas = 1 ] && echo ON || echo OFF)"
  targets=()
  for p in "${programs[@]}" compare_variants; do
    [ $p != compare_variants ] || [ $has_variants = 1 ] || continue
    [[ "$skipped" == *",$p,"* ]] || targets+=("$p")
  done
  echo "== building ${targets[*]}"
  [ ${#targets[@]} -eq 0 ] || cmake --build "$build_dir" -j "$(rankwise_jobs)" --target "${targets[@]}"
fi
build_type="$(cache_get CMAKE_BUILD_TYPE)"
if [ "$build_type" != "$build_type_expected" ]; then
  if [ $quick = 1 ]; then
    echo "bench.sh: warning: '$build_dir' is a '${build_type:-default}' build, not Release" >&2
  else
    die "'$build_dir' is a '${build_type:-default}' build: benchmarks need Release (configure it with -DCMAKE_BUILD_TYPE=Release)"
  fi
fi
bin="$build_dir/benchmarks"

# --- the results directory ------------------------------------------------------------------------
default_out=0
if [ -z "$out" ]; then
  default_out=1
  out="$RANKWISE_ROOT/build/bench-results/$(date +%Y-%m-%d_%H%M%S)"
  if [ $quick = 1 ]; then out+="-quick"; fi
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  die "results directory '$out' is not empty (give another --out, or remove it)"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# --- the context ----------------------------------------------------------------------------------
info="$bin/bench_build_info.txt"  # written by benchmarks/CMakeLists.txt at configure time
{
  echo "date: $(date -Iseconds)"
  echo "mode: $([ $quick = 1 ] && echo 'quick (smoke: the numbers mean nothing)' || echo full)"
  echo "commit: $(git -C "$RANKWISE_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [ -n "$(git -C "$RANKWISE_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (with uncommitted changes)')"
  echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  echo "cores: $(nproc) online ($(grep -c '^processor' /proc/cpuinfo) in /proc/cpuinfo)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "kernel: $(uname -sr)"
  echo "build directory: $build_dir"
  if [ -f "$info" ]; then
    cat "$info"
  else
    echo "build: $build_type (no bench_build_info.txt: configured before it existed; re-run cmake)"
  fi
  if [ $blas = 1 ]; then
    for p in "${programs[@]}"; do
      if [ -x "$bin/$p" ]; then
        echo "BLAS library: $(ldd "$bin/$p" | sed -n 's/.*\(libblas\.so[^ ]*\|libopenblas[^ ]*\) => \([^ ]*\).*/\2/p' |
          head -n 1 | xargs -r readlink -f)"
        break
      fi
    done
  fi
  echo "threads: each program sets its own: lora_layer 1 and 2 (every case both), bench_adapters 1," \
    "bench_allocator 1, toy_transformer $([ $quick = 1 ] && echo 1 || echo '1 and 2')"
  for line in "${report_env[@]}"; do echo "env: $line"; done
} > "$out/context.txt"
echo "== context ($out/context.txt)"
cat "$out/context.txt"

# --- the programs ---------------------------------------------------------------------------------
gbench_args=()
if [ $quick = 1 ]; then
  gbench_args+=(--benchmark_min_time="${min_time:-0.01}")
elif [ -n "$min_time" ]; then
  gbench_args+=(--benchmark_min_time="$min_time")
fi
if [ -n "$repetitions" ]; then gbench_args+=(--benchmark_repetitions="$repetitions"); fi

failed=()
ran=0
status_lines=()
# run NAME OUTPUT... -- COMMAND...: runs COMMAND, its output shown and kept in NAME.txt; then checks
# that each OUTPUT file exists and is not empty.
run() {
  local name="$1" expected=() started seconds rc=0
  shift
  while [ "$1" != "--" ]; do expected+=("$1"); shift; done
  shift
  if [[ "$skipped" == *",$name,"* ]]; then
    echo
    echo "== $name: skipped (--skip)"
    status_lines+=("$name: skipped (--skip)")
    return 0
  fi
  echo
  echo "== $name: $*"
  started="$(date +%s%N)"
  set +e
  "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  set -e
  seconds="$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
  ran=$((ran + 1))
  local missing=""
  for f in "$out/$name.txt" "${expected[@]}"; do [ -s "$f" ] || missing+=" $(basename "$f")"; done
  if [ $rc -ne 0 ]; then
    failed+=("$name (exit $rc)")
  elif [ -n "$missing" ]; then
    failed+=("$name (wrote nothing to:$missing)")
    rc=1
  fi
  status_lines+=("$name: exit $rc, $seconds s")
}

for p in lora_layer bench_adapters bench_allocator; do
  args=("${gbench_args[@]}")
  if [ $quick = 1 ]; then
    case "$p" in
      lora_layer) args+=('--benchmark_filter=d:256/r:8/threads:1') ;;
      bench_adapters) args+=('--benchmark_filter=BM_MELoRA/8/1') ;;
      bench_allocator) args+=('--benchmark_filter=/1$') ;;
    esac
  fi
  run "$p" "$out/$p.json" -- "$bin/$p" "${args[@]}" --benchmark_out="$out/$p.json" --benchmark_out_format=json
done
# peers: rankwise's toy transformer against the PyTorch peer, interleaved round by round in one run
# (benchmarks/peers/compare.py; without python3-torch the peer's columns say "missing").
peers=(python3 "$RANKWISE_ROOT/benchmarks/peers/compare.py" --rankwise "$bin/toy_transformer")
if [ $quick = 1 ]; then
  run toy_transformer -- "$bin/toy_transformer" --rounds 1 --threads-list 1
  run peers -- "${peers[@]}" --rounds 1 --steps 1 --threads-list 1
  run io_bandwidth -- "$bin/io_bandwidth" --quick "$out"
else
  run toy_transformer -- "$bin/toy_transformer"
  run peers -- "${peers[@]}" --busy-core
  run io_bandwidth -- "$bin/io_bandwidth"
fi

# The variant comparison (benchmarks/compare_variants; its contract is in docs/benchmarks.md).
if [ -x "$bin/compare_variants" ]; then
  variant_args=(--out "$out/variants")
  [ $quick = 1 ] && variant_args+=(--quick)
  # One directory of CSV files per task (relabel, sort, teacher), summary.md over all of them.
  run compare_variants "$out/variants/summary.md" -- "$bin/compare_variants" "${variant_args[@]}"
  for task_dir in "$out"/variants/*/; do
    task_dir="${task_dir%/}"
    [ -s "$task_dir/runs.csv" ] || continue
    if python="$(rankwise_plot_python)"; then
      run "plot_variants_$(basename "$task_dir")" "$task_dir/loss_curves.png" -- \
        "$python" "$RANKWISE_ROOT/benchmarks/plot_variants.py" "$task_dir"
    else
      echo "== plots skipped: no python3 with matplotlib (scripts/plot.sh $task_dir installs it and draws them)"
    fi
  done
elif [ $has_variants = 1 ] && [[ "$skipped" != *",compare_variants,"* ]]; then
  failed+=("compare_variants (not built in $bin)")
else
  echo
  echo "== compare_variants: not in this tree yet; nothing to compare"
fi

# --- the summary ----------------------------------------------------------------------------------
{
  echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  for line in "${status_lines[@]}"; do echo "$line"; done
  echo "programs: $ran ran, ${#failed[@]} with errors"
  for f in "${failed[@]}"; do echo "error: $f"; done
} > "$out/summary.txt"
echo
echo "== summary ($out/summary.txt)"
cat "$out/summary.txt"
if [ $default_out = 1 ] && [ $quick = 0 ]; then
  ln -sfn "$(basename "$out")" "$(dirname "$out")/latest"
fi
echo "results in $out"
[ ${#failed[@]} -eq 0 ] || exit 1
