"""The VRAM estimator against measured peaks: one training step of each stage on randomly initialized real architectures.

    python benchmarks/memory.py [--models Qwen/Qwen2.5-0.5B-Instruct meta-llama/Llama-3.2-1B-Instruct] [--tokens 512]
        [--stages sft dpo distill grpo] [--compute bfloat16] [--write memory_nf4_bf16]
    python benchmarks/memory.py --grid        # SFT only: fp32/NF4 x checkpointing x fused loss, the CPU plan (fp32)
    python benchmarks/memory.py --generate [--sequences 16 --tokens 512 --new-tokens 32]

Training cases (the default) run the stages as a GPU preset does: the base in NF4, prepared by the loader's own
`plan.prepare_for_kbit_training` for the stage's plan (`plan.plan_for(..., "cuda")`: bf16 compute, the frozen
non-4-bit weights in bf16, LoRA in fp32), gradient checkpointing on, batch 1 of `--tokens` tokens, torch AdamW:
- sft: the fused chunked cross-entropy inside the model's forward, under bf16 autocast (as accelerate wraps it);
- dpo: TRL 1.16's own DPOTrainer for one step over one pair (prompt + chosen, prompt + rejected, `--tokens` each),
  the model carrying an adapter as after sft, so TRL adds its frozen "ref" copy and computes policy and reference
  log-probs through its fused (chunked) LM head;
- distill: our fused KD loss against a random top-k cache batch (train/distill.py's KD step);
- grpo: TRL 1.16's own GRPOTrainer for one step (train/grpo.py's settings): a group of 2 completions of one prompt
  of `--tokens` - 64 tokens, each generated to its 64-token limit by transformers' generate, rewarded 0 and 1, then
  the loss through TRL's chunked log-prob head with the entropy it logs, beta 0 (no reference log-probs).
On the CPU bf16 runs through the same plan and autocast (slow only without AMX/avx512_bf16).
`--generate` measures sampling instead (the teacher's generate stage and eval): `sequences` prompts of
`tokens` tokens decoded together for `new-tokens` steps, with the same logits processor our generation
uses, against `estimate_inference_memory(..., "generate")`.

Each case runs in a fresh subprocess. Measured = the bytes of the model's tensors (weights, quantization
state, adapters) + what one step (forward, backward, optimizer step) adds at its peak: on the CPU the
rise of the high-water RSS (reset with /proc/self/clear_refs just before the step), on CUDA of
torch.cuda.max_memory_allocated. (RSS alone would also count the safetensors file pages that loading
maps in.) The estimate is `budget_reasoner.memory.estimate_training_memory` for the same preset and plan,
on the device the case ran on, without the CUDA context and allocator slack.
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
# And the fused loss's CPU-only torch.compile of its softmax-gradient stays off: inductor's own memory
# (and a compile per case) belongs to no GPU run, which is what the estimate is for
STEADY_MALLOC = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "BUDGET_REASONER_COMPILE": "0"}


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


def _preset(model_tokens: int, stage: str, four_bit: bool, compute: str, checkpointing: bool, fused: bool):
    """The preset of one case: batch 1, `model_tokens` per sequence, torch AdamW (what the step below builds)."""
    from budget_reasoner.config import Preset

    preset = Preset()
    preset.model.max_length = model_tokens
    preset.quantization.load_in_4bit = four_bit
    preset.quantization.compute_dtype = compute
    settings = getattr(preset, stage)
    settings.batch_size, settings.gradient_checkpointing, settings.fused_loss = 1, checkpointing, fused
    settings.optimizer = "adamw_torch"
    if stage == "grpo":  # one group of GRPO_GROUP completions, each a prompt and its completion: model_tokens in all
        settings.batch_size = settings.num_generations = GRPO_GROUP
        settings.max_completion_length = GRPO_COMPLETION
        settings.max_prompt_length = model_tokens - GRPO_COMPLETION
    return preset


GRPO_GROUP, GRPO_COMPLETION = 2, 64


def case_plan(preset, stage: str, compute: str, cuda: bool):
    """The plan the case runs: bf16/fp16 compute is the GPU plan (bitsandbytes backend, autocast), also when it runs
    on the CPU to check it there; fp32 is the CPU plan."""
    from budget_reasoner.plan import plan_for

    return plan_for(preset, stage, "cuda" if cuda or compute != "float32" else "cpu", backend="bitsandbytes")


def run_case(model: str, tokens: int, four_bit: bool, checkpointing: bool, fused: bool, saved: str,
             stage: str = "sft", compute: str = "float32") -> dict:
    """One training step of `stage` as the stage runs it, loaded and prepared as train/common.load_for_training
    does (plan.prepare_for_kbit_training, LoRA in fp32), under the plan's autocast."""
    import contextlib

    import torch

    from budget_reasoner.memory import estimate_training_memory, read_model_shape
    from budget_reasoner.plan import prepare_for_kbit_training

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    preset = _preset(tokens, stage, four_bit, compute, checkpointing, fused)
    plan = case_plan(preset, stage, compute, cuda)
    lm, _, device = _load(saved, four_bit, cuda, plan.compute_dtype)
    if four_bit:
        lm = prepare_for_kbit_training(lm, plan)
    autocast = (torch.autocast(device, dtype=getattr(torch, plan.autocast_dtype)) if plan.autocast_dtype
                else contextlib.nullcontext())
    if stage == "dpo":
        trainer, lm = _dpo_trainer(lm, preset, tokens, cuda, plan)
    elif stage == "grpo":
        trainer, lm = _grpo_trainer(lm, preset, cuda, plan)
    else:
        lm = _with_lora(lm, preset, checkpointing)
        optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
        batch = _batch(stage, tokens, preset, device)
    model_bytes = _model_bytes(lm)
    before = _reset_peak(cuda)
    if stage in ("dpo", "grpo"):
        trainer.train()
    else:
        with autocast:  # accelerate wraps the forward alone in autocast; backward and step run outside it
            loss = _loss(lm, stage, batch, preset, fused)
        loss.backward()
        optimizer.step()
    measured = model_bytes + _peak(cuda) - before
    estimate = estimate_training_memory(read_model_shape(model), preset, stage, device="cuda" if cuda else "cpu", plan=plan)
    estimated = sum(v for k, v in estimate.parts.items() if not k.startswith("CUDA") and not k.startswith("allocator"))
    return {"model": model, "stage": stage, "tokens": tokens, "4bit": four_bit, "compute": plan.compute_dtype,
            "autocast": plan.autocast_dtype, "checkpointing": checkpointing, "fused": fused or stage != "sft",
            "sequences": getattr(preset, stage).batch_size * (2 if stage == "dpo" else 1),
            "measured": measured, "estimated": estimated, "model_bytes": model_bytes,
            "parts": {k: v for k, v in estimate.parts.items()}}


