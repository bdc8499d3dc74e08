"""One precision-and-memory plan per stage: what is 4-bit, what is upcast and to what, the autocast dtype,
whether logits are full or chunked, what the optimizer holds. The loaders (train/common.py), the trainers'
mixed-precision flags and the estimator (memory.py) all read it, so none of them can restate it differently.

What each backend really does to a QLoRA base (read at the installed versions):
- peft 0.21 `prepare_model_for_kbit_training` (utils/other.py) freezes every parameter and casts every fp16/bf16
  parameter that is not `Params4bit` to fp32: the embeddings, the LM head, the norms and the linear biases.
  fp32 norm weights then promote each norm's output to fp32, bitsandbytes' Linear4bit returns its input's
  dtype, and so the residual stream between layers becomes fp32 too. On the 152k-row Qwen2.5 vocabulary that
  is +0.4 GiB of weights on the tied 1.5B, +2.0 GiB on the 7B and +2.9 GiB on the 32B, and twice the bytes
  for every hidden state that gradient checkpointing keeps.
- Unsloth 2026.10.9 (`unsloth_zoo.training_utils.prepare_model_for_training`, reached through its own
  `prepare_model_for_kbit_training` from `get_peft_model`) casts only the trainable parameters: LoRA A/B to
  fp32; the frozen embeddings, norms and LM head keep the dtype they were loaded in (its fp32 norm upcast is
  for full fine-tuning only). Its "unsloth" gradient checkpointing keeps the checkpointed hidden states in
  host RAM.
- peft's `get_peft_model` / `PeftModel.from_pretrained` keep LoRA adapters in fp32 over a bf16/fp16 base
  (autocast_adapter_dtype=True); TRL 1.16's SFT and DPO trainers do not call prepare_model_for_kbit_training.

Our choice on the bitsandbytes path: no peft upcast. `prepare_for_kbit_training` below freezes the base and
keeps the frozen non-4-bit parameters in the compute dtype, as Unsloth and TRL's QLoRA recipes do. Why that is
safe for training: nothing frozen is ever updated, so fp32 storage buys no optimizer precision; under the
Trainer's autocast the LM head and every matmul run in the compute dtype anyway (an fp32 LM head is only cast
down again, a transient 150k x hidden copy per forward); Qwen2/Llama RMSNorm already normalizes in fp32
internally; the embedding lookup is exact in the dtype the checkpoint was stored in. The trainable LoRA
weights stay fp32, which is where precision matters (Adam's updates, fp16's GradScaler). The two backends
then run the same numerics, so a trainer sees one dtype layout on either.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINING_STAGES = ("sft", "dpo", "distill", "grpo", "opd")
INFERENCE_STAGES = ("generate", "cache", "eval")


@dataclass(frozen=True)
class Plan:
    stage: str
    backend: str  # "unsloth" | "bitsandbytes" | "cpu"
    device: str  # "cuda" | "cpu"
    compute_dtype: str  # what the base loads in and bitsandbytes dequantizes to
    autocast_dtype: str | None  # the Trainer's mixed precision (its bf16/fp16 flag); None: none
    four_bit: bool  # the decoder's linear weights are NF4 (Params4bit); never cast
    embeddings_dtype: str  # embed_tokens and an untied lm_head
    norms_dtype: str  # norm weights and linear biases
    residual_dtype: str  # hidden states between layers: what gradient checkpointing keeps
    lora_dtype: str | None  # trainable adapters (None: an inference stage)
    optimizer_state_bytes: int  # per trainable parameter: 8-bit Adam keeps 2 bytes, fp32 Adam 8
    logits: str  # "full" (tokens x vocab at once) | "chunked" (one chunk of fp32 logits at a time)
    offload_checkpoints: bool  # checkpointed hidden states live in host RAM (Unsloth's checkpointing)

    @property
    def training(self) -> bool:
        return self.lora_dtype is not None

    @property
    def logits_dtype(self) -> str:
        """The dtype the LM head's matmul produces: autocast's, else the head's own."""
        return self.autocast_dtype or self.embeddings_dtype

    def dtype_for(self, name: str) -> str | None:
        """The dtype this plan gives the non-4-bit base parameter `name` (None: a LoRA or 4-bit one, not ours)."""
        if "lora_" in name:
            return None
        if "embed_tokens" in name or "lm_head" in name:
            return self.embeddings_dtype
        if "norm" in name or name.endswith(".bias"):
            return self.norms_dtype
        return self.compute_dtype  # a full-precision linear weight (4-bit off)


