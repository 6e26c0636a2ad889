#!/usr/bin/env bash
# Builds the tests, examples and benchmarks (Release) and runs the whole suite with ctest.
# Usage: scripts/test.sh [extra cmake arguments]     e.g. scripts/test.sh -DRANKWISE_SANITIZE=ON
# Environment: BUILD_DIR (default build/test), CTEST_ARGS (extra ctest arguments).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rankwise_install_packages
rankwise_install_optional_packages "${RANKWISE_PLOT_PACKAGES[@]}"
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/test}"
echo "== configuring $build_dir"
rankwise_configure "$build_dir" "$@"
echo "== building"
cmake --build "$build_dir" -j "$(rankwise_jobs)"
echo "== testing"
cd "$build_dir"
# shellcheck disable=SC2086
ctest --output-on-failure -j "$(rankwise_jobs)" ${CTEST_ARGS:-}
