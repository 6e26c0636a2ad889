#!/usr/bin/env bash
# Builds rankwise's examples (Release) and runs the quickstart, then the main example: pre-train the
# toy transformer (cached in finetune_output/base-cache/ after the first run), fine-tune it with LoRA,
# save the adapter. Usage: scripts/demo.sh [arguments for examples/finetune, e.g. --adapter alora]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rankwise_install_packages
build_dir="${BUILD_DIR:-$RANKWISE_ROOT/build/demo}"
echo "== configuring $build_dir"
rankwise_configure "$build_dir" -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_BENCHMARKS=OFF -DRANKWISE_NATIVE=ON
echo "== building"
cmake --build "$build_dir" -j "$(rankwise_jobs)" --target quickstart finetune
echo "== running examples/quickstart"
"$build_dir/examples/quickstart"
echo "== running examples/finetune $*"
"$build_dir/examples/finetune" "$@"