def autocast_dtype(compute_dtype: str, device: str, supports_bf16: bool) -> str | None:
    """The Trainer's mixed precision: bf16 only where the card has it, fp16 on CUDA, none on the CPU (fp32)."""
    if device != "cuda":
        return None
    if compute_dtype == "bfloat16":
        return "bfloat16" if supports_bf16 else None
    return "float16" if compute_dtype == "float16" else None


def plan_for(preset, stage: str, device: str = "cuda", backend: str = "bitsandbytes", supports_bf16: bool = True) -> Plan:
    """The plan of `stage` under `preset` on a device/backend (the estimator's default: a bf16-capable card on the
    bitsandbytes path, which keeps every checkpointed hidden state on the card: the conservative one)."""
    if stage not in TRAINING_STAGES + INFERENCE_STAGES:
        from budget_reasoner.errors import BudgetReasonerError

        raise BudgetReasonerError(f"stage must be one of {', '.join(TRAINING_STAGES + INFERENCE_STAGES)}, got {stage!r}")
    # on the CPU every weight is fp32: bf16 matmuls are ~13x slower on its class of CPU (models.torch_dtype)
    compute = "float32" if device == "cpu" else preset.quantization.compute_dtype
    training = stage in TRAINING_STAGES
    settings = getattr(preset, stage) if training else None
    return Plan(
        stage=stage, backend=backend, device=device, compute_dtype=compute,
        autocast_dtype=autocast_dtype(compute, device, supports_bf16) if training else None,
        four_bit=preset.quantization.load_in_4bit,
        embeddings_dtype=compute, norms_dtype=compute, residual_dtype=compute,  # no upcast (module docstring)
        lora_dtype="float32" if training else None,
        optimizer_state_bytes=(2 if "8bit" in settings.optimizer else 8) if training else 0,
        # TRL's DPO and GRPO, our distill and opd always go through a chunked LM head; sft when the preset asks
        logits="chunked" if training and (stage != "sft" or settings.fused_loss) else "full",
        offload_checkpoints=training and backend == "unsloth" and device == "cuda" and settings.gradient_checkpointing,
    )


def training_plan(preset, hardware, stage: str = "sft") -> Plan:
    """The plan on this machine (hardware.Hardware). The loader and the Trainer's mixed-precision flags read its
    dtypes, which are the same for every training stage; only logits and the optimizer differ by stage."""
    return plan_for(preset, stage, hardware.device, hardware.backend, hardware.supports_bf16)


def peft_kbit_plan(plan: Plan) -> Plan:
    """What peft's prepare_model_for_kbit_training would have made of `plan`: every fp16/bf16 base parameter
    that is not 4-bit in fp32, and the residual stream with it. Kept to measure what not calling it saves."""
    if not plan.four_bit:
        return plan  # we call it (and peft casts) only on a 4-bit base
    return dataclasses.replace(plan, embeddings_dtype="float32", norms_dtype="float32", residual_dtype="float32")


def prepare_for_kbit_training(model, plan: Plan):
    """Our replacement for peft's prepare_model_for_kbit_training (without gradient checkpointing, which the
    trainers turn on): freeze the base and give each non-4-bit parameter the plan's dtype."""
    import torch

    for name, param in model.named_parameters():
        param.requires_grad = False
        wanted = plan.dtype_for(name)
        if param.__class__.__name__ == "Params4bit" or wanted is None or not param.is_floating_point():
            continue
        dtype = getattr(torch, wanted)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


# ---- Wall time and cost per stage ----------------------------------------------------------------------
# A quickstart's stages, what each processes, and how long that takes on a card. Decoding is bound by memory
# bandwidth (every step reads the weights and the KV cache), training and scoring by FLOPs. The card's spec-sheet
# figures (hardware.CARDS) are scaled by efficiency factors from published throughput numbers until
# benchmarks/gpu_checks.sh measures them on a lent GPU; the plan says which of the two it used.

