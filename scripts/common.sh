#!/usr/bin/env bash
# Shared by the scripts: install what the build needs, then configure.
# On a fresh Debian 12 machine with g++, cmake and git, this is all the set-up there is.
set -euo pipefail

RANKWISE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RANKWISE_ROOT

# Debian packages the project builds with (docs/getting-started.md says what each is for).
RANKWISE_PACKAGES=(libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libcli11-dev libre2-dev pkg-config ccache)
# Plots of the benchmarks (benchmarks/plot_variants.py, scripts/plot.sh); scripts/test.sh installs them
# too, optionally, so that the suite's plot test runs.
RANKWISE_PLOT_PACKAGES=(python3-matplotlib)

rankwise_install_packages() {
  rankwise_install_debian "${RANKWISE_PACKAGES[@]}" "$@"
}

# Installs the given Debian packages that are missing (and only those).
rankwise_install_debian() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  echo "== installing Debian packages: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "error: packages missing (${missing[*]}) and not running as root; install them and re-run" >&2
      exit 1
    fi
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Like rankwise_install_debian, but a failure only warns (the tests that need the packages skip).
rankwise_install_optional_packages() {
  (rankwise_install_debian "$@") || echo "warning: could not install $*; the tests that need it are skipped" >&2
}

# Prints the first python3 that imports matplotlib, Debian's /usr/bin/python3 first (another python3
# earlier on PATH does not see Debian's python3-* packages); fails when there is none.
rankwise_plot_python() {
  local py
  for py in /usr/bin/python3 "$(command -v python3 || true)"; do
    if [ -n "$py" ] && [ -x "$py" ] && "$py" -c 'import matplotlib' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

# rankwise_configure BUILD_DIR [cmake args...]
rankwise_configure() {
  local dir="$1"
  shift
  local launcher=()
  if command -v ccache >/dev/null 2>&1; then
    # Paths below the checkout are hashed relative to it and the build directory's own path is not
    # hashed, so a second checkout (another folder, another CI run) hits the cache. The settings go
    # into the build directory with the launcher, so that later `cmake --build` calls keep them.
    launcher=("-DCMAKE_CXX_COMPILER_LAUNCHER=env;CCACHE_BASEDIR=$RANKWISE_ROOT;CCACHE_NOHASHDIR=true;ccache")
  fi
  cmake -S "$RANKWISE_ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" "$@" >/dev/null
}

rankwise_jobs() {
  nproc 2>/dev/null || echo 2
}
