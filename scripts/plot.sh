#!/usr/bin/env bash
# Draws the plots of the adapter-variant comparison: installs Debian's python3-matplotlib if it is
# missing, then runs benchmarks/plot_variants.py with a python3 that sees it.
# Usage: scripts/plot.sh RESULTS_DIR [plot_variants.py options]   e.g. scripts/plot.sh build/bench-results/latest/variants
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rankwise_install_debian "${RANKWISE_PLOT_PACKAGES[@]}"
if ! python="$(rankwise_plot_python)"; then
  echo "error: no python3 imports matplotlib even after installing ${RANKWISE_PLOT_PACKAGES[*]}" >&2
  exit 3
fi
exec "$python" "$RANKWISE_ROOT/benchmarks/plot_variants.py" "$@"
