#!/usr/bin/env python3
"""plot_variants.py: PNG plots of the adapter-variant comparison from its CSV files.

Usage:
  plot_variants.py RESULTS_DIR [--out DIR] [--spread minmax|sd]
  plot_variants.py --runs runs.csv --losses loss_curves.csv [--ranks ranks.csv] --out DIR

RESULTS_DIR holds runs.csv and loss_curves.csv (required) and ranks.csv (optional: without it no
heat map is drawn); explicit --runs/--losses/--ranks name the files instead, and are then all
required to exist. The plots go to --out (default: RESULTS_DIR). Needs matplotlib (Debian:
python3-matplotlib, run with /usr/bin/python3); scripts/plot.sh installs it and runs this script.

Input schemas (docs/benchmarks.md, "CSV files of the variant comparison"; the C++ writer is
benchmarks/variant_results.hpp). A header row names the columns; their order does not matter and
extra columns are ignored. An empty cell means "not measured".
  runs.csv         method,seed,steps,trainable_params,adapter_bytes,ms_per_step,merged_ms,
                   final_loss,accuracy,teacher_kl
                   one row per fine-tuning run; required here: method, seed, trainable_params, and
                   accuracy and/or teacher_kl (at least one of them with a value)
  loss_curves.csv  method,seed,step,loss        one row per run and step
  ranks.csv        method,seed,round,module,rank  ranks of every module after each allocation
                   round (round 0: the initial allocation); module order is the file's order

Output:
  loss_curves.png               training loss against step, one line per method (methods with the
                                same curve share a line; moving average over --smooth points; log scale
                                when every value is positive): the mean over
                                seeds, and a band for the spread over seeds
  accuracy_vs_params.png        accuracy (and teacher_kl_vs_params.png: teacher KL) against trainable
                                parameters, log-scale x, one marker per method with error bars over
                                seeds; drawn for each of the two columns that has a value
  ranks_<method>_seed<seed>.png heat map of rank per module (rows) and round (columns), one per run
                                found in ranks.csv
Spread (bands and error bars): --spread minmax (default) spans the minimum to the maximum over
seeds; --spread sd spans the mean +- one sample standard deviation.

Exit status: 0 when every plot was written; 2 for bad input (a missing file, column or value; the
message names the file, line and column); 3 when matplotlib cannot be imported. The input is read
and checked completely before matplotlib is imported.
"""

import argparse
import csv
import math
import os
import re
import statistics
import sys

RUNS_REQUIRED = ("method", "seed", "trainable_params")
METRICS = (("accuracy", "accuracy", "accuracy_vs_params.png"),
           ("teacher_kl", "teacher KL", "teacher_kl_vs_params.png"))
LOSSES_REQUIRED = ("method", "seed", "step", "loss")
RANKS_REQUIRED = ("method", "seed", "round", "module", "rank")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


class InputError(Exception):
    """Bad input: the message names the file and what is wrong."""


def read_table(path, required, what):
    """Rows of a CSV file as dicts, after checking that the file and every required column exist."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the {what})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(c) for c in missing)} (the file has: {', '.join(columns) or 'no header'})")
        rows = []
        for row in reader:
            if None in row:
                raise InputError(f"{path} line {reader.line_num}: more cells than the header has columns")
            row["_line"] = reader.line_num
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no data rows (only a header)")
    return rows


def text(path, row, column):
    value = (row.get(column) or "").strip()
    if not value:
        raise InputError(f"{path} line {row['_line']}: column '{column}' is empty")
    return value


def number(path, row, column, optional=False):
    """The cell as a float; None for an empty optional cell."""
    cell = (row.get(column) or "").strip()
    if not cell:
        if optional:
            return None
        raise InputError(f"{path} line {row['_line']}: column '{column}' is empty")
    try:
        value = float(cell)
    except ValueError:
        raise InputError(f"{path} line {row['_line']}: column '{column}': '{cell}' is not a number") from None
    if not math.isfinite(value):
        if optional:
            return None
        raise InputError(f"{path} line {row['_line']}: column '{column}': '{cell}' is not finite")
    return value


def integer(path, row, column):
    value = number(path, row, column)
    if value != int(value):
        raise InputError(f"{path} line {row['_line']}: column '{column}': '{row[column]}' is not an integer")
    return int(value)


def in_order(keys):
    """Distinct keys in order of first appearance."""
    seen = {}
    for k in keys:
        seen.setdefault(k, None)
    return list(seen)


def spread(values, mode):
    """(mean, low, high) of a list of numbers."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    if mode == "sd":
        sd = statistics.stdev(values)
        return mean, mean - sd, mean + sd
    return mean, min(values), max(values)


