#!/usr/bin/env bash
# ctest benchmark_plot_variants: benchmarks/plot_variants.py on the small CSV files of testdata/.
# Usage: test_plot_variants.sh WORK_DIR     Exit: 0 pass, 1 fail, 77 skip (no python3 with matplotlib).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/common.sh"
script="$here/plot_variants.py"
data="$here/testdata"
work="$1"
rm -rf "$work"
mkdir -p "$work"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

plot_python="$(rankwise_plot_python || true)"
any_python="${plot_python:-$(command -v python3 || true)}"
if [ -z "$any_python" ]; then
  echo "SKIP: no python3"
  exit 77
fi

# expect_error NAME EXPECTED-MESSAGE ARGS...: the script exits with 2 and says EXPECTED-MESSAGE.
# The input is checked before matplotlib is imported, so these run with any python3.
expect_error() {
  local name="$1" expected="$2" rc=0
  shift 2
  "$any_python" "$script" "$@" > "$work/$name.log" 2>&1 || rc=$?
  [ $rc -eq 2 ] || fail "$name: exit status $rc, expected 2; output: $(cat "$work/$name.log")"
  grep -qF -- "$expected" "$work/$name.log" || fail "$name: expected '$expected' in: $(cat "$work/$name.log")"
  [ -z "$(find "$work/$name" -name '*.png' 2>/dev/null)" ] || fail "$name: wrote a PNG despite the error"
}

bad() {  # bad NAME: a copy of testdata in $work/NAME
  mkdir -p "$work/$1"
  cp "$data"/*.csv "$work/$1/"
}
bad no_runs && rm "$work/no_runs/runs.csv"
expect_error no_runs "no_runs/runs.csv: no such file" "$work/no_runs"
bad no_params && sed -i '1s/trainable_params/params/' "$work/no_params/runs.csv"
expect_error no_params "no_params/runs.csv: missing column 'trainable_params'" "$work/no_params"
bad no_metric && cut -d, -f1-8 "$data/runs.csv" > "$work/no_metric/runs.csv"
expect_error no_metric "no_metric/runs.csv: missing column 'accuracy' or 'teacher_kl'" "$work/no_metric"
bad no_loss && sed -i '1s/,loss$/,value/' "$work/no_loss/loss_curves.csv"
expect_error no_loss "no_loss/loss_curves.csv: missing column 'loss'" "$work/no_loss"
bad bad_rank && sed -i '3s/,8$/,eight/' "$work/bad_rank/ranks.csv"
expect_error bad_rank "bad_rank/ranks.csv line 3: column 'rank': 'eight' is not a number" "$work/bad_rank"
bad twice && sed -n 2p "$data/loss_curves.csv" >> "$work/twice/loss_curves.csv"
expect_error twice "twice/loss_curves.csv line 27: a second row for method 'lora', seed 1, step 1" "$work/twice"
expect_error no_ranks_file "missing.csv: no such file" --runs "$data/runs.csv" --losses "$data/loss_curves.csv" \
  --ranks "$work/missing.csv" --out "$work/no_ranks_file"
expect_error no_dir "nowhere: no such directory" "$work/nowhere"

if [ -z "$plot_python" ]; then
  echo "SKIP: no python3 can import matplotlib (Debian: python3-matplotlib; scripts/test.sh installs it)"
  exit 77
fi

# is_png FILE: a PNG signature and an image of at least 200 x 150 pixels.
is_png() {
  "$plot_python" - "$1" <<'PY' || fail "$1 is not a PNG of a plot"
import struct, sys
head = open(sys.argv[1], "rb").read(24)
assert head[:8] == b"\x89PNG\r\n\x1a\n", "signature"
width, height = struct.unpack(">II", head[16:24])
assert width >= 200 and height >= 150, (width, height)
PY
}

# The whole directory: loss curves, both metrics, the ALoRA heat map.
"$plot_python" "$script" "$data" --out "$work/all" > "$work/all.log" 2>&1 || fail "plotting testdata: $(cat "$work/all.log")"
for png in loss_curves accuracy_vs_params teacher_kl_vs_params ranks_alora_seed1; do
  [ -s "$work/all/$png.png" ] || fail "$png.png missing or empty; output: $(cat "$work/all.log")"
  is_png "$work/all/$png.png"
done
[ "$(find "$work/all" -type f | wc -l)" -eq 4 ] || fail "expected exactly 4 files in $work/all: $(ls -A "$work/all")"

# Named files, no ranks, standard-deviation bars, a metric column that is empty everywhere.
mkdir -p "$work/named"
cut -d, -f1-9 "$data/runs.csv" | sed '1s/$/,teacher_kl/; 2,$s/$/,/' > "$work/named/runs.csv"
"$plot_python" "$script" --runs "$work/named/runs.csv" --losses "$data/loss_curves.csv" --out "$work/named/plots" \
  --spread sd > "$work/named.log" 2>&1 || fail "plotting named files: $(cat "$work/named.log")"
grep -q "no ranks.csv" "$work/named.log" || fail "no note about the missing ranks.csv: $(cat "$work/named.log")"
[ "$(ls "$work/named/plots")" = "$(printf 'accuracy_vs_params.png\nloss_curves.png')" ] ||
  fail "expected exactly accuracy_vs_params.png and loss_curves.png, got: $(ls -A "$work/named/plots")"
for png in "$work"/named/plots/*.png; do is_png "$png"; done
echo "plot_variants: 8 error cases and 6 plots checked"
