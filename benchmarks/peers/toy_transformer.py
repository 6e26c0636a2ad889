#!/usr/bin/env python3
"""The PyTorch peer of benchmarks/toy_transformer: the same toy transformer, configuration, data sizes
and optimizer, in the three modes the rankwise benchmark times.

  model      token + position embeddings N(0, 0.02^2); 4 pre-LayerNorm blocks (causal attention with
             q, k, v, o projections and 4 heads; MLP up, exact (erf) GELU, down); a final LayerNorm; an
             untied lm_head; every Linear with a bias (rankwise/models/toy_transformer.hpp)
  sizes      vocabulary 128, d_model 128, d_ff 512, sequence 64, batch 32 (2,048 tokens a step), float32
  modes      full   every parameter trained by AdamW (lr 1e-4, betas 0.9 / 0.999, eps 1e-8, no weight
                    decay: rankwise's AdamWOptions defaults)
             lora   LoRA r = 8, alpha 16 on the six projections of every block, the rest frozen, AdamW on
                    the adapters only (A Kaiming-uniform, B zero, as PEFT)
             inference  forward only, under torch.inference_mode()
  step       zero_grad(set_to_none=False), forward, mean token cross-entropy, backward, AdamW.step()

How the peer is tuned (docs/benchmarks.md, "The PyTorch peer"): torch.set_num_threads(threads) before
each run and one inter-op thread; AdamW with foreach=True (one fused pass over the parameter lists;
faster on CPU than the per-parameter loop here, measured with --compare-foreach); gradients kept
allocated between steps (set_to_none=False), as rankwise keeps its buffers; glibc's malloc tuned by the
driver exactly as for rankwise (GLIBC_TUNABLES mmap and trim thresholds, so that large blocks are not
unmapped and faulted in again every step). The attention is written out with matrix products and a
masked softmax, as in rankwise, rather than with a fused kernel that rankwise does not have; PyTorch
1.13 on the CPU has no flash attention to fall back on either.

Run as a server for benchmarks/peers/compare.py (commands on stdin, answers on stdout, one line each):
  info | run <full|lora|inference> <threads> <steps> | rss <mode>
Or alone: python3 benchmarks/peers/toy_transformer.py --mode lora --threads 1 --steps 20
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # the driver reports the peer as missing
    torch = None

VOCAB, D_MODEL, HEADS, LAYERS, D_FF, SEQ, BATCH, RANK, ALPHA = 128, 128, 4, 4, 512, 64, 32, 8, 16.0


if torch is not None:

    class LoRALinear(nn.Module):
        """A frozen Linear plus scale * B (A x), A r x in (Kaiming-uniform), B out x r (zero)."""

        def __init__(self, base, rank, alpha):
            super().__init__()
            self.base = base
            for p in self.base.parameters():
                p.requires_grad_(False)
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = nn.LayerNorm(D_MODEL)
            self.q_proj = nn.Linear(D_MODEL, D_MODEL)
            self.k_proj = nn.Linear(D_MODEL, D_MODEL)
            self.v_proj = nn.Linear(D_MODEL, D_MODEL)
            self.o_proj = nn.Linear(D_MODEL, D_MODEL)
            self.mlp_norm = nn.LayerNorm(D_MODEL)
            self.up_proj = nn.Linear(D_MODEL, D_FF)
            self.down_proj = nn.Linear(D_FF, D_MODEL)
            mask = torch.full((SEQ, SEQ), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, x):  # x: batch x seq x d_model
            b, t, d = x.shape
            n = self.attn_norm(x)
            hd = d // HEADS
            q = self.q_proj(n).view(b, t, HEADS, hd).transpose(1, 2)
            k = self.k_proj(n).view(b, t, HEADS, hd).transpose(1, 2)
            v = self.v_proj(n).view(b, t, HEADS, hd).transpose(1, 2)
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd) + self.mask[:t, :t]
            a = torch.softmax(scores, dim=-1) @ v
            h = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
            return h + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(h))))

    class ToyTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, D_MODEL)
            self.embed_positions = nn.Embedding(SEQ, D_MODEL)
            nn.init.normal_(self.embed_tokens.weight, std=0.02)
            nn.init.normal_(self.embed_positions.weight, std=0.02)
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = nn.LayerNorm(D_MODEL)
            self.lm_head = nn.Linear(D_MODEL, VOCAB)
            self.register_buffer("positions", torch.arange(SEQ), persistent=False)

        def forward(self, ids):
            x = self.embed_tokens(ids) + self.embed_positions(self.positions[: ids.shape[1]])
            for block in self.layers:
                x = block(x)
            return self.lm_head(self.norm(x))

    def inject_lora(model):
        for block in model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"):
                setattr(block, name, LoRALinear(getattr(block, name), RANK, ALPHA))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)

    class Runner:
        def __init__(self, mode, foreach=True):
            torch.manual_seed(5)
            self.mode = mode
            self.model = ToyTransformer()
            if mode == "lora":
                inject_lora(self.model)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=0.0, foreach=foreach)
            self.ids = torch.randint(0, VOCAB, (BATCH, SEQ))
            self.targets = torch.randint(0, VOCAB, (BATCH, SEQ))
            self.model.train(mode != "inference")

        def step(self):
            if self.mode == "inference":
                with torch.inference_mode():
                    self.model(self.ids)
                return
            self.optimizer.zero_grad(set_to_none=False)
            logits = self.model(self.ids)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), self.targets.reshape(-1))
            loss.backward()
            self.optimizer.step()


def step_times(runner, threads, steps):
    torch.set_num_threads(threads)
    runner.step()  # not measured: the first step after a change of threads or mode
    wall, cpu = [], []
    for _ in range(max(1, steps)):
        w, c = time.perf_counter(), time.process_time()
        runner.step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def status_mib(field):
    """A "Vm...: n kB" line of /proc/self/status, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mib(mode):
    """Peak resident memory of 3 steps of `mode` in a process of its own, and before the model (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", mode], capture_output=True, text=True,
                         check=True)
    peak, start = out.stdout.split()[-2:]
    return float(peak), float(start)


def serve():
    runners = {}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "info":
            print(f"info PyTorch {torch.__version__}, BLAS at run time: {blas_library()}, {cpu_capability()}",
                  flush=True)
        elif words[0] == "run" and len(words) == 4:
            mode, threads, steps = words[1], int(words[2]), int(words[3])
            if mode not in runners:
                runners[mode] = Runner(mode)
            wall, cpu = step_times(runners[mode], threads, steps)
            print(f"run {wall:.4f} {cpu:.4f}", flush=True)
        elif words[0] == "rss" and len(words) == 2:
            peak, start = peak_rss_mib(words[1])
            print(f"rss {peak:.1f} {start:.1f}", flush=True)
        else:
            print(f"error unknown command: {line.strip()}", flush=True)


def blas_library():
    """The BLAS library this process runs on (Debian's torch calls libblas.so.3, whichever library the
    system's alternatives point it to: the reference BLAS is about 15 times slower than OpenBLAS)."""
    torch.ones(2, 2) @ torch.ones(2, 2)  # make sure the library is loaded
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "blas" in line.lower() and "/" in line}
    real = sorted({os.path.realpath(p) for p in paths})
    return ", ".join(real) if real else "unknown (none mapped)"