# Fraction of the card's memory bandwidth a decode step achieves, beside a fixed cost per step. vLLM: Databricks'
# "LLM Inference Performance Engineering: Best Practices" (2023) measures model bandwidth utilization near 60% at
# small batches on A100s. transformers `generate` over bitsandbytes NF4: its 4-bit matmuls dequantize every weight at
# every step, and its Python loop costs ~20 ms a step on a ~28-layer model whatever its size; single-sequence NF4
# decode of a 7B on a T4 is commonly reported at 15-20 tokens/s (50-67 ms a step). A step reads the NF4 layers and
# the 16-bit LM head (3.35 + 1.09 GB for Qwen2.5-7B: 13.9 ms at 320 GB/s), so 57 ms = 20 ms + 13.9 ms / 0.37.
DECODE_BANDWIDTH_EFFICIENCY = {"transformers": 0.37, "vllm": 0.60}
DECODE_STEP_OVERHEAD_S = {"transformers": 0.02, "vllm": 0.0}
# Model FLOPs utilization of training. Dense LM pre-training reaches 46% (PaLM, Chowdhery et al. 2022) to 55%
# (MegaScale, 2024) on A100/H100 clusters; QLoRA on one card pays NF4 dequantization in every matmul, small
# micro-batches and padding: assumed 25% for transformers + peft + bitsandbytes, and 40% for Unsloth, whose
# published benchmarks put it ~2x faster on the same recipe. Scoring (a no-grad forward, large batches) 35%.
TRAINING_MFU = {"bitsandbytes": 0.25, "unsloth": 0.40}
SCORING_MFU = 0.35
# What the analytic plan assumes of the data where the preset does not say: a chain's mean length as a fraction
# of max_new_tokens (a 7B's GSM8K chains run a few hundred tokens), the share of a strong teacher's chains the
# verifier accepts, prompt tokens (chat template + instruction + a GSM8K-sized question), and TRL's padding of
# each batch to its longest sequence.
CHAIN_FILL = 0.4
TEACHER_PASS_RATE = 0.8
PROMPT_TOKENS = 120
BATCH_PADDING = 1.2
# Data parallelism on one node (`--gpus N`: DDP, or FSDP2, through presets/accelerate/): the fraction of N cards'
# throughput a training step keeps after the gradient all-reduce and the stragglers. Assumed 0.9, not measured:
# the PyTorch DDP paper (Li et al., VLDB 2020) reports near-linear scaling for data-parallel training on NVLink
# nodes, and a LoRA's all-reduce is small next to the step; FSDP's per-layer gathers cost more when the
# interconnect is PCIe. benchmarks/multi_process.py measures only the CPU's 2-process case.
DATA_PARALLEL_EFFICIENCY = 0.9


@dataclass(frozen=True)
class StageTime:
    stage: str
    tokens: int  # generated (decode), trained on, or scored
    seconds: float
    how: str  # the model behind the estimate, in one line
    cost_usd: float | None = None


@dataclass(frozen=True)
class TimePlan:
    preset: str
    machine: str
    source: str  # where the rates came from: spec sheets x published efficiencies, or a calibration here
    stages: tuple[StageTime, ...]

    @property
    def total_seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def cost_usd(self) -> float | None:
        costs = [stage.cost_usd for stage in self.stages]
        return None if all(cost is None for cost in costs) else sum(cost or 0.0 for cost in costs)

    def dominant(self) -> StageTime:
        return max(self.stages, key=lambda stage: stage.seconds)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "machine": self.machine, "source": self.source,
                "stages": [dataclasses.asdict(stage) for stage in self.stages],
                "total_seconds": self.total_seconds, "cost_usd": self.cost_usd}

    def table(self) -> str:
        lines = [f"plan for preset {self.preset} on {self.machine} ({self.source})",
                 f"{'stage':<10}{'tokens':>14}{'time':>11}{'cost $':>9}  how"]
        for stage in self.stages:
            cost = "" if stage.cost_usd is None else f"{stage.cost_usd:.2f}"
            lines.append(f"{stage.stage:<10}{stage.tokens:>14,}{format_duration(stage.seconds):>11}{cost:>9}  {stage.how}")
        cost = "" if self.cost_usd is None else f"{self.cost_usd:.2f}"
        lines.append(f"{'total':<10}{'':>14}{format_duration(self.total_seconds):>11}{cost:>9}")  # tokens of unlike kinds
        return "\n".join(lines)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Workload:
    """What a quickstart of a preset processes, stage by stage (counts, not times)."""

    train_problems: int
    chains: int  # teacher samples
    prompt_tokens: float  # per prompt
    chain_tokens: float  # mean generated tokens per teacher chain
    sft_examples: int  # verified chains kept: what the teacher's top-k cache scores
    eval_models: int  # models quickstart evaluates (base, a local teacher, sft, dpo, distill)
    eval_files: tuple[int, ...]  # problems per model, per file eval answers one by one (held-out, then each benchmark)
    eval_tokens: float  # mean generated tokens per eval answer
    local_teacher: bool  # the chain teacher runs here (and is evaluated)
    scorer: str | None = None  # who scores the chains for distill (distill.teacher); None: distill is skipped

    @property
    def eval_problems(self) -> int:
        return sum(self.eval_files)

    def training_sequence(self, preset) -> float:
        """Tokens of one padded training sequence (prompt + chain, at most max_length)."""
        return min(preset.model.max_length, (self.prompt_tokens + self.chain_tokens) * BATCH_PADDING)


