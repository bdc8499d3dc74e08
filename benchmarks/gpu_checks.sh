#!/usr/bin/env bash
# Every GPU figure the project still owes, in one run that fits a short device loan (about 8 minutes on an
# H200): the estimator against torch.cuda.max_memory_allocated (training in bf16 and NF4, then sampling),
# the fused losses (torch chunked vs Triton vs liger-kernel, bf16) and the attention kernel vs SDPA.
# Usage: benchmarks/gpu_checks.sh [OUT_DIR]; each step's table goes to OUT_DIR/<step>.txt, and a step
# that overruns its limit is cut off without stopping the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-checks}}"
mkdir -p "$out"
python -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$out/device.txt"
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 20 "$out/$name.txt" | grep -v "^W[0-9]" | tee -a "$out/summary.txt"
    echo "(exit $rc)" | tee -a "$out/summary.txt"
}
step memory-train 180 python benchmarks/memory.py --models Qwen/Qwen2.5-0.5B-Instruct meta-llama/Llama-3.2-1B-Instruct --tokens 2048
step memory-generate 90 python benchmarks/memory.py --generate --models Qwen/Qwen2.5-0.5B-Instruct --sequences 64 --tokens 512 --new-tokens 128
step fused-loss 120 python benchmarks/fused_loss.py --tokens 4096 16384 --shapes 896x151936 4096x128256 --dtype bfloat16 --repeats 3
step attention 90 python benchmarks/attention.py --lengths 1024 4096 8192 --repeats 5
