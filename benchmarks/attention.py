"""Fused attention (budget_flash) vs PyTorch SDPA and the naive reference: forward+backward time and peak memory.

    python benchmarks/attention.py                       # GPU: T in 1k/4k/8k, D=128, 32 query / 8 kv heads, bf16
    TRITON_INTERPRET=1 python benchmarks/attention.py    # CPU: correctness only, small shapes

On a GPU each case reports the best of a few timed runs and torch.cuda.max_memory_allocated above the inputs.
"""

import argparse
import time

import torch

from budget_reasoner.kernels.attention import flash_attention


def run(backend, q, k, v, repeats):
    times = []
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        started = time.perf_counter()
        flash_attention(q, k, v, causal=True, backend=backend).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def gpu(lengths, repeats):
    print(f"{'T':>6} {'backend':>10} {'ms fwd+bwd':>11} {'TFLOP/s':>8} {'peak MB':>9}")
    for length in lengths:
        q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flops = 3.5 * 4 * 32 * length * length * 128 / 2  # causal: half the scores; backward ~2.5x forward
        for backend in ("triton", "sdpa", "reference"):
            if backend == "reference" and length > 4096:
                continue
            run(backend, q, k, v, 1)  # compile / warm up
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            seconds = run(backend, q, k, v, repeats)
            peak = torch.cuda.max_memory_allocated() - base
            print(f"{length:>6} {backend:>10} {seconds * 1e3:>11.2f} {flops / seconds / 1e12:>8.1f} {peak / 2**20:>9.0f}")


def cpu_correctness():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 37, 64, requires_grad=True)
    k = torch.randn(1, 2, 37, 64, requires_grad=True)
    v = torch.randn(1, 2, 37, 64, requires_grad=True)
    results = {}
    for backend in ("triton", "reference"):
        out = flash_attention(q, k, v, backend=backend)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        results[backend] = (out, *grads)
    errors = [(a - b).abs().max().item() for a, b in zip(results["triton"], results["reference"])]
    print("CPU (interpreter), T=37, D=64, GQA 4/2, causal: max abs error out %.2e, dq %.2e, dk %.2e, dv %.2e" % tuple(errors))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu(args.lengths, args.repeats)
    else:
        cpu_correctness()


if __name__ == "__main__":
    main()
