"""The planner's efficiency factors on a real card: decode and LoRA training measured, beside what plan.py assumes.

    python benchmarks/plan_efficiency.py --write plan_efficiency          # on a GPU (gpu_checks.sh runs it)
    python benchmarks/plan_efficiency.py --layers 2 --new-tokens 4 8      # plumbing only, on a CPU

`plan.py` turns a card's spec-sheet bandwidth and TFLOP/s into time with efficiency factors taken from published
figures (DECODE_BANDWIDTH_EFFICIENCY, DECODE_STEP_OVERHEAD_S, TRAINING_MFU). This measures what they stand for, on
random weights of a real architecture loaded as the stages load it (NF4, bf16 compute):
- decode: transformers `generate` of `--sequences` sequences, forced to two lengths; the time per step is the
  difference over the extra steps, so prefill and set-up cancel. Planned: plan.decode_seconds' per-step term.
  On a small model and a fast card the step is mostly the fixed per-step cost (a 0.5B's weights take ~0.1 ms to read
  at H200 bandwidth), so what this measures is DECODE_STEP_OVERHEAD_S: implied overhead = measured step - the bytes
  term. Run it with a larger `--model` (e.g. Qwen/Qwen2.5-7B-Instruct, where time allows) to weigh the bandwidth.
- training: LoRA steps of the SFT stage as a preset runs it (gradient checkpointing, the fused loss inside the
  forward, bf16 autocast, AdamW); implied MFU = plan.training_flops_per_token x tokens / step time / peak TFLOP/s.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import _batch, _load, _loss, _preset, _with_lora, case_plan  # noqa: E402  (the stages' own loading)
from record import write_result  # noqa: E402


def decode_step_seconds(lm, sequences: int, prompt: int, lengths: tuple[int, int], device: str) -> float:
    import torch

    input_ids = torch.randint(1000, (sequences, prompt), device=device)
    times = []
    for new_tokens in lengths:
        best = float("inf")
        for _ in range(2):  # the first call of a shape warms kernels and the allocator
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.no_grad():
                lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        times.append(best)
    return (times[1] - times[0]) / (lengths[1] - lengths[0])


def training_step_seconds(saved: str, tokens: int, batch_size: int, steps: int, cuda: bool) -> tuple[float, object]:
    import contextlib

    import torch

    from budget_reasoner.plan import prepare_for_kbit_training

    preset = _preset(tokens, "sft", True, "bfloat16", True, True)
    preset.sft.batch_size = batch_size
    plan = case_plan(preset, "sft", "bfloat16", cuda)
    lm, _, device = _load(saved, True, cuda, plan.compute_dtype)
    lm = _with_lora(prepare_for_kbit_training(lm, plan), preset, True)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    batch = {key: value.expand(batch_size, *value.shape[1:]).contiguous() for key, value in _batch("sft", tokens, preset, device).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if plan.autocast_dtype else contextlib.nullcontext()
    durations = []
    for _ in range(steps + 1):  # the first step warms up
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            loss = _loss(lm, "sft", batch, preset, True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - started)
    return min(durations[1:]), preset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--layers", type=int, help="plumbing checks only: cut the model to this many layers")
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[16, 80])
    parser.add_argument("--train-tokens", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--card", help="the card table's entry to compare with (default: the card here, else h200)")
    parser.add_argument("--write", metavar="NAME")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from budget_reasoner.hardware import card, nearest_card
    from budget_reasoner.memory import KNOWN_CONFIGS, lora_parameters, read_model_shape
    from budget_reasoner.plan import (DECODE_BANDWIDTH_EFFICIENCY, DECODE_STEP_OVERHEAD_S, DTYPE_BYTES, TRAINING_MFU,
                                      decode_bytes, plan_for, training_flops_per_token)

    cuda = torch.cuda.is_available()
    if args.card:
        chosen = card(args.card)
    elif cuda:
        props = torch.cuda.get_device_properties(0)
        chosen = nearest_card(props.total_memory / 2**30, props.name)
    else:
        chosen = card("h200")
    index = json.loads((KNOWN_CONFIGS / "index.json").read_text())
    fields = json.loads((KNOWN_CONFIGS / index[args.model]).read_text())
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    rows = {"card": chosen.key, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": args.model,
            "layers": fields["num_hidden_layers"], "decode": [], "training": None}
    with tempfile.TemporaryDirectory() as folder:
        saved = os.path.join(folder, "model")
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields)).save_pretrained(saved)
        shape = read_model_shape(saved)
        lm, _, device = _load(saved, True, cuda)
        lm.eval()
        preset = _preset(args.prompt, "sft", True, "bfloat16", False, False)
        plan = plan_for(preset, "generate", "cuda")
        kv_per_token = 2 * shape.layers * shape.kv_dim * DTYPE_BYTES[plan.compute_dtype]
        for sequences in args.sequences:
            measured = decode_step_seconds(lm, sequences, args.prompt, tuple(args.new_tokens), device)
            context = args.prompt + sum(args.new_tokens) / 2
            step_bytes = decode_bytes(shape, plan) + sequences * context * kv_per_token
            bandwidth_term = step_bytes / (chosen.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY["transformers"])
            planned = bandwidth_term + DECODE_STEP_OVERHEAD_S["transformers"]
            rows["decode"].append({"sequences": sequences, "measured_step_s": measured, "planned_step_s": planned,
                                   "measured_over_planned": measured / planned, "step_bytes": step_bytes,
                                   "implied_step_overhead_s": measured - bandwidth_term,
                                   "assumed_step_overhead_s": DECODE_STEP_OVERHEAD_S["transformers"]})
            print(rows["decode"][-1], flush=True)
        del lm
        if cuda:
            torch.cuda.empty_cache()
        seconds, train_preset = training_step_seconds(saved, args.train_tokens, args.train_batch, args.steps, cuda)
        tokens = args.train_tokens * args.train_batch
        flops = training_flops_per_token(shape, train_preset, "sft", lora_parameters(shape, train_preset)) * tokens
        rows["training"] = {"tokens_per_step": tokens, "step_s": seconds, "implied_mfu": flops / seconds / (chosen.tflops16 * 1e12),
                            "assumed_mfu": TRAINING_MFU["bitsandbytes"]}
        print(rows["training"], flush=True)
    if args.write:
        print("wrote", write_result(args.write, rows))


if __name__ == "__main__":
    main()
