"""The VRAM estimator against measured peaks: one LoRA training step of randomly initialized real architectures.

    python benchmarks/memory.py [--models Qwen/Qwen2.5-0.5B-Instruct meta-llama/Llama-3.2-1B-Instruct] [--tokens 512]
    python benchmarks/memory.py --generate [--sequences 16 --tokens 512 --new-tokens 32]

`--generate` measures sampling instead (the teacher's generate stage and eval): `sequences` prompts of
`tokens` tokens decoded together for `new-tokens` steps, with the same logits processor our generation
uses, against `estimate_inference_memory(..., "generate")`.

Each case runs in a fresh subprocess. Measured = the bytes of the model's tensors (weights, quantization
state, adapters) + what one step (forward, backward, optimizer step) adds at its peak: on the CPU the
rise of the high-water RSS (reset with /proc/self/clear_refs just before the step), on CUDA of
torch.cuda.max_memory_allocated. (RSS alone would also count the safetensors file pages that loading
maps in.) The estimate is `budget_reasoner.memory.estimate_training_memory` for the same preset,
without the CUDA context.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


# glibc's per-thread arenas and moving mmap threshold made the same case's peak RSS move by ~0.9 GiB between
# runs; one arena and a fixed threshold (large blocks always mmapped, so freed ones leave RSS) steady it
STEADY_MALLOC = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _quant_state_tensors(module):
    """The absmax and code tensors of a bitsandbytes 4-bit weight (not parameters, so counted apart)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return []
    tensors = [state.absmax, state.code]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if t is not None]


def run_case(model: str, tokens: int, four_bit: bool, checkpointing: bool, fused: bool, saved: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from budget_reasoner.config import Preset
    from budget_reasoner.kernels.patch import fused_causal_lm_loss
    from budget_reasoner.memory import estimate_training_memory, read_model_shape

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    lm, _, device = _load(saved, four_bit, cuda)
    if four_bit:  # what budget_reasoner.train.common.load_for_training does
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=checkpointing)
    elif checkpointing:  # what the Trainer does (prepare_model_for_kbit_training leaves unquantized models alone)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    preset = Preset()
    preset.model.max_length = tokens
    preset.quantization.load_in_4bit = four_bit
    preset.quantization.compute_dtype = "bfloat16" if cuda else "float32"
    preset.sft.batch_size, preset.sft.gradient_checkpointing, preset.sft.fused_loss = 1, checkpointing, fused
    lm = get_peft_model(lm, LoraConfig(r=preset.lora.r, lora_alpha=preset.lora.alpha, target_modules=preset.lora.target_modules))
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(1000, (1, tokens), device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    model_bytes = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    model_bytes += sum(sum(t.numel() * t.element_size() for t in _quant_state_tensors(m)) for m in lm.modules())
    before = _reset_peak(cuda)
    loss = fused_causal_lm_loss(lm, inputs) if fused else lm(**inputs).loss
    loss.backward()
    optimizer.step()
    measured = model_bytes + _peak(cuda) - before
    estimate = estimate_training_memory(read_model_shape(model), preset, "sft", device=device)
    estimated = sum(v for k, v in estimate.parts.items() if not k.startswith("CUDA"))
    return {"model": model, "tokens": tokens, "4bit": four_bit, "checkpointing": checkpointing, "fused": fused,
            "measured": measured, "estimated": estimated}


def run_generate_case(model: str, sequences: int, prompt: int, new_tokens: int, four_bit: bool, saved: str) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from budget_reasoner.config import Preset
    from budget_reasoner.eval.generation import ChosenTokenLogprobs
    from budget_reasoner.memory import estimate_inference_memory, read_model_shape

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    lm, model_bytes, device = _load(saved, four_bit, cuda)
    lm.eval()
    preset = Preset()
    preset.quantization.load_in_4bit = four_bit
    preset.quantization.compute_dtype = "bfloat16" if cuda else "float32"
    preset.generate.batch_size, preset.generate.max_new_tokens = sequences, new_tokens
    preset.model.max_length = prompt + new_tokens  # the estimator's prompt: what the training length leaves
    input_ids = torch.randint(1000, (sequences, prompt), device=device)
    before = _reset_peak(cuda)
    with torch.no_grad():
        lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0,
                    logits_processor=LogitsProcessorList([ChosenTokenLogprobs(1.0)]))
    measured = model_bytes + _peak(cuda) - before
    estimate = estimate_inference_memory(read_model_shape(model), preset, "generate", device="cuda" if cuda else "cpu")
    estimated = sum(v for k, v in estimate.parts.items() if not k.startswith("CUDA"))
    return {"model": model, "sequences": sequences, "prompt": prompt, "new_tokens": new_tokens, "4bit": four_bit,
            "measured": measured, "estimated": estimated, "kv_and_prefill": estimate.parts["KV cache"] + estimate.parts["prefill (one layer)"]}