def _with_lora(lm, preset, checkpointing: bool):
    from peft import get_peft_model

    from budget_reasoner.train.common import peft_lora_config

    if checkpointing:  # what the Trainer does with gradient checkpointing on
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    lm = get_peft_model(lm, peft_lora_config(preset))  # peft keeps the adapters fp32 over a bf16/NF4 base
    lm.train()
    return lm


def _batch(stage: str, tokens: int, preset, device: str) -> dict:
    import torch

    input_ids = torch.randint(1000, (1, tokens), device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    if stage == "distill":  # a top-k cache batch as train/distill.collate_kd makes it (labels already shifted)
        k = preset.distill.top_k
        batch["kd_labels"] = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100, device=device)], dim=1)
        batch["topk_ids"] = torch.randint(1000, (1, tokens, k), device=device)
        batch["topk_logprobs"] = torch.log_softmax(torch.randn(1, tokens, k, device=device), dim=-1)
    return batch


def _loss(lm, stage: str, batch: dict, preset, fused: bool):
    from budget_reasoner.kernels.patch import fused_causal_lm_loss, fused_kd_loss

    if stage == "distill":  # train/distill.KDTrainer.compute_loss
        return fused_kd_loss(lm, batch, batch["kd_labels"], preset.distill.alpha, preset.distill.temperature)
    return fused_causal_lm_loss(lm, batch) if fused else lm(**batch).loss


