#!/usr/bin/env bash
# Every GPU figure the project still owes, in one run that fits a short device loan (about 6 minutes on an H200, 8
# at most: the step limits below add up to 480 s):
#   memory-train     the estimator vs torch.cuda.max_memory_allocated: sft, dpo (TRL's DPOTrainer) and distill in NF4 +
#                    bf16 compute on Qwen2.5-0.5B and Llama-3.2-1B, 2,048 tokens (benchmarks/memory.py)
#   memory-generate  the same for sampling (the teacher's generate stage)
#   fused-precision  fused vs unfused SFT loss in bf16 and fp16 + GradScaler, torch and Triton backends
#   fused-loss       our fused loss (torch chunked, Triton) vs liger-kernel vs the naive reference, bf16
#   attention        the attention kernel's max error at the card's own block configuration, and its speed vs SDPA
#   plan_efficiency  the planner's efficiency factors measured: NF4 decode per step and LoRA training MFU vs plan.py
# Each step runs under `timeout` (its subprocesses with it) and writes its JSON (record.write_result) into
# benchmarks/results/<device>/; the last step merges them into benchmarks/results/<device>/<commit>.json, naming
# the steps that wrote nothing with their exit codes (124: cut off). Tables go to OUT_DIR/<step>.txt.
# Usage: benchmarks/gpu_checks.sh [OUT_DIR]
#        benchmarks/gpu_checks.sh --dry-run [OUT_DIR]   # on a CPU: every step at toy sizes, results as dryrun_*.json
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-${OUT:-gpu-checks}}"
mkdir -p "$out"
: > "$out/summary.txt"
: > "$out/exit_codes.txt"
if [ $dry = 0 ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --dry-run'; print(torch.cuda.get_device_name(0), torch.__version__)" \
        | tee "$out/device.txt" || exit 1
    prefix=""
else
    prefix="dryrun_"
fi
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$out/summary.txt"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 20 "$out/$name.txt" | grep -v "^W[0-9]" | tee -a "$out/summary.txt"
    echo "(exit $rc, $((SECONDS - started)) s)" | tee -a "$out/summary.txt"
    echo "$name $rc" >> "$out/exit_codes.txt"
}
if [ $dry = 0 ]; then
    step memory_nf4_bf16 160 python benchmarks/memory.py --tokens 2048 --write memory_nf4_bf16
    step memory_generate 50 python benchmarks/memory.py --generate --models Qwen/Qwen2.5-0.5B-Instruct --sequences 64 \
        --tokens 512 --new-tokens 128 --write memory_generate
    step fused_precision 50 python benchmarks/fused_precision.py --write fused_precision
    step fused_loss_gpu 80 python benchmarks/fused_loss.py --tokens 16384 --shapes 896x151936 4096x128256 --dtype bfloat16 \
        --repeats 3 --peer liger --write fused_loss_gpu
    step attention 70 python benchmarks/attention.py --lengths 1024 4096 8192 --repeats 5 --write attention
    step plan_efficiency 70 python benchmarks/plan_efficiency.py --write plan_efficiency
else  # the same scripts and flags at toy sizes, so the plumbing (JSON, merge) is checked without a GPU
    step memory_nf4_bf16 400 python benchmarks/memory.py --models Qwen/Qwen2.5-0.5B-Instruct --layers 2 --tokens 64 \
        --write dryrun_memory_nf4_bf16
    step memory_generate 200 python benchmarks/memory.py --generate --models Qwen/Qwen2.5-0.5B-Instruct --layers 2 \
        --sequences 2 --tokens 32 --new-tokens 4 --write dryrun_memory_generate
    step fused_precision 200 python benchmarks/fused_precision.py --device cpu --write dryrun_fused_precision
    step fused_loss_gpu 200 python benchmarks/fused_loss.py --tokens 256 --shapes 64x4000 --repeats 1 \
        --write dryrun_fused_loss_gpu
    step attention 60 python benchmarks/attention.py --help  # its GPU path needs CUDA; TRITON_INTERPRET=1 runs the CPU check
    step plan_efficiency 200 python benchmarks/plan_efficiency.py --layers 2 --sequences 1 2 --prompt 16 --new-tokens 2 6 \
        --train-tokens 32 --train-batch 1 --steps 1 --write dryrun_plan_efficiency
fi
python benchmarks/merge_results.py memory_nf4_bf16 memory_generate fused_precision fused_loss_gpu attention plan_efficiency \
    --exit-codes "$out/exit_codes.txt" --prefix "$prefix" | tee -a "$out/summary.txt"
if [ $dry = 1 ]; then  # toy numbers are no results: move them out of benchmarks/results
    mv benchmarks/results/"$(cd benchmarks && python -c "from record import machine_name; print(machine_name())")"/dryrun_*.json "$out"/
fi
