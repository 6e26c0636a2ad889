#!/usr/bin/env bash
# ctest benchmark_harness_quick: scripts/bench.sh --quick on the programs of this build, then its refusals.
# Usage: test_bench_harness.sh BUILD_DIR WORK_DIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$here/../scripts/bench.sh"
build="$1"
work="$2"
rm -rf "$work"
mkdir -p "$work"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# --- a quick run: every program ran and wrote its results -----------------------------------------
started=$SECONDS
# GOTO_NUM_THREADS is OpenBLAS's alone: inert (and recorded so) unless the build uses OpenBLAS.
# toy_transformer, peers and compare_variants are skipped: their own smoke tests run the same commands.
env GOTO_NUM_THREADS=1 bash "$bench" --quick --skip toy_transformer,peers,compare_variants --prebuilt "$build" --out "$work/quick" \
  > "$work/quick.log" 2>&1 ||
  fail "scripts/bench.sh --quick failed; its output:
$(cat "$work/quick.log")"
out="$work/quick"
for key in "cpu:" "cores:" "load average at start:" "compiler:" "flags:" "Eigen:" "products:" "threads:" \
  "env: OPENBLAS_CORETYPE" "env: OMP_NUM_THREADS"; do
  grep -q "^$key" "$out/context.txt" || fail "context.txt has no line starting with '$key':
$(cat "$out/context.txt")"
done
for p in lora_layer bench_adapters bench_allocator; do
  [ -s "$out/$p.txt" ] || fail "$p.txt missing or empty"
  grep -q '"benchmarks": \[' "$out/$p.json" || fail "$p.json is not Google Benchmark's JSON"
  grep -q '"run_type": "iteration"' "$out/$p.json" || fail "$p.json has no benchmark result"
done
grep -qx "toy_transformer: skipped (--skip)" "$out/summary.txt" || fail "toy_transformer not reported as skipped"
[ ! -e "$out/toy_transformer.txt" ] || fail "toy_transformer ran although skipped"
grep -q "GB/s" "$out/io_bandwidth.txt" || fail "io_bandwidth.txt has no bandwidth"
[ ! -e "$out/rankwise_io_bandwidth" ] || fail "io_bandwidth left its files in $out"
grep -qx "programs: 4 ran, 0 with errors" "$out/summary.txt" || fail "summary.txt: $(cat "$out/summary.txt")"
echo "quick run: $((SECONDS - started)) s"

# --- the variant comparison: run with --out DIR [--quick], then plotted -----------------------------
# A build directory whose compare_variants stands in for the real program: it writes testdata's files.
fake="$work/fake_build"
mkdir -p "$fake/benchmarks"
cp "$build/CMakeCache.txt" "$fake/"
cp "$build/benchmarks/bench_build_info.txt" "$fake/benchmarks/"
for p in lora_layer bench_adapters bench_allocator toy_transformer io_bandwidth; do
  ln -s "$build/benchmarks/$p" "$fake/benchmarks/$p"
done
cat > "$fake/benchmarks/compare_variants" <<STAND_IN
#!/usr/bin/env bash
[ \$# -eq 3 ] && [ "\$1" = --out ] && [ "\$3" = --quick ] || { echo "unexpected arguments: \$*" >&2; exit 64; }
mkdir -p "\$2/relabel" && cp "$here/testdata/"*.csv "\$2/relabel/" && echo "# stand-in" > "\$2/summary.md" &&
  echo "stand-in: copied testdata to \$2/relabel"
STAND_IN
chmod +x "$fake/benchmarks/compare_variants"
bash "$bench" --quick --prebuilt "$fake" --skip lora_layer,bench_adapters,bench_allocator,toy_transformer,peers,io_bandwidth \
  --out "$work/variants" > "$work/variants.log" 2>&1 || fail "the run with compare_variants failed: $(cat "$work/variants.log")"
grep -qx "compare_variants: exit 0, .* s" "$work/variants/summary.txt" ||
  fail "compare_variants did not run: $(cat "$work/variants.log")"
[ -s "$work/variants/variants/relabel/runs.csv" ] || fail "compare_variants wrote nothing to variants/relabel/"
source "$here/../scripts/common.sh"
if rankwise_plot_python > /dev/null; then
  grep -qx "plot_variants_relabel: exit 0, .* s" "$work/variants/summary.txt" || fail "no plots: $(cat "$work/variants.log")"
  [ -s "$work/variants/variants/relabel/ranks_alora_seed1.png" ] || fail "the plots are not next to the CSV files"
else
  grep -q "plots skipped" "$work/variants.log" || fail "no note that the plots were skipped"
fi

# --- refusals: exit status 2, a message that says why, nothing run --------------------------------
# expect_refusal NAME EXPECTED-MESSAGE COMMAND...
expect_refusal() {
  local name="$1" expected="$2" rc=0
  shift 2
  "$@" > "$work/$name.log" 2>&1 || rc=$?
  [ $rc -eq 2 ] || fail "$name: exit status $rc, expected 2; output: $(cat "$work/$name.log")"
  grep -qF -- "$expected" "$work/$name.log" || fail "$name: expected '$expected' in: $(cat "$work/$name.log")"
  [ ! -e "$work/$name" ] || fail "$name: created its results directory although it refused"
}
expect_refusal passive "OMP_WAIT_POLICY=PASSIVE (DISTORTS: makes Eigen's OpenMP products 8-33 % slower)" \
  env OMP_WAIT_POLICY=PASSIVE bash "$bench" --prebuilt "$build" --out "$work/passive"
grep -qF -- "-u OMP_WAIT_POLICY" "$work/passive.log" || fail "the refusal does not say how to run without the variable"
expect_refusal threads "OMP_NUM_THREADS=1 (DISTORTS" \
  env OMP_NUM_THREADS=1 bash "$bench" --prebuilt "$build" --out "$work/threads"
expect_refusal blas_flag "--native and --blas configure a build" bash "$bench" --prebuilt "$build" --blas --out "$work/blas_flag"
expect_refusal unknown "unknown option '--fast'" bash "$bench" --fast
expect_refusal skip_unknown "--skip: unknown program 'toy'" bash "$bench" --quick --skip toy --prebuilt "$build"
expect_refusal not_empty "is not empty" bash "$bench" --quick --prebuilt "$build" --out "$out"
expect_refusal no_build "is not a CMake build directory" bash "$bench" --quick --prebuilt "$work" --out "$work/no_build"

if grep -q "^RANKWISE_USE_BLAS:BOOL=ON" "$build/CMakeCache.txt"; then
  grep -qF "env: GOTO_NUM_THREADS=1 (DISTORTS" "$out/context.txt" || fail "GOTO_NUM_THREADS not recorded as distorting"
else
  grep -qF "env: GOTO_NUM_THREADS=1 (inert" "$out/context.txt" || fail "GOTO_NUM_THREADS not recorded as inert"
fi
echo "bench.sh: quick run and 7 refusals checked in $((SECONDS - started)) s"
