#!/usr/bin/env bash
# Builds rankwise's examples (Release) and runs the main example.
# Usage: scripts/demo.sh [arguments for the example]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rankwise_install_packages
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/demo}"
echo "== configuring $build_dir"
rankwise_configure "$build_dir" -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_BENCHMARKS=OFF -DRANKWISE_NATIVE=ON
echo "== building"
cmake --build "$build_dir" -j "$(rankwise_jobs)" --target quickstart
echo "== running examples/quickstart"
"$build_dir/examples/quickstart" "$@"