def _load(saved: str, four_bit: bool, cuda: bool):
    """The model as the stages load it, its weights in plain memory, and the bytes of all its tensors."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if cuda else "cpu"
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=kwargs["dtype"])
    lm = AutoModelForCausalLM.from_pretrained(saved, device_map={"": device}, **kwargs)
    if not cuda:  # weights loaded as views of the mmapped file would page in during the step: make them plain memory
        with torch.no_grad():
            for tensor in [*lm.parameters(), *lm.buffers()]:
                if getattr(tensor, "quant_state", None) is None:
                    tensor.data = tensor.data.clone()
        import gc

        gc.collect()
    model_bytes = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    model_bytes += sum(sum(t.numel() * t.element_size() for t in _quant_state_tensors(m)) for m in lm.modules())
    return lm, model_bytes, device


def _reset_peak(cuda: bool) -> int:
    """Reset the peak counter; the bytes in use now (CUDA allocated, or the CPU's resident set)."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: loading peaks do not count
    return vm_kib("VmRSS") * 1024


def _peak(cuda: bool) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if cuda else vm_kib("VmHWM") * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"])
    parser.add_argument("--tokens", type=int, default=512, help="training: sequence length; --generate: prompt length")
    parser.add_argument("--generate", action="store_true", help="measure sampling (generate / eval) instead of training")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(run_generate_case(**case) if "sequences" in case else run_case(**case)))
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from budget_reasoner.memory import KNOWN_CONFIGS

    index = json.loads((KNOWN_CONFIGS / "index.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            fields = json.loads((KNOWN_CONFIGS / index[model]).read_text())
            config = AutoConfig.for_model(**fields)
            saved = os.path.join(folder, model.replace("/", "_"))
            AutoModelForCausalLM.from_config(config).save_pretrained(saved)  # random weights of the real shape
            if args.generate:
                cases = [dict(model=model, sequences=args.sequences, prompt=args.tokens, new_tokens=args.new_tokens,
                              four_bit=four_bit, saved=saved) for four_bit in (False, True)]
            else:
                cases = [dict(model=model, tokens=args.tokens, four_bit=four_bit, checkpointing=checkpointing, fused=fused, saved=saved)
                         for four_bit in (False, True) for checkpointing in (False, True) for fused in (False, True)]
            for case in cases:
                result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                                        env=STEADY_MALLOC)
                if result.returncode != 0:
                    print(f"{case}: failed: {result.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                setting = (f"{row['sequences']} x ({row['prompt']} + {row['new_tokens']})" if args.generate
                           else f"gc={row['checkpointing']!s:<5} fused={row['fused']!s:<5}")
                print(f"{row['model']:<34} 4bit={row['4bit']!s:<5} {setting} "
                      f"measured {row['measured'] / 2**30:6.2f} GiB  estimated {row['estimated'] / 2**30:6.2f} GiB  "
                      f"error {row['estimated'] / row['measured'] - 1:+.1%}", flush=True)
    worst = max(abs(r["estimated"] / r["measured"] - 1) for r in rows)
    print(f"worst relative error: {worst:.1%} over {len(rows)} cases")


if __name__ == "__main__":
    main()