def load_runs(path):
    rows = read_table(path, RUNS_REQUIRED, "per-run results")
    present = [m for m in METRICS if m[0] in rows[0]]
    if not present:
        raise InputError(f"{path}: missing column 'accuracy' or 'teacher_kl' (one of them is needed; "
                         f"the file has: {', '.join(c for c in rows[0] if c != '_line')})")
    runs = []
    seen = set()
    for row in rows:
        key = (text(path, row, "method"), integer(path, row, "seed"))
        if key in seen:
            raise InputError(f"{path} line {row['_line']}: a second row for method '{key[0]}', seed {key[1]}")
        seen.add(key)
        run = {"method": key[0], "seed": key[1], "params": number(path, row, "trainable_params")}
        for column, _, _ in present:
            run[column] = number(path, row, column, optional=True)
        runs.append(run)
    metrics = [m for m in present if any(r[m[0]] is not None for r in runs)]
    if not metrics:
        raise InputError(f"{path}: columns {' and '.join(repr(m[0]) for m in present)} have no value in any row")
    return runs, metrics


def load_losses(path):
    rows = read_table(path, LOSSES_REQUIRED, "loss curves")
    curves = {}  # method -> step -> [loss per seed]
    seen = set()
    for row in rows:
        method, seed, step = text(path, row, "method"), integer(path, row, "seed"), integer(path, row, "step")
        if (method, seed, step) in seen:
            raise InputError(f"{path} line {row['_line']}: a second row for method '{method}', seed {seed}, step {step}")
        seen.add((method, seed, step))
        loss = number(path, row, "loss", optional=True)  # a diverged step: empty cell, left out
        steps = curves.setdefault(method, {})
        if loss is not None:
            steps.setdefault(step, []).append(loss)
        else:
            steps.setdefault(step, [])
    return curves


def load_ranks(path):
    rows = read_table(path, RANKS_REQUIRED, "rank allocation history")
    grids = {}  # (method, seed) -> {"modules": [...], "rounds": set, "rank": {(module, round): rank}}
    for row in rows:
        key = (text(path, row, "method"), integer(path, row, "seed"))
        module, rnd, rank = text(path, row, "module"), integer(path, row, "round"), integer(path, row, "rank")
        if rnd < 0 or rank < 0:
            raise InputError(f"{path} line {row['_line']}: round and rank must be >= 0 (got {rnd}, {rank})")
        grid = grids.setdefault(key, {"modules": [], "rounds": set(), "rank": {}})
        if (module, rnd) in grid["rank"]:
            raise InputError(f"{path} line {row['_line']}: a second rank for module '{module}' in round {rnd} "
                             f"(method '{key[0]}', seed {key[1]})")
        if module not in grid["rank"] and module not in grid["modules"]:
            grid["modules"].append(module)
        grid["rounds"].add(rnd)
        grid["rank"][(module, rnd)] = rank
    return grids


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot_variants: error: matplotlib cannot be imported by {sys.executable} ({e}); install Debian's "
              "python3-matplotlib and run with /usr/bin/python3 (scripts/plot.sh does both)", file=sys.stderr)
        sys.exit(3)
    return plt


def save(fig, out_dir, name, written):
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)  # a reader never sees half a PNG
    written.append(path)


def spread_label(mode):
    return "min to max over seeds" if mode == "minmax" else "mean \u00b1 1 sample sd over seeds"


