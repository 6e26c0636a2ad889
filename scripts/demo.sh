#!/usr/bin/env bash
# Builds rankwise's examples (Release) and runs the quickstart, then the main example: pre-train the
# toy transformer (cached in finetune_output/base-cache/ after the first run), fine-tune it with LoRA,
# save the adapter. Usage: scripts/demo.sh [arguments for examples/finetune, e.g. --adapter alora]
# The build uses the same flags as scripts/test.sh (no -march=native), so that its numbers are the
# ones the docs show (docs/conventions.md#determinism); RANKWISE_NATIVE=ON scripts/demo.sh builds with
# -march=native in build/demo-native: faster, with other (equally good) numbers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rankwise_install_packages
native="${RANKWISE_NATIVE:-OFF}"
case "$native" in
  ON) default_dir="$RANKWISE_ROOT/build/demo-native" ;;
  OFF) default_dir="$RANKWISE_ROOT/build/demo" ;;
  *) echo "scripts/demo.sh: RANKWISE_NATIVE must be ON or OFF (got '$native')" >&2; exit 2 ;;
esac
build_dir="${BUILD_DIR:-$default_dir}"
echo "== configuring $build_dir (RANKWISE_NATIVE=$native)"
rankwise_configure "$build_dir" -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_BENCHMARKS=OFF -DRANKWISE_NATIVE="$native"
echo "== building"
cmake --build "$build_dir" -j "$(rankwise_jobs)" --target quickstart finetune
echo "== running examples/quickstart"
"$build_dir/examples/quickstart"
echo "== running examples/finetune $*"
"$build_dir/examples/finetune" "$@"
