"""MERIT's CPU kernel pass by pass against DeepSpeedCPUAdam's step, on one flat tensor.

    .venv/bin/python benchmarks/bench_kernel_passes.py [--rounds 7]

GPT-2 Small's 124.4M fp32 elements as one (162031, 768) matrix: DeepSpeedCPUAdam's step,
MERIT's pass 1 (statistics, reads w, g, m, v) and pass 2 (update, reads them again and writes
w, m, v), interleaved round by round (median and min over the rounds; load average printed).
If each MERIT pass costs about one Adam step, both are bound by memory bandwidth and a
two-pass MERIT cannot go below about 2x Adam on tensors larger than the caches. Prints only.
"""

import argparse
import os
import statistics
import time

import torch

from merit_ds import MERIT
from merit_ds.optim import cpu_kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    n = 162031 * 768
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen) * 0.02
    grad = torch.randn(n, generator=gen) * 1e-3
    p = base.clone().requires_grad_()
    p.grad = grad
    adam = DeepSpeedCPUAdam([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adamw_mode=True)
    adam.step()  # state allocated, not timed
    shape = (162031, 768)
    w, g = base.clone(), grad.clone()
    m, v = torch.zeros(n), torch.full((n,), 1e-6)
    group = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    slot = torch.zeros(MERIT.fragment_rule.stats_size(shape))
    times = {"DeepSpeedCPUAdam step": [], "MERIT pass 1": [], "MERIT pass 2": []}
    print(f"load average before: {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads")
    for _ in range(args.rounds):
        t = time.perf_counter()
        adam.step()
        times["DeepSpeedCPUAdam step"].append(time.perf_counter() - t)
        slot.zero_()
        t = time.perf_counter()
        cpu_kernel.fragment_statistics(shape, 0, w, g, m, v, group, slot)
        times["MERIT pass 1"].append(time.perf_counter() - t)
        ratios = cpu_kernel.ratio_tables(shape, slot)
        t = time.perf_counter()
        cpu_kernel.fragment_apply(shape, 0, w, g, m, v, group, ratios, 1e-9)
        times["MERIT pass 2"].append(time.perf_counter() - t)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ref = statistics.median(times["DeepSpeedCPUAdam step"])
    for k, t in times.items():
        print(f"{k:24s} median {statistics.median(t):.4f} s  min {min(t):.4f} s  "
              f"reads at min {16 * n / min(t) / 1e9:.1f} GB/s  vs Adam (medians) {statistics.median(t) / ref:.2f}x")


if __name__ == "__main__":
    main()
