#!/usr/bin/env python3
"""rankwise against its PyTorch peer on the toy transformer's reference configuration, in one run.

Starts benchmarks/toy_transformer --serve and benchmarks/peers/toy_transformer.py --serve side by side
and interleaves them round by round (each round: every mode and thread count, rankwise and the peer
one after the other, in an order that alternates between rounds), so that a change of load on the
machine hits both alike. Per mode and thread count it prints the median ms/step of each, their
ratio, GFLOP/s (the products' FLOPs, counted by the rankwise program, for both) as a fraction of the
FMA-loop peak measured in the same run, the 2-thread speed-up, peak memory, the load average during
the run, and a PASS/FAIL line per target of the speed issue (docs/benchmarks.md, "Against PyTorch").
Without PyTorch (Debian: python3-torch) the peer's columns say "missing" and the rest still runs.

Usage: benchmarks/peers/compare.py --rankwise build/bench/benchmarks/toy_transformer
           [--rounds 7] [--steps 5] [--threads-list 1,2] [--busy-core]
  --busy-core   afterwards, time rankwise with 1 and 2 threads while a busy loop keeps one core
                occupied (the target: 2 threads no slower than 1 under the same load)
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

MODES = ["full", "lora", "inference"]
HERE = os.path.dirname(os.path.abspath(__file__))
# glibc would unmap and re-fault blocks over 128 KiB on every free; rankwise's program sets the same
# thresholds with mallopt (performance notes, trap 2), so both sides run with a tuned malloc.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=1073741824"


class Server:
    def __init__(self, command, env=None):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if not answer or answer[0] == "error":
            raise RuntimeError(f"{line!r}: {' '.join(answer) or 'no answer (the program stopped)'}")
        return answer

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def peer_python():
    """The first Python that has PyTorch: this one, else Debian's (python3-torch installs into
    /usr/bin/python3, which another python3 on the PATH may hide). None without one."""
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0:
            return python
    return None


def start_peer(python, blas_threads):
    """The peer with OpenBLAS limited to `blas_threads` (OpenBLAS starts one thread per core unless
    told, whatever torch.set_num_threads says: a "1-thread" peer would use both cores)."""
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, OPENBLAS_NUM_THREADS=str(blas_threads))
    return Server([python, os.path.join(HERE, "toy_transformer.py"), "--serve"], env)


def busy_loop():
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rankwise", required=True, help="path of the built benchmarks/toy_transformer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per mode per round (their median counts)")
    parser.add_argument("--threads-list", default="1,2")
    parser.add_argument("--busy-core", action="store_true")
    args = parser.parse_args()
    threads_list = [int(t) for t in args.threads_list.split(",")]
    if args.rounds < 1 or args.steps < 1 or not threads_list or min(threads_list) < 1:
        parser.error("--rounds, --steps and the thread counts must be >= 1")

    ours = Server([args.rankwise, "--serve"])
    python = peer_python()
    # The peer's thread settings for t threads: torch t and OpenBLAS 1, or (t > 1) torch 1 and OpenBLAS
    # t; both are timed every round and the faster one counts (their products and the rest of a step
    # parallelise differently; torch t with OpenBLAS t oversubscribes the cores and was 2.5x slower).
    peers = {b: start_peer(python, b) for b in sorted(set([1] + threads_list))} if python else {}
    peer = peers.get(1)
    candidates = {t: [(1, t)] + ([(t, 1)] if t > 1 else []) for t in threads_list}  # (OpenBLAS, torch)
    print("# toy transformer: vocab 128, d_model 128, 4 heads, 4 layers, d_ff 512, sequence 64, batch 32, float32")
    print("# " + " ".join(ours.ask("info")[1:]))
    peer_info = " ".join(peer.ask("info")[1:]) if peer else ""
    print("# " + (peer_info or "peer: missing (PyTorch is not installed; Debian: apt-get install python3-torch)"))
    if peer and "openblas" not in peer_info.lower():
        print("# WARNING: the peer does not run on OpenBLAS (Debian's torch calls whatever libblas.so.3 points to;"
              " the reference BLAS is many times slower): apt-get install libopenblas0-pthread for a fair peer")
    print(f"# environment: OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; the peer runs with GLIBC_TUNABLES={MALLOC_TUNABLES}")
    print(f"# {args.rounds} rounds x {args.steps} steps per mode, interleaved; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    peak = {t: [] for t in threads_list}
    ours_ms = {(m, t): [] for m in MODES for t in threads_list}
    cand_ms = {(m, t, c): [] for m in MODES for t in threads_list for c in candidates[t]}
    gflop = {}
    loads = []
    started = time.time()
    for r in range(args.rounds):
        for t in threads_list:
            peak[t].append(float(ours.ask(f"peak {t}")[1]))
            for m in MODES:
                sides = ["ours"] + (candidates[t] if peers else [])
                for side in sides if r % 2 == 0 else sides[::-1]:
                    if side == "ours":
                        answer = ours.ask(f"run {m} {t} {args.steps}")
                        ours_ms[(m, t)].append(float(answer[1]))
                        gflop[m] = float(answer[3])
                    else:
                        blas, torch_threads = side
                        answer = peers[blas].ask(f"run {m} {torch_threads} {args.steps}")
                        cand_ms[(m, t, side)].append(float(answer[1]))
        loads.append(os.getloadavg()[0])
        print(f"# round {r + 1}/{args.rounds} done, load average {loads[-1]:.2f}", flush=True)

    med = statistics.median
    # The peer's time per mode and thread count: its faster setting (medians over the rounds).
    peer_ms, peer_setting = {}, {}
    for m in MODES:
        for t in threads_list:
            if peers:
                best = min(candidates[t], key=lambda c: med(cand_ms[(m, t, c)]))
                peer_ms[(m, t)], peer_setting[(m, t)] = cand_ms[(m, t, best)], best
            else:
                peer_ms[(m, t)] = []
    print(f"\n# {time.time() - started:.0f} s; load average during the rounds: min {min(loads):.2f}, "
          f"max {max(loads):.2f} (2 cores)")
    print("| mode | threads | rankwise ms/step | peer ms/step | rankwise / peer | rankwise GFLOP/s | of FMA peak | peer GFLOP/s | peer setting |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in threads_list:
        for m in MODES:
            ms = med(ours_ms[(m, t)])
            pms = med(peer_ms[(m, t)]) if peer_ms[(m, t)] else None
            rate = gflop[m] / (ms * 1e-3)
            setting = f"torch {peer_setting[(m, t)][1]}, OpenBLAS {peer_setting[(m, t)][0]}" if pms else "-"
            print(f"| {m} | {t} | {ms:.1f} | {pms:.1f} | {ms / pms:.2f} | {rate:.0f} | {100 * rate / med(peak[t]):.0f} % | "
                  f"{gflop[m] / (pms * 1e-3):.0f} | {setting} |" if pms else
                  f"| {m} | {t} | {ms:.1f} | missing | - | {rate:.0f} | {100 * rate / med(peak[t]):.0f} % | - | - |")
    for t in threads_list:
        print(f"FMA-loop peak, {t} thread{'s' if t > 1 else ''}: {med(peak[t]):.0f} GFLOP/s (median of {len(peak[t])})")

    # (peak, at start): each mode in a process of its own, 1 thread, 3 steps; "at start" is the process
    # before the model (for the peer: after importing torch, about 0.3 GiB of it).
    rss_ours = {m: tuple(map(float, ours.ask(f"rss {m}")[1:3])) for m in MODES}
    rss_peer = {m: tuple(map(float, peer.ask(f"rss {m}")[1:3])) for m in MODES} if peer else None
    print("\n| mode | rankwise peak RSS MiB (above start) | peer peak RSS MiB (above start) |")
    print("|---|---|---|")
    for m in MODES:
        o = f"{rss_ours[m][0]:.1f} ({rss_ours[m][0] - rss_ours[m][1]:.1f})"
        p = f"{rss_peer[m][0]:.1f} ({rss_peer[m][0] - rss_peer[m][1]:.1f})" if rss_peer else "missing"
        print(f"| {m} | {o} | {p} |")

    busy = {}
    if args.busy_core and 2 in threads_list:
        hog = busy_loop()
        try:
            time.sleep(0.5)
            for m in MODES:
                one = [float(ours.ask(f"run {m} 1 {args.steps}")[1]) for _ in range(3)]
                two = [float(ours.ask(f"run {m} 2 {args.steps}")[1]) for _ in range(3)]
                busy[m] = (med(one), med(two))
        finally:
            hog.kill()
        print("\n| mode (one core kept busy) | rankwise 1 thread ms | rankwise 2 threads ms |")
        print("|---|---|---|")
        for m in MODES:
            print(f"| {m} | {busy[m][0]:.1f} | {busy[m][1]:.1f} |")

    print("\ntargets (docs/benchmarks.md):")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lora1 = med(ours_ms[("lora", 1)]) if 1 in threads_list else None
    if lora1:
        rate = gflop["lora"] / (lora1 * 1e-3)
        print(f"  {verdict(rate >= 0.5 * med(peak[1]))}  LoRA step, 1 thread, at least 50 % of the FMA peak: "
              f"{100 * rate / med(peak[1]):.0f} %")
        full1 = med(ours_ms[("full", 1)])
        print(f"  {verdict(lora1 <= 0.75 * full1)}  LoRA step at most 0.75x the full step (1 thread): {lora1 / full1:.2f}x")
        if peer:
            for m, limit in (("lora", 0.5), ("full", 0.6), ("inference", 0.6)):
                ratio = med(ours_ms[(m, 1)]) / med(peer_ms[(m, 1)])
                print(f"  {verdict(ratio <= limit)}  {m}, 1 thread, at most {limit}x the peer's time: {ratio:.2f}x")
    if 1 in threads_list and 2 in threads_list:
        for m in MODES:
            speedup = med(ours_ms[(m, 1)]) / med(ours_ms[(m, 2)])
            print(f"  {verdict(speedup >= 1.7)}  {m}: 2 threads at least 1.7x the 1-thread throughput: {speedup:.2f}x")
    for m in busy:
        print(f"  {verdict(busy[m][1] <= busy[m][0])}  {m}, one core busy: 2 threads no slower than 1: "
              f"{busy[m][1]:.1f} against {busy[m][0]:.1f} ms")
    print(f"  {verdict(rss_ours['lora'][0] < rss_ours['full'][0])}  memory: LoRA below full fine-tuning "
          f"({rss_ours['lora'][0]:.1f} against {rss_ours['full'][0]:.1f} MiB)")
    if rss_peer:
        above = lambda r: r[0] - r[1]  # noqa: E731
        ok = all(above(rss_ours[m]) < above(rss_peer[m]) for m in ("lora", "full"))
        print(f"  {verdict(ok)}  memory above the process's start, both below the peer's (LoRA "
              f"{above(rss_ours['lora']):.1f} against {above(rss_peer['lora']):.1f}, full {above(rss_ours['full']):.1f} "
              f"against {above(rss_peer['full']):.1f} MiB)")
    ours.close()
    for server in peers.values():
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