@functools.lru_cache(maxsize=32)  # the planner counts them again at every replan: read each file once
def problem_set_size(spec: str, train: bool) -> int:
    from budget_reasoner.problems import load_benchmark, parse_problem_source

    return len(load_benchmark(*parse_problem_source(spec), train=train))


def seed_problem_count(preset) -> int:
    """Training problems the preset's seed sets add (their training splits, or the sample it asks for)."""
    total = sum(problem_set_size(spec, True) for spec in preset.generate.seed_sets)
    return min(total, preset.generate.num_seed_problems) if preset.generate.num_seed_problems else total


def benchmark_problem_counts(preset) -> list[int]:
    """Problems quickstart evaluates on each of the preset's benchmarks (a seeded sample of benchmark_problems)."""
    cap = preset.eval.benchmark_problems
    return [min(size, cap) if cap else size for size in (problem_set_size(spec, False) for spec in preset.eval.benchmarks)]


def workload(preset, teacher: str | None = None, prompt_tokens: float = PROMPT_TOKENS, chain_fill: float = CHAIN_FILL,
             pass_rate: float = TEACHER_PASS_RATE, eval_fill: float = CHAIN_FILL,
             kept_per_problem: float | None = None) -> Workload:
    """The counts of a quickstart under `preset`: of a problem's verified chains, the distinct ones are kept, at
    most MAX_SFT_CHAINS_PER_PROBLEM (`kept_per_problem` where known: a tiny teacher writes one chain per problem)."""
    from budget_reasoner.generate.pipeline import MAX_SFT_CHAINS_PER_PROBLEM

    gen = preset.generate
    teacher = teacher or preset.chain_teacher
    local_teacher = not teacher.startswith("openai:")
    scorer = preset.distill.teacher or (teacher if local_teacher else None)
    problems = gen.num_train_problems + seed_problem_count(preset)
    if kept_per_problem is None:
        kept_per_problem = min(MAX_SFT_CHAINS_PER_PROBLEM, gen.samples_per_problem * pass_rate)
    return Workload(
        train_problems=problems, chains=problems * gen.samples_per_problem, prompt_tokens=prompt_tokens,
        chain_tokens=gen.max_new_tokens * chain_fill, sft_examples=round(problems * kept_per_problem),
        eval_models=3 + local_teacher + (scorer is not None),  # base, sft, dpo; a local teacher's own; distill
        eval_files=(gen.num_eval_problems, *benchmark_problem_counts(preset)),
        eval_tokens=preset.eval.max_new_tokens * eval_fill, local_teacher=local_teacher, scorer=scorer)


