#!/usr/bin/env python3
"""plot_bora.py: PNG plots of the BoRA study (benchmarks/bora_study) from its runs.csv.

Usage:
  plot_bora.py RESULTS_DIR [--out DIR] [--error LABEL] [--size LABEL]

RESULTS_DIR holds runs.csv with the columns
  config,seed,method,tau,task,train_columns,validation_excess,test_excess,distance
(one row per configuration, seed, method and task; method "bora" with a tau, or "shared" without).
The plots go to --out (default: RESULTS_DIR):
  tau_curve.png         held-out excess error against tau: the family mean (over configurations, each
                        the mean over its seeds) of the task mean and of each configuration's poorest
                        task, with a band of +- one standard deviation over configurations; the shared
                        LoRA as a horizontal line; tau = 0 drawn at the left edge of the log axis
  distance_vs_size.png  ||theta_d - Theta|| at each configuration's validation-chosen tau against the
                        task's training columns (log-log), one point per task, mean over seeds
  gain_vs_size.png      test excess error of tau = 0 minus BoRA at the chosen tau, per task, against
                        its training columns
--error and --size name the error and the data size on the axes (defaults: the layer study's "excess
MSE" and "training columns"; benchmarks/bora_lm_study writes the same columns with a held-out KL and
training sequences: --error "held-out KL (nats/token)" --size "training sequences").
tau is chosen per configuration by the validation error (task mean, seed mean), as the study does.
Needs matplotlib (Debian: python3-matplotlib, run with /usr/bin/python3). Exit status: 0 when every
plot was written; 2 for bad input (the message names the file, line and column); 3 when matplotlib
cannot be imported.
"""

import argparse
import csv
import math
import os
import statistics
import sys
from collections import defaultdict

REQUIRED = ("config", "seed", "method", "tau", "task", "train_columns", "validation_excess", "test_excess", "distance")


class InputError(Exception):
    """Bad input: the message names the file and what is wrong."""


def load(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the study's runs)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            try:
                method = row["method"]
                if method not in ("bora", "shared"):
                    raise ValueError(f"method '{method}' is neither bora nor shared")
                rows.append({
                    "config": int(row["config"]), "seed": int(row["seed"]), "method": method,
                    "tau": float(row["tau"]) if method == "bora" else None, "task": int(row["task"]),
                    "size": int(row["train_columns"]), "validation": float(row["validation_excess"]),
                    "test": float(row["test_excess"]),
                    "distance": float(row["distance"]) if row["distance"].strip() else None,
                })
            except (ValueError, TypeError) as e:
                raise InputError(f"{path} line {reader.line_num}: {e}") from None
    if not rows:
        raise InputError(f"{path}: no data rows")
    return rows


def summarise(rows):
    """Per configuration: taus, the chosen tau, per-tau task-mean and poorest-task test errors, shared."""
    configs = defaultdict(lambda: {"runs": defaultdict(list), "sizes": {}})
    for r in rows:
        c = configs[r["config"]]
        c["sizes"][r["task"]] = r["size"]
        c["runs"][(r["method"], r["tau"], r["seed"])].append(r)
    out = {}
    for k, c in configs.items():
        poorest = min(c["sizes"], key=lambda t: c["sizes"][t])
        by = defaultdict(lambda: {"validation": [], "test": [], "poor": [], "task": defaultdict(list)})
        for (method, tau, seed), runs in c["runs"].items():
            key = tau if method == "bora" else "shared"
            by[key]["validation"].append(statistics.fmean(r["validation"] for r in runs))
            by[key]["test"].append(statistics.fmean(r["test"] for r in runs))
            by[key]["poor"].append(next(r["test"] for r in runs if r["task"] == poorest))
            for r in runs:
                by[key]["task"][r["task"]].append(r)
        taus = sorted(t for t in by if t != "shared")
        if not taus:
            raise InputError(f"configuration {k}: no bora rows")
        best = min(taus, key=lambda t: statistics.fmean(by[t]["validation"]))
        out[k] = {"taus": taus, "best": best, "by": by, "sizes": c["sizes"]}
    return out


def plot(summary, out_dir, error_label="excess MSE", size_label="training columns"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_bora.py: matplotlib cannot be imported (Debian: python3-matplotlib)", file=sys.stderr)
        sys.exit(3)
    os.makedirs(out_dir, exist_ok=True)
    taus = sorted({t for s in summary.values() for t in s["taus"]})
    positive = [t for t in taus if t > 0]
    zero_at = min(positive) / 10 if positive else 1e-2
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, colour in (("test", "task mean", "tab:blue"), ("poor", "poorest task", "tab:red")):
        xs, means, lows, highs = [], [], [], []
        for t in taus:
            values = [statistics.fmean(s["by"][t][key]) for s in summary.values() if t in s["by"]]
            m = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            xs.append(t if t > 0 else zero_at)
            means.append(m)
            lows.append(max(m - sd, 1e-6))
            highs.append(m + sd)
        ax.plot(xs, means, "o-", color=colour, label=f"BoRA, {label}")
        ax.fill_between(xs, lows, highs, color=colour, alpha=0.15)
        shared = [statistics.fmean(s["by"]["shared"][key]) for s in summary.values() if "shared" in s["by"]]
        if shared:
            ax.axhline(statistics.fmean(shared), color=colour, linestyle="--", label=f"shared LoRA, {label}")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(["0" if t == 0 else f"{t:g}" for t in taus])
    ax.set_xlabel("tau (prior precision)")
    ax.set_ylabel(f"held-out {error_label}" if not error_label.startswith("held-out") else error_label)
    ax.set_title(f"BoRA tau sweep, {len(summary)} configurations (band: sd over them)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "tau_curve.png"), dpi=120)
    plt.close(fig)

    sizes, distances, gains, chosen_taus = [], [], [], []
    for s in summary.values():
        chosen = s["by"][s["best"]]["task"]
        independent = s["by"][0.0]["task"] if 0.0 in s["by"] else None
        for task, runs in chosen.items():
            ds = [r["distance"] for r in runs if r["distance"] is not None]
            sizes.append(s["sizes"][task])
            chosen_taus.append(s["best"])
            distances.append(statistics.fmean(ds) if ds else math.nan)
            gains.append(statistics.fmean(r["test"] for r in independent[task]) - statistics.fmean(r["test"] for r in runs)
                         if independent else math.nan)
    for values, name, ylabel, log_y in ((distances, "distance_vs_size.png", "||theta_d - Theta|| at the chosen tau", True),
                                        (gains, "gain_vs_size.png", f"{error_label}: tau = 0 minus BoRA", False)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for t in sorted(set(chosen_taus)):
            pick = [i for i, c in enumerate(chosen_taus) if c == t]
            ax.scatter([sizes[i] for i in pick], [values[i] for i in pick], s=14, label=f"chosen tau = {t:g}")
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"{size_label} of the task")
        ax.set_ylabel(ylabel)
        ax.set_title(f"one point per task, {len(summary)} configurations")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--out")
    parser.add_argument("--error", default="excess MSE", help="what the error columns measure (axis label)")
    parser.add_argument("--size", default="training columns", help="what train_columns counts (axis label)")
    args = parser.parse_args()
    try:
        summary = summarise(load(os.path.join(args.results, "runs.csv")))
    except InputError as e:
        print(f"plot_bora.py: {e}", file=sys.stderr)
        sys.exit(2)
    out = args.out or args.results
    plot(summary, out, args.error, args.size)
    print(f"plots in {out}: tau_curve.png, distance_vs_size.png, gain_vs_size.png")


if __name__ == "__main__":
    main()
