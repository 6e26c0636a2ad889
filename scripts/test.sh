#!/usr/bin/env bash
# Builds and runs rankwise's test suite with ctest (Release).
# Usage: scripts/test.sh [--benchmarks | --all] [extra cmake arguments]
#   (default)     the library's suite: unit tests, allocation tests, every example (with its refusals)
#                 and the installed package (the header check, 70 compiles that run nothing, is left to
#                 continuous integration's sanitizer stage; -DRANKWISE_HEADER_CHECK=ON adds it here)
#   --benchmarks  the benchmarks' smoke runs and the harness and plot tests (builds the benchmarks)
#   --all         both
# e.g. scripts/test.sh -DRANKWISE_SANITIZE=ON
# Environment: BUILD_DIR (default build/test), CTEST_ARGS (extra ctest arguments).
# The benchmarks are measurement programs: their smoke runs keep them working, and continuous
# integration runs them (.ci/run), but the default suite leaves them out so that it stays short.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mode=library
case "${1:-}" in
  --benchmarks) mode=benchmarks; shift ;;
  --all) mode=all; shift ;;
  --help | -h) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

rankwise_install_packages
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/test}"
benchmarks=ON
[ "$mode" = library ] && benchmarks=OFF
if [ "$mode" != library ]; then
  rankwise_install_optional_packages "${RANKWISE_PLOT_PACKAGES[@]}"  # for the plot test
fi
echo "== configuring $build_dir"
# The caller's arguments come last, so that they win.
rankwise_configure "$build_dir" "-DRANKWISE_BUILD_BENCHMARKS=$benchmarks" -DRANKWISE_HEADER_CHECK=OFF "$@"
echo "== building"
ctest_filter=()
if [ "$mode" = benchmarks ]; then
  cmake --build "$build_dir" -j "$(rankwise_jobs)" --target rankwise_benchmarks
  ctest_filter=(-L benchmark)
else
  cmake --build "$build_dir" -j "$(rankwise_jobs)"
fi
echo "== testing"
cd "$build_dir"
# shellcheck disable=SC2086
ctest --output-on-failure -j "$(rankwise_jobs)" "${ctest_filter[@]}" ${CTEST_ARGS:-}
