"""Fused linear cross-entropy vs the naive full-logits reference and peers (liger-kernel, Apple's Cut Cross-Entropy): time and peak memory.

    python benchmarks/fused_loss.py                       # CPU: 4,096 tokens, H=896, V=151,936, fp32
    python benchmarks/fused_loss.py --peer cce --repeats 2 --write fused_loss_cce   # CPU: ours vs CCE vs eager
    python benchmarks/fused_loss.py --tokens 1024 4096 16384 --shapes 896x151936 4096x128256 --dtype bfloat16   # GPU

Backends: `reference` (eager naive: full logits, F.cross_entropy), `torch` (ours, chunked, eager: the default),
`torch-compiled` (ours with BUDGET_REASONER_COMPILE=1: the per-chunk softmax-gradient compiled), `triton` (ours, CUDA), `liger`
(liger-kernel's fused linear cross-entropy), `cce` (cut-cross-entropy's `linear_cross_entropy(impl="torch_compile")`,
its CPU implementation; `--peer cce` installs nothing itself: `pip install cut-cross-entropy==25.1.1`).
Each case runs in a fresh subprocess: one warm-up step (compilation happens there), then `--repeats` timed steps,
best kept. Peak memory is that of the timed steps alone: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the
high-water RSS reset after the warm-up (/proc/self/clear_refs). "Added" is the peak minus the memory held before the
timed steps (hidden states and weight), so the weight's own gradient counts.
"""

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Reset the process's high-water RSS (Linux), so a warm-up's peak (a compile's, say) is not counted."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def run_case(backend: str, tokens: int, hidden: int, vocab: int, dtype_name: str, device: str, repeats: int,
             softcap: float | None = None) -> dict:
    import torch

    from budget_reasoner.kernels import fused_linear_cross_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    h = torch.empty(tokens, hidden, dtype=dtype, device=device).normal_().requires_grad_()
    w = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(std=0.02).requires_grad_()
    labels = torch.randint(vocab, (tokens,), device=device)
    labels[::10] = -100

    if backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        step = lambda: liger(w, h, labels)  # noqa: E731  (liger takes the weight first)
    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device == "cuda" else "torch_compile"  # CCE's Triton kernels need CUDA
        step = lambda: linear_cross_entropy(h, w, labels, softcap=softcap, impl=impl)  # noqa: E731
    elif backend == "torch-compiled":
        import os

        os.environ["BUDGET_REASONER_COMPILE"] = "1"  # read at each call
        step = lambda: fused_linear_cross_entropy(h, w, labels, backend="torch", softcap=softcap)  # noqa: E731
    else:
        step = lambda: fused_linear_cross_entropy(h, w, labels, backend=backend, softcap=softcap)  # noqa: E731

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    step().backward()  # warm-up: kernel compilation, allocator pools
    h.grad = w.grad = None
    sync()
    warmup = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = rss_bytes()
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        started = time.perf_counter()
        step().backward()
        sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return {"backend": backend, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype_name,
            "softcap": softcap, "seconds": min(times), "all_seconds": times, "warmup_seconds": warmup,
            "added_bytes": peak - before, "threads": torch.get_num_threads()}


NAMES = {"reference": "eager naive (full logits)", "torch": "ours, chunked (eager, the default)",
         "torch-compiled": "ours, chunked, compiled softmax-gradient", "cce": "Cut Cross-Entropy (torch_compile)", "liger": "liger-kernel",
         "triton": "ours, Triton"}


def markdown_table(result: dict) -> str:
    lines = ["| implementation | seconds (best of {}) | compile / warm-up s | added memory MB |".format(result.get("repeats", "?")),
             "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {NAMES.get(row['backend'], row['backend'])} | {row['seconds']:.1f} | {row['warmup_seconds']:.1f} | "
                     f"{row['added_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", nargs="+", default=["896x151936"], help="HIDDENxVOCAB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backends", nargs="+", default=None, help="default: reference torch (+ triton liger on CUDA)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--softcap", type=float, default=None, help="final_logit_softcapping, e.g. 30 (Gemma 2)")
    parser.add_argument("--peer", choices=["cce", "liger"], help="add a peer: cce = Apple's Cut Cross-Entropy (torch_compile "
                        "impl on the CPU), liger = liger-kernel; on the CPU with cce: reference, torch, torch-compiled, cce")
    parser.add_argument("--write", metavar="NAME", help="save the rows as benchmarks/results/<machine>/NAME.json")
    parser.add_argument("--label", help="a note saved with --write (e.g. which code ran, when PYTHONPATH points elsewhere)")
    parser.add_argument("--table", metavar="JSON", help="print the README's markdown table of a --write result, and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    if args.case:  # child process: one measurement
        print(json.dumps(run_case(**json.loads(args.case))))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = args.backends or (["reference", "torch", "triton", "liger"] if device == "cuda" else ["reference", "torch"])
    if args.peer == "cce" and not args.backends:
        backends = ["reference", "torch", "triton", "cce"] if device == "cuda" else ["reference", "torch", "torch-compiled", "cce"]
    if args.peer and importlib.util.find_spec({"cce": "cut_cross_entropy", "liger": "liger_kernel"}[args.peer]) is None:
        sys.exit(f"--peer {args.peer}: pip install {'cut-cross-entropy==25.1.1' if args.peer == 'cce' else 'liger-kernel==0.8.5'} first")
    rows = []
    for shape in args.shapes:
        hidden, vocab = map(int, shape.split("x"))
        for tokens in args.tokens:
            for backend in backends:
                case = dict(backend=backend, tokens=tokens, hidden=hidden, vocab=vocab, dtype_name=args.dtype,
                            device=device, repeats=args.repeats, softcap=args.softcap)
                result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{backend} {tokens} {shape}: failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                    continue
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"{backend} {tokens} {shape}: {rows[-1]['seconds']:.2f} s, {rows[-1]['added_bytes'] / 2**20:.0f} MB added "
                      f"(warm-up {rows[-1]['warmup_seconds']:.1f} s)", flush=True)
    print(f"\ndevice {device}, dtype {args.dtype}, softcap {args.softcap}, forward+backward of the loss, grads for hidden and weight")
    print(f"{'H x V':>14} {'tokens':>7} {'backend':>10} {'seconds':>9} {'added MB':>10} {'vs reference':>22}")
    for row in rows:
        reference = next((r for r in rows if r["backend"] == "reference" and r["tokens"] == row["tokens"]
                          and r["vocab"] == row["vocab"] and r["hidden"] == row["hidden"]), None)
        ratio = (f"{row['seconds'] / reference['seconds']:.2f}x time, {row['added_bytes'] / reference['added_bytes']:.3f}x mem"
                 if reference and row is not reference else "")
        print(f"{row['hidden']:>6} x {row['vocab']:<6} {row['tokens']:>7} {row['backend']:>10} {row['seconds']:>9.2f} "
              f"{row['added_bytes'] / 2**20:>10.0f} {ratio:>22}")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import write_result

        print(f"wrote {write_result(args.write, {'device': device, 'dtype': args.dtype, 'repeats': args.repeats, 'label': args.label, 'rows': rows})}")


if __name__ == "__main__":
    main()