def cpu_capability():
    for line in torch.__config__.show().splitlines():
        if "CPU capability" in line:
            return line.strip()
    return "CPU capability unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="answer benchmarks/peers/compare.py's commands")
    parser.add_argument("--rss-child", metavar="MODE", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["full", "lora", "inference"], default="lora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compare-foreach", action="store_true",
                        help="time AdamW with foreach=False and True (the tuning choice)")
    args = parser.parse_args()
    if torch is None:
        print("missing: PyTorch is not installed (Debian: apt-get install python3-torch)", flush=True)
        return 3
    torch.set_num_interop_threads(1)
    if args.rss_child:
        # Importing torch peaks above what the model needs later: the high-water mark is reset after
        # it (Linux: writing 5 to /proc/self/clear_refs), so the peak is that of the model's steps.
        torch.set_num_threads(1)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = status_mib("VmRSS")
        runner = Runner(args.rss_child)
        for _ in range(3):
            runner.step()
        print(status_mib("VmHWM"), start)
        return 0
    if args.serve:
        serve()
        return 0
    if args.compare_foreach:
        for foreach in (False, True):
            wall, cpu = step_times(Runner(args.mode, foreach), args.threads, args.steps)
            print(f"{args.mode}, {args.threads} threads, foreach={foreach}: {wall:.1f} ms/step wall, {cpu:.1f} CPU")
        return 0
    wall, cpu = step_times(Runner(args.mode), args.threads, args.steps)
    print(f"{args.mode}, {args.threads} threads: {wall:.1f} ms/step wall, {cpu:.1f} ms/step CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