def decode_batches(problem_counts: tuple[int, ...] | list[int], shard_size: int, batch_size: int, num_samples: int) -> tuple[int, int]:
    """(batches, sequences in a full batch) as sampling/local.generate_texts runs them: each problem file a shard
    (`shard_size` problems) at a time, `batch_size // num_samples` prompts (all their samples) per batch."""
    import math

    prompts_per_batch = max(1, batch_size // num_samples)
    batches = sum(math.ceil(min(shard_size, count - start) / prompts_per_batch)
                  for count in problem_counts for start in range(0, count, shard_size))
    return batches, prompts_per_batch * num_samples


def decode_seconds(shape, plan: Plan, card, engine: str, batches: int, in_flight: int, max_new_tokens: int,
                   mean_new_tokens: float, prompt_tokens: float, sequences: int) -> float:
    """Decode time of `sequences` sequences. transformers' generate runs each of its `batches` (of up to `in_flight`
    sequences) until its longest sequence stops (planned at max_new_tokens: with several samples per problem one
    usually runs long); a server with continuous batching (vLLM) keeps `in_flight` sequences going and generates
    only the tokens asked for. A step reads the weights and every sequence's KV cache (bandwidth) and does
    2 x parameters FLOPs per sequence (compute): the slower of the two, plus the engine's fixed cost per step."""
    kv_per_token = 2 * shape.layers * shape.kv_dim * DTYPE_BYTES[plan.compute_dtype]
    if engine == "transformers":
        steps, context = batches * max_new_tokens, prompt_tokens + max_new_tokens / 2
    else:
        steps, context = sequences * mean_new_tokens / in_flight, prompt_tokens + mean_new_tokens / 2
    step_bytes = decode_bytes(shape, plan) + in_flight * context * kv_per_token
    step_flops = 2 * shape.parameters * in_flight
    step = max(step_bytes / (card.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY[engine]),
               step_flops / (card.tflops16 * 1e12 * SCORING_MFU)) + DECODE_STEP_OVERHEAD_S[engine]
    prefill = 2 * shape.parameters * sequences * prompt_tokens / (card.tflops16 * 1e12 * SCORING_MFU)
    return steps * step + prefill


def decode_bytes(shape, plan: Plan) -> float:
    """Weight bytes one decode step reads: every linear layer (NF4: 4.127 bits with its scales) and the LM head; the
    input embedding is a lookup of one row per sequence, not a read of the matrix."""
    compute = DTYPE_BYTES[plan.compute_dtype]
    linear = shape.linear_parameters * (4.127 / 8 if plan.four_bit else compute)
    return linear + shape.vocab * shape.hidden * compute


def training_flops_per_token(shape, preset, stage: str, lora_parameters: int, sequence: float | None = None) -> float:
    """LoRA over a frozen base: forward 2P, backward 2P (input gradients only: the base is frozen), +2P recomputed
    under gradient checkpointing, and 6 x the LoRA parameters; the LM head is a P of vocab x hidden; attention's
    score matmuls add 4 x layers x hidden x context per pass (the mean context of a `sequence`-token sequence). DPO
    also runs the reference model forward (2P)."""
    settings = getattr(preset, stage)
    matmul_parameters = shape.linear_parameters + shape.vocab * shape.hidden
    passes = 4 + (2 if settings.gradient_checkpointing else 0) + (2 if stage == "dpo" else 0)
    attention = 4 * shape.layers * shape.hidden * (sequence or preset.model.max_length) / 2 * passes / 2
    return passes * matmul_parameters + 6 * lora_parameters + attention


def plan_time_on_card(preset, card, backend: str = "bitsandbytes", teacher: str | None = None,
                      gpu_hour_price: float | None = None, token_price: tuple[float, float] | None = None,
                      source: str = "spec sheet x published efficiency factors (not measured on this card)",
                      gpus: int = 1, replicas: int = 0) -> TimePlan:
    """The analytic plan of a quickstart of `preset` on `card` (hardware.Card): every stage's tokens, seconds, cost.

    `gpus` > 1: the training stages' tokens are split over that many such cards (data parallel, the preset's
    per-device batch; keep the effective batch by dividing grad_accum or max_steps by it) at
    DATA_PARALLEL_EFFICIENCY; generate, cache and eval run in one process as they do today. `replicas` > 0: the
    teacher's chains come from that many vLLM servers, each on a card like `card`, sharing generate.concurrency
    requests in flight (a teacher bigger than one card needs tensor parallelism: see the README)."""
    if gpus < 1 or replicas < 0:
        from budget_reasoner.errors import BudgetReasonerError

        raise BudgetReasonerError(f"--gpus must be at least 1 and --replicas at least 0, got {gpus} and {replicas}")
    from budget_reasoner.memory import lora_parameters, read_model_shape

    teacher = teacher or preset.chain_teacher
    work = workload(preset, teacher)
    student, teacher_shape = read_model_shape(preset.model.student), None
    device = "cuda"
    supports_bf16 = card.capability >= (8, 0)
    gen, ev = preset.generate, preset.eval

    def priced(stage: str, tokens: float, seconds: float, how: str, cards: int = 1) -> StageTime:
        cost = None if gpu_hour_price is None else seconds / 3600 * gpu_hour_price * cards  # every card is paid for
        return StageTime(stage, int(tokens), seconds, how, cost)

    stages = []
    generated = work.chains * work.chain_tokens
    if work.local_teacher:
        teacher_shape = read_model_shape(teacher)
        generate_plan = plan_for(preset, "generate", device, backend, supports_bf16)
        batches, in_flight = decode_batches([work.train_problems], gen.shard_size, gen.batch_size, gen.samples_per_problem)
        seconds = decode_seconds(teacher_shape, generate_plan, card, "transformers", batches, in_flight, gen.max_new_tokens,
                                 work.chain_tokens, work.prompt_tokens, work.chains)
        # the same chains from a vLLM server on this card: continuous batching at generate.concurrency in flight
        served = decode_seconds(teacher_shape, generate_plan, card, "vllm", batches, gen.concurrency, gen.max_new_tokens,
                                work.chain_tokens, work.prompt_tokens, work.chains)
        if replicas:
            stages.append(served_generate(teacher_shape, generate_plan, card, work, gen, replicas, priced))
        else:
            stages.append(priced("generate", generated, seconds, f"{work.chains:,} chains, transformers generate: "
                                 f"{batches:,} batches of {in_flight} run to max_new_tokens, bandwidth-bound; a vLLM "
                                 f"server (README: A teacher on a server) would be ~{seconds / served:.0f}x faster"))
    elif replicas and (server_shape := _known_shape(teacher.removeprefix("openai:"))) is not None:
        stages.append(served_generate(server_shape, plan_for(preset, "generate", device, backend, supports_bf16), card,
                                      work, gen, replicas, priced))
    else:
        api_cost = 0.0
        if token_price:
            api_cost = (work.chains * work.prompt_tokens * token_price[0] + generated * token_price[1]) / 1e6
        unknown = ("; --replicas needs the served model's shape: a local folder, or a config in data/model_configs"
                   if replicas else "")
        stages.append(StageTime("generate", int(generated), 0.0, f"{work.chains:,} chains from the server; its time "
                                f"and card are not this plan's (a vLLM server: see `plan --teacher`){unknown}",
                                api_cost if token_price else None))
    lora = lora_parameters(student, preset)
    sequence = work.training_sequence(preset)
    mfu = TRAINING_MFU.get(backend, TRAINING_MFU["bitsandbytes"])
    for stage in ("sft", "dpo", "distill"):
        if stage == "distill" and work.scorer is None:
            continue
        settings = getattr(preset, stage)
        sequences = settings.max_steps * settings.batch_size * settings.grad_accum * (2 if stage == "dpo" else 1)
        tokens = sequences * sequence
        if stage == "distill":
            stages.append(cache_time(preset, read_model_shape(work.scorer.removeprefix("openai:")), work, sequence,
                                     card, priced))
        flops = training_flops_per_token(student, preset, stage, lora, sequence) * tokens
        how = (f"{settings.max_steps} steps x {sequences // settings.max_steps} sequences of ~{sequence:.0f} tokens, "
               f"FLOP-bound at {mfu:.0%} MFU")
        speedup = gpus * DATA_PARALLEL_EFFICIENCY if gpus > 1 else 1.0
        if gpus > 1:
            how += f"; split over {gpus} GPUs at {DATA_PARALLEL_EFFICIENCY:.0%} data-parallel efficiency (assumed)"
        stages.append(priced(stage, tokens, flops / (card.tflops16 * 1e12 * mfu) / speedup, how, cards=gpus))
    samples = ev.maj_k if ev.maj_k > 1 else 0
    eval_sequences = work.eval_problems * (1 + samples)
    eval_plan = plan_for(preset, "eval", device, backend, supports_bf16)
    # per problem file and shard: the greedy answers, then the samples (eval/run.py)
    greedy_batches, greedy_in_flight = decode_batches(work.eval_files, gen.shard_size, ev.batch_size, 1)
    sample_batches, sample_in_flight = (decode_batches(work.eval_files, gen.shard_size, ev.batch_size, samples)
                                        if samples else (0, 0))

    def eval_seconds(shape) -> float:
        seconds = decode_seconds(shape, eval_plan, card, "transformers", greedy_batches, greedy_in_flight,
                                 ev.max_new_tokens, work.eval_tokens, work.prompt_tokens, work.eval_problems)
        if samples:
            seconds += decode_seconds(shape, eval_plan, card, "transformers", sample_batches, sample_in_flight,
                                      ev.max_new_tokens, work.eval_tokens, work.prompt_tokens, work.eval_problems * samples)
        return seconds

    # the student's evals (base, sft, dpo, distill), and a local teacher's own, which reads the bigger model
    seconds = (work.eval_models - work.local_teacher) * eval_seconds(student)
    seconds += eval_seconds(teacher_shape) if work.local_teacher else 0.0
    stages.append(priced("eval", work.eval_models * eval_sequences * work.eval_tokens, seconds,
                         f"{work.eval_models} models x {work.eval_problems:,} problems x {eval_sequences // work.eval_problems} "
                         f"answers, bandwidth-bound"))
    return TimePlan(preset.name, f"{card.name} ({card.total_gib:g} GiB)", source, tuple(stages))


# Layer streaming reads the whole checkpoint from disk once per pass. A PCIe 4.0 NVMe drive reads 5-7 GB/s in
# sequential reads; the scorer reads tensor by tensor through the page cache: assumed 3 GB/s.
NVME_READ_GBS = 3.0


def cache_time(preset, shape, work: Workload, sequence: float, card, priced) -> StageTime:
    """The teacher's top-k over the verified chains: one forward, FLOP-bound at SCORING_MFU. Streamed
    (distill.stream_layers), every pass over stream_tokens reads the checkpoint (16-bit) from NVMe while the card
    computes the layer before (prefetch): a pass takes the longer of the two."""
    tokens = work.sft_examples * sequence
    flops_per_token = 2 * (shape.linear_parameters + shape.vocab * shape.hidden)
    compute = flops_per_token * tokens / (card.tflops16 * 1e12 * SCORING_MFU)
    where = f"{work.scorer.removeprefix('openai:')} over {work.sft_examples:,} verified chains"
    if not preset.distill.stream_layers:
        return priced("cache", tokens, compute, f"{where}, one forward, FLOP-bound")
    # as cache_teacher_topk batches them: within a shard, as many sequences as fill stream_tokens (padded)
    per_pass = max(1, int(preset.distill.stream_tokens // sequence))
    passes, _ = decode_batches([work.sft_examples], preset.generate.shard_size, per_pass, 1)
    read = shape.parameters * 2 / (NVME_READ_GBS * 1e9)
    seconds = passes * max(read, compute / passes)
    return priced("cache", tokens, seconds, f"{where}, streamed a layer at a time: {passes} passes, each reading "
                  f"{shape.parameters * 2 / 1e9:.0f} GB from NVMe at {NVME_READ_GBS:g} GB/s ({read:.0f} s) beside "
                  f"{compute / passes:.0f} s of compute")


def busy_concurrency(shape, plan: Plan, card) -> int:
    """Sequences in flight at which a vLLM decode step on `card` turns from bandwidth- to compute-bound: below it,
    each extra sequence rides on the same read of the weights almost free; above it, steps slow down. What one
    replica's share of generate.concurrency should reach to keep it busy (its KV cache permitting)."""
    read_seconds = decode_bytes(shape, plan) / (card.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY["vllm"])
    return max(1, int(read_seconds * card.tflops16 * 1e12 * SCORING_MFU / (2 * shape.parameters)))


def served_generate(shape, plan: Plan, card, work: Workload, gen, replicas: int, priced) -> StageTime:
    """The teacher's chains from `replicas` vLLM servers on cards like `card`: continuous batching, the client's
    generate.concurrency requests spread evenly over them, each replica generating its share of the chains."""
    per_replica = max(1, gen.concurrency // replicas)
    seconds = decode_seconds(shape, plan, card, "vllm", 0, per_replica, gen.max_new_tokens, work.chain_tokens,
                             work.prompt_tokens, work.chains / replicas)
    busy = busy_concurrency(shape, plan, card)
    advice = (f"; raise generate.concurrency to ~{busy * replicas} to keep them busy" if per_replica < busy
              else "")
    return priced("generate", work.chains * work.chain_tokens, seconds,
                  f"{work.chains:,} chains from {replicas} vLLM replica(s) on {card.name}, {per_replica} in flight each "
                  f"(generate.concurrency {gen.concurrency}; a replica is busy from ~{busy}){advice}", cards=replicas)


def _known_shape(model: str):
    """A server model's shape when its config is shipped in data/model_configs or is a local folder; else None."""
    import json
    from pathlib import Path

    from budget_reasoner.memory import KNOWN_CONFIGS, read_model_shape

    index = json.loads((KNOWN_CONFIGS / "index.json").read_text())
    return read_model_shape(model) if model in index or Path(model).is_dir() else None