def moving_average(values, window):
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(plt, curves, mode, out_dir, written, smooth=1):
    # Methods with the very same curves (DyLoRA evaluated at several ranks after one run) are drawn once.
    groups = []  # (label, curve)
    for method in curves:
        for i, (label, curve) in enumerate(groups):
            if curve == curves[method]:
                groups[i] = (f"{label}, {method}", curve)
                break
        else:
            groups.append((method, curves[method]))
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(8, 5))
    everything_positive = True
    for i, (label, curve) in enumerate(groups):
        points = sorted((s, v) for s, v in curve.items() if v)
        if not points:
            continue
        steps = [s for s, _ in points]
        stats = [spread(v, mode) for _, v in points]
        mean, lo, hi = (moving_average([x[k] for x in stats], smooth) for k in range(3))
        everything_positive = everything_positive and min(lo) > 0
        line, = ax.plot(steps, mean, label=label, linewidth=1.5, color=colours(i % colours.N),
                        linestyle="-" if i % 2 == 0 else "--")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if everything_positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (f" (moving average of {smooth} points)" if smooth > 1 else ""))
    ax.set_title(f"Training loss: mean over seeds (band: {spread_label(mode)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out_dir, "loss_curves.png", written)
    plt.close(fig)


def plot_metric(plt, runs, metric, mode, out_dir, written):
    column, label, filename = metric
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, method in enumerate(in_order(r["method"] for r in runs)):
        mine = [r for r in runs if r["method"] == method]
        values = [r[column] for r in mine if r[column] is not None]
        if not values:
            continue
        x = statistics.fmean(r["params"] for r in mine)
        mean, lo, hi = spread(values, mode)
        ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], marker=MARKERS[i % len(MARKERS)], markersize=8,
                    capsize=4, linestyle="none", label=f"{method} ({len(values)} seed{'s' if len(values) > 1 else ''})")
        ax.annotate(method, (x, mean), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs trainable parameters (error bars: {spread_label(mode)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out_dir, filename, written)
    plt.close(fig)


def plot_ranks(plt, grids, out_dir, written):
    import numpy as np  # a dependency of matplotlib

    for (method, seed), grid in grids.items():
        modules, rounds = grid["modules"], sorted(grid["rounds"])
        values = np.full((len(modules), len(rounds)), np.nan)
        for (module, rnd), rank in grid["rank"].items():
            values[modules.index(module), rounds.index(rnd)] = rank
        fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.5 * len(rounds)), max(3.0, 1.0 + 0.3 * len(modules))))
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        fig.colorbar(image, ax=ax, label="rank")
        ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
        ax.set_yticks(range(len(modules)), modules, fontsize=7 if len(modules) > 12 else 9)
        ax.set_xlabel("allocation round (0: initial)")
        ax.set_title(f"{method}, seed {seed}: rank per module")
        if len(modules) * len(rounds) <= 600:
            top = np.nanmax(values)
            for (module, rnd), rank in grid["rank"].items():
                ax.text(rounds.index(rnd), modules.index(module), str(rank), ha="center", va="center", fontsize=7,
                        color="black" if rank > 0.6 * top else "white")
        save(fig, out_dir, f"ranks_{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}_seed{seed}.png", written)
        plt.close(fig)


def main(argv):
    parser = argparse.ArgumentParser(description="Plots of the adapter-variant comparison (see the file's header).")
    parser.add_argument("results_dir", nargs="?", help="directory with runs.csv, loss_curves.csv[, ranks.csv]")
    parser.add_argument("--runs", help="runs.csv (default: RESULTS_DIR/runs.csv)")
    parser.add_argument("--losses", help="loss_curves.csv (default: RESULTS_DIR/loss_curves.csv)")
    parser.add_argument("--ranks", help="ranks.csv (default: RESULTS_DIR/ranks.csv if it exists)")
    parser.add_argument("--out", help="directory for the PNG files (default: RESULTS_DIR)")
    parser.add_argument("--spread", choices=("minmax", "sd"), default="minmax",
                        help="what bands and error bars span (default: minmax)")
    parser.add_argument("--smooth", type=int, default=10,
                        help="loss curves: trailing moving average over this many logged points (default: 10; 1: none)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        print(f"plot_variants: error: --smooth must be >= 1 (got {args.smooth})", file=sys.stderr)
        return 2

    base = args.results_dir
    if base is None and not (args.runs and args.losses and args.out):
        parser.error("give RESULTS_DIR, or all of --runs, --losses and --out")
    if base is not None and not os.path.isdir(base):
        print(f"plot_variants: error: {base}: no such directory (the results directory)", file=sys.stderr)
        return 2
    runs_path = args.runs or os.path.join(base, "runs.csv")
    losses_path = args.losses or os.path.join(base, "loss_curves.csv")
    ranks_path = args.ranks
    if ranks_path is None and base is not None and os.path.exists(os.path.join(base, "ranks.csv")):
        ranks_path = os.path.join(base, "ranks.csv")
    out_dir = args.out or base

    try:
        runs, metrics = load_runs(runs_path)
        curves = load_losses(losses_path)
        grids = load_ranks(ranks_path) if ranks_path else {}
    except InputError as e:
        print(f"plot_variants: error: {e}", file=sys.stderr)
        return 2

    plt = import_pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    plot_losses(plt, curves, args.spread, out_dir, written, args.smooth)
    for metric in metrics:
        plot_metric(plt, runs, metric, args.spread, out_dir, written)
    plot_ranks(plt, grids, out_dir, written)
    if not ranks_path:
        print("plot_variants: no ranks.csv: no rank heat map")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