def _word_tokenizer(words: int = 300):
    """One token per whitespace-separated word, so a case's sequences have exactly the lengths asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(words)} | {"<pad>": words, "</s>": words + 1, "<unk>": words + 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _dpo_trainer(lm, preset, tokens: int, cuda: bool, plan):
    """TRL 1.16's own DPOTrainer over one pair of `tokens`-token sequences (prompt + chosen, prompt + rejected), as
    train/dpo.build_dpo_trainer builds it: the model carries the sft stage's adapter, so TRL adds a frozen "ref"
    copy for the reference log-probs, and both go through TRL's fused (chunked) LM head."""
    import random

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from budget_reasoner.train.common import adapters_in_fp32
    from budget_reasoner.train.dpo import loss_settings

    folder = tempfile.mkdtemp()
    lm = _with_lora(lm, preset, checkpointing=False)  # the trainer turns checkpointing on from its config
    rng = random.Random(0)
    words = lambda n: "".join(f"w{rng.randrange(300)} " for _ in range(n))  # noqa: E731
    prompt = tokens // 2
    rows = [{"prompt": words(prompt), "chosen": words(tokens - prompt - 1) + "</s>",
             "rejected": words(tokens - prompt - 1) + "</s>"}]
    settings = preset.dpo
    args = DPOConfig(output_dir=folder, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     learning_rate=1e-4, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                     activation_checkpointing=settings.gradient_checkpointing, use_cpu=not cuda,
                     bf16=plan.autocast_dtype == "bfloat16", fp16=plan.autocast_dtype == "float16",
                     dataloader_num_workers=0, disable_tqdm=True, beta=settings.beta, max_length=tokens,
                     **loss_settings(preset))
    trainer = DPOTrainer(model=lm, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_word_tokenizer())
    adapters_in_fp32(trainer.model)  # train_with_resume does it before train() builds the optimizer
    return trainer, trainer.model


def _grpo_trainer(lm, preset, cuda: bool, plan):
    """TRL 1.16's own GRPOTrainer over one group, with train/grpo.py's loss settings: one prompt of
    grpo.max_prompt_length words, grpo.num_generations completions sampled by transformers' generate and run to
    grpo.max_completion_length (min_new_tokens, so random weights cannot stop early), rewarded 0, 1, 0, ... (a real
    advantage), beta 0 (no reference log-probs), the loss through TRL's chunked log-prob head (with its entropy)."""
    import random

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from budget_reasoner.train.common import adapters_in_fp32

    settings = preset.grpo
    lm = _with_lora(lm, preset, checkpointing=False)  # the trainer turns checkpointing on from its config
    rng = random.Random(0)
    prompt = " ".join(f"w{rng.randrange(300)}" for _ in range(settings.max_prompt_length))

    def alternating(prompts, completions, **_):
        return [float(index % 2) for index in range(len(completions))]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=settings.batch_size,
                      gradient_accumulation_steps=1, learning_rate=1e-4, optim="adamw_torch", logging_steps=1,
                      save_strategy="no", report_to="none", activation_checkpointing=settings.gradient_checkpointing,
                      use_cpu=not cuda, bf16=plan.autocast_dtype == "bfloat16", fp16=plan.autocast_dtype == "float16",
                      dataloader_num_workers=0, disable_tqdm=True, num_generations=settings.num_generations,
                      max_completion_length=settings.max_completion_length, temperature=1.0, beta=0.0,
                      loss_type=settings.loss_type, epsilon_high=settings.epsilon_high, mask_truncated_completions=False,
                      use_vllm=False, generation_kwargs={"min_new_tokens": settings.max_completion_length},
                      log_completions=False, include_num_input_tokens_seen=False)
    # a word per token over the model's whole vocabulary, so every sampled id decodes
    tokenizer = _word_tokenizer(lm.config.get_text_config().vocab_size - 3)
    trainer = GRPOTrainer(model=lm, reward_funcs=[alternating], args=args, train_dataset=Dataset.from_list([{"prompt": prompt}]),
                          processing_class=tokenizer)
    adapters_in_fp32(trainer.model)  # train_with_resume does it before train() builds the optimizer
    return trainer, trainer.model


def _model_bytes(lm) -> int:
    total = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    return total + sum(sum(t.numel() * t.element_size() for t in _quant_state_tensors(m)) for m in lm.modules())


def run_generate_case(model: str, sequences: int, prompt: int, new_tokens: int, four_bit: bool, saved: str) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from budget_reasoner.config import Preset
    from budget_reasoner.sampling.local import ChosenTokenLogprobs
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


