"""Fused attention (budget_flash) vs PyTorch SDPA and the naive reference: forward+backward time and peak memory.

    python benchmarks/attention.py [--write attention]   # GPU: T in 1k/4k/8k, D=128, 32 query / 8 kv heads, bf16
    TRITON_INTERPRET=1 python benchmarks/attention.py    # CPU: errors at every GPU's block configuration

On a GPU: first the kernel's max abs error against the fp32 reference at the card's own block configuration
(`kernel_configs` for its compute capability; D in 64/128/256, bf16 and fp16, causal, GQA 2:1, a right- and a
left-padded row), then each speed case's best of a few timed runs and torch.cuda.max_memory_allocated above the inputs.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from budget_reasoner.kernels.attention import flash_attention, kernel_configs, shared_memory_bytes


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


def gpu_errors() -> list[dict]:
    """The kernel at this card's own block configuration vs the fp32 reference, on the card."""
    from budget_reasoner.kernels.attention import device_capability

    capability = device_capability(torch.device("cuda"))
    rows = []
    print(f"{'D':>4} {'dtype':>9} {'forward':>26} {'backward':>26} {'out err':>9} {'grad err':>9}")
    for dim in (64, 128, 256):
        for dtype in (torch.bfloat16, torch.float16):
            configs = kernel_configs(dim, capability, dtype)
            length = max(configs[0].block_m, configs[1].block_m, configs[1].block_n) * 2 + 17
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(2, h, length, dim, generator=generator).to("cuda", dtype).requires_grad_() for h in (2, 1, 1))
            keys = torch.ones(2, length, dtype=torch.bool, device="cuda")
            keys[0, length - 11:] = False
            keys[1, :5] = False
            upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to("cuda")
            results = []
            for backend in ("triton", "reference"):
                inputs = [t if backend == "triton" else t.detach().float().requires_grad_() for t in (q, k, v)]
                out = flash_attention(*inputs, backend=backend, key_padding_mask=keys)  # triton: the card's own blocks
                results.append((out, *torch.autograd.grad(out, inputs, upstream.to(out.dtype))))
            errors = [(a.float() - b).abs().max().item() for a, b in zip(*results)]
            rows.append({"head_dim": dim, "dtype": str(dtype).removeprefix("torch."), "forward_config": str(configs[0]),
                         "backward_config": str(configs[1]), "out_max_abs_error": errors[0], "grad_max_abs_error": max(errors[1:])})
            print(f"{dim:>4} {rows[-1]['dtype']:>9} {str(configs[0]):>26} {str(configs[1]):>26} {errors[0]:>9.1e} {max(errors[1:]):>9.1e}",
                  flush=True)
    return rows


def gpu(lengths, repeats) -> list[dict]:
    rows = []
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
            print(f"{length:>6} {backend:>10} {seconds * 1e3:>11.2f} {flops / seconds / 1e12:>8.1f} {peak / 2**20:>9.0f}", flush=True)
            rows.append({"length": length, "backend": backend, "seconds": seconds, "tflops": flops / seconds / 1e12,
                         "peak_added_bytes": peak})
    return rows


CAPABILITIES = {"sm75": (7, 5), "sm86": (8, 6), "sm80": (8, 0), "sm90": (9, 0)}


def max_errors(q, k, v, keys, configs):
    """Max abs error of (out, dq, dk, dv): the kernel on q, k, v vs the fp32 reference on the same values."""
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    results = []
    for backend in ("triton", "reference"):
        inputs = [t if backend == "triton" else t.detach().float().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*inputs, backend=backend, key_padding_mask=keys, configs=configs if backend == "triton" else None)
        results.append((out, *torch.autograd.grad(out, inputs, upstream.to(out.dtype))))
    return [(a.float() - b).abs().max().item() for a, b in zip(*results)]


def cpu_correctness():
    """Every (head dim, GPU) configuration of the table, run by the interpreter at its real tile sizes: causal,
    GQA 2:1, batch 2 with a right-padded and a left-padded row, T odd and past two of the larger tile."""
    print(f"{'D':>4} {'GPU':>5} {'forward':>26} {'backward':>26} {'shared B':>16} "
          f"{'fp32 out':>9} {'fp32 grad':>9} {'bf16 out':>9} {'bf16 grad':>9} {'fp16 out':>9} {'fp16 grad':>9}")
    for dim in (64, 128, 256):
        for arch, capability in CAPABILITIES.items():
            row = []
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                configs = kernel_configs(dim, capability, torch.bfloat16)  # fp32 runs the same tiles
                length = max(configs[0].block_m, configs[1].block_m, configs[1].block_n) + 17
                generator = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(2, h, length, dim, generator=generator).to(dtype).requires_grad_() for h in (2, 1, 1))
                keys = torch.ones(2, length, dtype=torch.bool)
                keys[0, length - 11:] = False
                keys[1, :5] = False
                errors = max_errors(q, k, v, keys, configs)
                row += [errors[0], max(errors[1:])]
            shared = "/".join(str(shared_memory_bytes(c, dim, 2, backward=b)) for b, c in enumerate(configs))
            print(f"{dim:>4} {arch:>5} {str(configs[0]):>26} {str(configs[1]):>26} {shared:>16} "
                  + " ".join(f"{e:>9.1e}" for e in row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", metavar="NAME", help="GPU: save the rows as benchmarks/results/<machine>/NAME.json")
    args = parser.parse_args()
    if torch.cuda.is_available():
        numbers = {"errors": gpu_errors(), "speed": gpu(args.lengths, args.repeats)}
        if args.write:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from record import write_result

            print(f"wrote {write_result(args.write, numbers)}")
    else:
        cpu_correctness()


if __name__ == "__main__":
    main()