def _load(saved: str, four_bit: bool, cuda: bool, compute: str | None = None):
    """The model as the stages load it (in `compute`, default bf16 on CUDA, fp32 on the CPU), its weights in plain
    memory, and the bytes of all its tensors."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, compute) if compute else (torch.bfloat16 if cuda else torch.float32)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
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
    return lm, _model_bytes(lm), device


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


def _training_cases(args, model: str, saved: str) -> list[dict]:
    if args.grid:  # the fp32/NF4 x checkpointing x fused-loss grid of SFT steps in the CPU plan (fp32)
        return [dict(model=model, tokens=args.tokens, four_bit=four_bit, checkpointing=checkpointing, fused=fused, saved=saved)
                for four_bit in (False, True) for checkpointing in (False, True) for fused in (False, True)]
    # the stages as a GPU preset runs them: NF4, the plan's compute dtype and autocast, checkpointing, fused SFT loss
    return [dict(model=model, tokens=args.tokens, four_bit=True, checkpointing=not args.no_checkpointing, fused=True,
                 saved=saved, stage=stage, compute=args.compute) for stage in args.stages]


def markdown_table(result: dict) -> str:
    """model x stage: estimated, measured, error (a --write result of training cases)."""
    lines = ["| model | stage | tokens | estimated GiB | measured GiB | error |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        tokens = row["tokens"] * row.get("sequences", 2 if row.get("stage") == "dpo" else 1)
        lines.append(f"| {row['model'].split('/')[-1].removesuffix('-Instruct')} | {row.get('stage', 'sft')} | {tokens:,} | "
                     f"{row['estimated'] / 2**30:.2f} | {row['measured'] / 2**30:.2f} | {row['error']:+.1%} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"])
    parser.add_argument("--tokens", type=int, default=512, help="training: sequence length; --generate: prompt length")
    parser.add_argument("--stages", nargs="+", default=["sft", "dpo", "distill"], choices=["sft", "dpo", "distill", "grpo"])
    parser.add_argument("--compute", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the plan's compute dtype (bf16/fp16: the GPU plan, autocast included, also on the CPU)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--grid", action="store_true", help="the SFT grid: fp32/NF4 x checkpointing x fused loss, CPU plan")
    parser.add_argument("--generate", action="store_true", help="measure sampling (generate / eval) instead of training")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--write", metavar="NAME", help="save the rows as benchmarks/results/<machine>/NAME.json")
    parser.add_argument("--layers", type=int, help="smoke tests only: cut each model to this many layers")
    parser.add_argument("--table", metavar="JSON", help="print the README's markdown table of a --write result, and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
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
            if args.layers:
                fields["num_hidden_layers"] = args.layers
            config = AutoConfig.for_model(**fields)
            saved = os.path.join(folder, model.replace("/", "_"))
            AutoModelForCausalLM.from_config(config).save_pretrained(saved)  # random weights of the real shape
            if args.layers:  # the estimate must read the cut config too
                model = saved
            if args.generate:
                cases = [dict(model=model, sequences=args.sequences, prompt=args.tokens, new_tokens=args.new_tokens,
                              four_bit=four_bit, saved=saved) for four_bit in (False, True)]
            else:
                cases = _training_cases(args, model, saved)
            for case in cases:
                result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                                        env=STEADY_MALLOC)
                if result.returncode != 0:
                    print(f"{case}: failed: {result.stderr.strip().splitlines()[-1]}", flush=True)
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                row["error"] = row["estimated"] / row["measured"] - 1
                rows.append(row)
                setting = (f"{row['sequences']} x ({row['prompt']} + {row['new_tokens']})" if args.generate
                           else f"{row.get('stage', 'sft'):<7} {row.get('compute', 'float32'):<8} gc={row['checkpointing']!s:<5} fused={row['fused']!s:<5}")
                print(f"{row['model']:<34} 4bit={row['4bit']!s:<5} {setting} "
                      f"measured {row['measured'] / 2**30:6.2f} GiB  estimated {row['estimated'] / 2**30:6.2f} GiB  "
                      f"error {row['error']:+.1%}", flush=True)
    if not rows:
        sys.exit("no case ran")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst relative error: {worst:.1%} over {len(rows)} cases")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import write_result

        print(f"wrote {write_result(args.write, {'tokens': args.tokens, 'worst_error': worst, 'rows': rows})}")


if __name__ == "__main__":
    main()
