"""Peak training memory of a stage, estimated from a model's config and a preset, without loading weights.

Every dtype comes from the stage's plan (plan.py: what is 4-bit, what is upcast, autocast, full or chunked
logits, the optimizer's state), so a loader change that moves a dtype moves the estimate with it.
The parts, per stage (sft, dpo, distill, grpo), in bytes:
- base weights: linear layers in NF4 (4 bits + one fp32 absmax per 64 weights, itself 8-bit quantized
  with double quantization: ~4.13 bits), embeddings and an untied LM head at the plan's dtype for them
  (bitsandbytes leaves them unquantized; norms and biases, under 0.1% of the bytes, are left out); or every
  weight in the compute dtype without 4-bit;
- the largest linear layer dequantized for the duration of its matmul (4-bit only), and under autocast a
  compute-dtype copy of an LM head stored wider (autocast casts a frozen weight again on every forward);
- LoRA adapters: weights and gradients at the plan's LoRA dtype (fp32), plus the optimizer's state;
- activations saved for the backward: per token per layer about 8*hidden + 2*kv + 4*intermediate
  values (the norms' inputs, q/k/v/output for attention, gate/up/act for the MLP), the hidden-sized ones
  at the residual stream's dtype; with gradient checkpointing one hidden vector per layer (in host RAM
  when the plan offloads them) plus one layer's worth recomputed; eager attention adds the heads x T x T scores;
- logits: full, tokens x vocab x (logits + their fp32 copy, fp32 log-softmax and gradient); or, chunked (our
  fused losses: sft with `fused_loss`, distill), one chunk of fp32 logits plus, under 16-bit compute, the chunk in
  that dtype beside it; DPO goes through TRL 1.16's own fused LM head, whose tile (4,096 tokens x 32,768 vocabulary
  entries in the compute dtype) this counts instead, with the fp32 copies its torch fallback makes off CUDA, and
  the frozen "ref" copy of the adapter TRL adds for the reference log-probs;
- on CUDA, 5% for the caching allocator's fragmentation and a fixed allowance for the CUDA context and
  cuBLAS workspaces (on the CPU, measured with steady malloc settings, neither is needed).
DPO runs chosen and rejected together (twice the sequences). GRPO trains on `grpo.batch_size` completions (of
`grpo.num_generations` per problem) of at most max_prompt_length + max_completion_length tokens through TRL's fused
LM head as DPO does, with no reference (beta 0; beta > 0 with LoRA reads the base with the adapter off: no copy);
its completions come from the colocated vLLM engine on CUDA (its reserved share of the card, counted whole) or from
transformers' generate, whose KV cache for the generation batch (batch_size x grad_accum sequences) is freed
before the step, so only what it needs beyond the step's own memory raises the peak. The teacher's work is estimated too: sampling
chains (weights, every sequence's KV cache at its longest, one layer of prefill, the next-token scores) and
distill's top-k cache (one no-grad forward, one chunk of logits). `budget-reasoner vram` prints the table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.kernels.fused_loss import chunk_tokens_for
from budget_reasoner.plan import DTYPE_BYTES, INFERENCE_STAGES, TRAINING_STAGES, Plan, plan_for

GIB = 2**30
KNOWN_CONFIGS = Path(__file__).resolve().parent.parent / "data" / "model_configs"
CUDA_CONTEXT_BYTES = 0.6 * GIB  # context + cuBLAS/cuDNN workspaces; not in max_memory_allocated but on the card
FRAGMENTATION = 1.05  # CUDA's caching allocator rarely packs perfectly
HEADROOM = 0.10  # kept free beyond the context and allocator slack the estimate holds: the estimator's own error


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_parameters(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.embedding_parameters


@functools.lru_cache(maxsize=64)  # each preset check reads its student and teacher for six stages
def read_model_shape(name_or_path: str | Path) -> ModelShape:
    """The shape from a local config.json (a folder or the file), a known hub id shipped in data/, or the hub."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
    else:
        index = json.loads((KNOWN_CONFIGS / "index.json").read_text())
        if str(name_or_path) in index:
            config = json.loads((KNOWN_CONFIGS / index[str(name_or_path)]).read_text())
        else:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(name_or_path)).to_dict()
            except Exception as error:  # no network, a typo, a gated repo: all end the same way for the user
                raise BudgetReasonerError(
                    f"cannot read the config of {str(name_or_path)!r} ({str(error).splitlines()[0][:120]}); "
                    f"pass a local folder holding its config.json"
                ) from None
    config = config.get("text_config", config)
    try:
        return ModelShape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                          config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]),
                          config["vocab_size"], bool(config.get("tie_word_embeddings", False)))
    except KeyError as error:
        raise BudgetReasonerError(f"the config of {str(name_or_path)!r} has no {error.args[0]}: not a decoder LM the estimator knows") from None


@dataclass
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, vram_gb: float, headroom: float = 0.10) -> bool:
        return self.total <= vram_gb * GIB * (1 - headroom)

    def table(self, vram_gb: float | None = None) -> str:
        width = max([34, *(len(name) + 2 for name in self.parts)])
        lines = [f"{'part':<{width}}{'GiB':>8}"]
        lines += [f"{name:<{width}}{value / GIB:>8.2f}" for name, value in self.parts.items()]
        lines.append(f"{'total':<{width}}{self.total / GIB:>8.2f}")
        if vram_gb:
            verdict = "fits" if self.fits(vram_gb) else "does NOT fit"
            lines.append(f"{verdict} a {vram_gb:g} GiB card with 10% headroom ({self.total / (vram_gb * GIB):.0%} used)")
        return "\n".join(lines)


def lora_parameters(shape: ModelShape, preset: Preset) -> int:
    shapes = shape.linear_shapes()
    return shape.layers * sum(preset.lora.r * (shapes[name][0] + shapes[name][1]) for name in preset.lora.target_modules if name in shapes)


def estimate_training_memory(shape: ModelShape, preset: Preset, stage: str = "sft", device: str = "cuda",
                             plan: Plan | None = None) -> MemoryEstimate:
    """Peak memory of one training step of `stage` ("sft", "dpo", "distill" or "grpo") under `preset`, as `plan`
    runs it (default: the plan of that stage on a CUDA card with the bitsandbytes backend)."""
    plan = plan or plan_for(preset, stage, device)
    settings = getattr(preset, stage)
    compute, residual = DTYPE_BYTES[plan.compute_dtype], DTYPE_BYTES[plan.residual_dtype]
    sequence = training_sequence(preset, stage)
    sequences = settings.batch_size * (2 if stage == "dpo" else 1)
    tokens = sequences * sequence
    estimate = _with_weights(shape, plan)
    parts = estimate.parts
    if plan.autocast_dtype and plan.embeddings_dtype != plan.autocast_dtype:
        parts["LM head cast (autocast)"] = shape.vocab * shape.hidden * DTYPE_BYTES[plan.autocast_dtype]
    lora = lora_parameters(shape, preset)
    parts["LoRA weights + grads + optimizer"] = lora * (2 * DTYPE_BYTES[plan.lora_dtype] + plan.optimizer_state_bytes)
    per_token_layer = 8 * shape.hidden * residual + (2 * shape.kv_dim + 4 * shape.intermediate) * compute
    before_step = sum(parts.values())  # what lives through the whole step; the rest is the step's own
    if settings.gradient_checkpointing:
        kept = 0 if plan.offload_checkpoints else tokens * shape.layers * shape.hidden * residual
        parts["activations (checkpointed)"] = kept + tokens * per_token_layer
    else:
        parts["activations"] = tokens * shape.layers * per_token_layer
    if preset.model.attention == "eager":
        parts["attention scores (eager)"] = (sequences * shape.heads * sequence**2 * (compute + 4)
                                             * (1 if settings.gradient_checkpointing else shape.layers))
    if stage in ("dpo", "grpo"):  # TRL's fused LM head, for the policy and (no grad) the reference log-probs alike
        parts.update(_trl_fused_lm_head(shape, tokens, DTYPE_BYTES[plan.logits_dtype], device))
        if stage == "dpo":
            parts["reference adapter (TRL's frozen copy)"] = lora * DTYPE_BYTES[plan.lora_dtype]
    elif plan.logits == "chunked":
        # our chunked loss: a chunk's fp32 logits (the gradient overwrites them), and beside them the chunk in the
        # compute dtype when that is 16-bit (the matmul's output before the upcast, the gradient's cast for its matmul)
        logits = DTYPE_BYTES[plan.logits_dtype]
        parts["logits (fused, one chunk)"] = (min(tokens, chunk_tokens_for(shape.vocab, device)) * shape.vocab
                                              * (4 + (logits if logits < 4 else 0)))
    else:
        logits = DTYPE_BYTES[plan.logits_dtype]
        parts["logits + loss"] = tokens * shape.vocab * (logits + 4 + 4 + (4 if logits == 2 else 0))
    if stage == "opd":
        parts.update(_opd_beside_the_step(shape, preset, plan, device, sum(parts.values()) - before_step))
    if stage != "grpo":
        return _with_cuda_overheads(estimate, device)
    engine = vllm_share(preset, device)
    if not engine:  # transformers' generate, before the step's forward: only what outgrows the step raises the peak
        generation = _grpo_generation(shape, preset, plan, device)
        parts[f"generation beyond the step ({grpo_generation_batch(preset)} sequences' KV cache)"] = \
            max(0.0, generation - (sum(parts.values()) - before_step))
    estimate = _with_cuda_overheads(estimate, device)
    if engine:  # its own pool, reserved whole by vLLM (outside the training allocator's slack)
        parts[f"vLLM engine (colocated, {preset.grpo.vllm_gpu_memory_utilization:.0%} of the card)"] = engine
    return estimate


def training_sequence(preset: Preset, stage: str) -> int:
    """Tokens of the longest training sequence: model.max_length, or for grpo a prompt (at most
    grpo.max_prompt_length: longer ones are left out) and its completion; for opd a prompt (at most grpo's bound,
    the same problems) and its sampled completion, within model.max_length."""
    if stage == "grpo":
        return preset.grpo.max_prompt_length + preset.grpo.max_completion_length
    if stage == "opd":
        return min(preset.model.max_length, preset.grpo.max_prompt_length + preset.opd.max_completion_length)
    return preset.model.max_length


def _opd_beside_the_step(shape: ModelShape, preset: Preset, plan: Plan, device: str, step_bytes: float) -> dict:
    """What on-policy distillation holds beside the student's training step (train/opd.py): the scoring teacher
    (distill.teacher or model.teacher) loaded as the preset loads models, whole or streamed a layer at a time (a
    server's is not this card's), and its no-grad forward over the step's completions; the student's own sampling
    of them (KV cache at the longest, next-token scores), which happens before the step and raises the peak only
    where it outgrows it."""
    parts: dict[str, float] = {}
    teacher = preset.scoring_teacher
    if teacher and not teacher.startswith("openai:"):
        teacher_shape = read_model_shape(teacher)
        if preset.distill.stream_layers:
            streamed = estimate_streamed_cache_memory(teacher_shape, device).parts
            parts["teacher (streamed: one layer + blocks)"] = sum(
                value for name, value in streamed.items() if not name.startswith(("allocator", "CUDA")))
        else:
            cache_plan = plan_for(preset, "cache", device)
            parts[f"teacher weights ({'NF4' if cache_plan.four_bit else cache_plan.compute_dtype})"] = sum(
                _with_weights(teacher_shape, cache_plan).parts.values())
            tokens = preset.opd.batch_size * training_sequence(preset, "opd")
            compute = DTYPE_BYTES[cache_plan.compute_dtype]
            parts["teacher forward (one layer, no grad) + top-k chunk"] = (
                tokens * (4 * teacher_shape.hidden + 3 * teacher_shape.intermediate) * compute
                + tokens * teacher_shape.hidden * compute
                + min(tokens, chunk_tokens_for(teacher_shape.vocab, device)) * teacher_shape.vocab * 4 * 2)
    compute = DTYPE_BYTES[plan.compute_dtype]
    sequences = preset.opd.batch_size
    sampling = (sequences * training_sequence(preset, "opd") * shape.layers * 2 * shape.kv_dim * compute
                + sequences * shape.vocab * 4 * 3)
    parts[f"sampling beyond the step ({sequences} sequences' KV cache)"] = max(0.0, sampling - step_bytes)
    return parts


def grpo_generation_batch(preset: Preset) -> int:
    """Completions TRL samples at once: one generation batch, batch_size x grad_accum (steps_per_generation)."""
    return preset.grpo.batch_size * preset.grpo.grad_accum


def vllm_share(preset: Preset, device: str) -> float:
    """Bytes the colocated vLLM engine reserves on a CUDA card (grpo.vllm_gpu_memory_utilization of the preset's
    card as torch reports it); 0 where TRL generates with transformers."""
    if device != "cuda" or preset.grpo.vllm_gpu_memory_utilization <= 0 or preset.vram_gb <= 0:
        return 0.0
    return preset.grpo.vllm_gpu_memory_utilization * preset.vram_gb * GIB


def _grpo_generation(shape: ModelShape, preset: Preset, plan: Plan, device: str) -> float:
    """transformers' generate of one generation batch with the training model: every sequence's KV cache at its
    longest (prompt + completion), one layer of prefill, the next-token scores (as estimate_inference_memory)."""
    compute = DTYPE_BYTES[plan.compute_dtype]
    sequences, settings = grpo_generation_batch(preset), preset.grpo
    kv = sequences * training_sequence(preset, "grpo") * shape.layers * 2 * shape.kv_dim * compute
    prefill = sequences * settings.max_prompt_length * (4 * shape.hidden + 3 * shape.intermediate) * compute
    return kv + prefill + sequences * shape.vocab * 4 * 3


def vllm_engine_needs(shape: ModelShape, preset: Preset) -> float:
    """What the colocated vLLM engine must hold inside its share to sample a whole generation batch at once: the
    weights as TRL has it load them (bitsandbytes 4-bit when the student is; else the compute dtype) and every
    sequence's KV cache at its longest. vLLM adds its own activations and CUDA graphs beside these."""
    plan = plan_for(preset, "generate", "cuda")
    kv = (grpo_generation_batch(preset) * training_sequence(preset, "grpo") * shape.layers * 2 * shape.kv_dim
          * DTYPE_BYTES[plan.compute_dtype])
    return sum(_with_weights(shape, plan).parts.values()) + kv


STRATEGIES = ("ddp", "fsdp")
# FSDP2 gathers the next decoder layer's weights while computing this one (its forward and backward prefetch): two
# layers are whole at a time beside the shards (torch.distributed.fsdp.fully_shard, reshard_after_forward=True)
FSDP_GATHERED_LAYERS = 2


def estimate_training_memory_per_gpu(shape: ModelShape, preset: Preset, stage: str = "sft", gpus: int = 1,
                                     strategy: str = "ddp", plan: Plan | None = None) -> MemoryEstimate:
    """Peak memory on each of `gpus` cards training `stage` data-parallel (batch_size is per device, so a card's
    activations and logits are the one-card figure whatever the number of cards).

    "ddp": every card holds the whole model (a full replica) and its own optimizer state, plus DDP's gradient
    buckets, a copy of the trainable gradients that the all-reduce runs over. "fsdp" (FSDP2, presets/accelerate/
    fsdp2-qlora.yaml): the decoder layers' weights and the trainable weights, gradients and optimizer state are
    split across the cards; FSDP_GATHERED_LAYERS layers are whole at a time, and the root unit (embeddings, LM
    head) stays whole through the step."""
    if strategy not in STRATEGIES:
        raise BudgetReasonerError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if gpus < 1:
        raise BudgetReasonerError(f"--gpus must be at least 1, got {gpus}")
    plan = plan or plan_for(preset, stage, "cuda")
    one_card = estimate_training_memory(shape, preset, stage, "cuda", plan)
    if gpus == 1:
        return one_card
    parts = {name: value for name, value in one_card.parts.items()
             if name not in ("allocator slack (5%)", "CUDA context + workspaces")}  # recomputed below
    lora = "LoRA weights + grads + optimizer"
    if strategy == "ddp":
        parts["DDP gradient buckets"] = lora_parameters(shape, preset) * DTYPE_BYTES[plan.lora_dtype]
    else:
        layer_bytes = (4.127 / 8 if plan.four_bit else DTYPE_BYTES[plan.compute_dtype]) * shape.linear_parameters
        weights = "base weights (NF4)" if plan.four_bit else "base weights"
        parts[weights] -= layer_bytes * (1 - 1 / gpus)  # the embeddings (in "base weights" when unquantized) stay whole
        parts[f"{weights}: gathered layers (FSDP, {FSDP_GATHERED_LAYERS})"] = \
            layer_bytes / shape.layers * min(FSDP_GATHERED_LAYERS, shape.layers)
        parts[lora] = parts[lora] / gpus
        parts = {(f"{name} (1/{gpus} shard)" if name in (weights, lora) else name): value for name, value in parts.items()}
    return _with_cuda_overheads(MemoryEstimate(parts), "cuda")


TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl/kernels/chunked_logprob.py (TOKEN_CHUNK_SIZE; the trainer's chunk_size)
TRL_CPU_TILE_COPIES = 8  # fp32 tile-sized temporaries of its torch fallback's backward (measured: 7.8; forward 3.9)


def _trl_fused_lm_head(shape: ModelShape, tokens: int, logits_bytes: int, device: str) -> dict[str, float]:
    """What TRL 1.16's fused LM head (`add_fused_lm_head` -> `ChunkedLogProbFunction`, the DPO trainer's log-probs)
    holds: one tokens x vocab tile in the compute dtype, recomputed in the backward, which accumulates the hidden
    states' gradient in fp32. On CUDA a Triton kernel folds the tile in place; elsewhere (the CPU) its torch fallback
    materializes fp32 copies of the tile: ~4 in the forward, ~8 in the backward."""
    tile = min(tokens, TRL_TOKEN_TILE) * min(shape.vocab, TRL_VOCAB_TILE)
    parts = {"logits (TRL fused LM head, one tile)": tile * logits_bytes,
             # the final hidden states it saves (a copy: the label positions, or the shifted view made contiguous),
             # and the fp32 gradient its backward accumulates for them
             "TRL head: saved hidden states + fp32 gradient": tokens * shape.hidden * (logits_bytes + 4)}
    if device != "cuda":
        parts["TRL torch-fallback tile copies (fp32)"] = tile * 4 * TRL_CPU_TILE_COPIES
    return parts


def teacher_cache_batch(preset: Preset) -> int:
    """Sequences per forward of distill's teacher top-k cache: a quarter of `generate.batch_size`, as each is a
    whole prompt + chain at once rather than one token a step."""
    return max(1, preset.generate.batch_size // 4)


def estimate_inference_memory(shape: ModelShape, preset: Preset, task: str = "generate", device: str = "cuda") -> MemoryEstimate:
    """Peak memory of a model's inference work under `preset`, loaded as the preset loads models (4-bit on GPUs):
    "generate" (the teacher samples chains) and "eval" (the student answers) decode `batch_size` sequences
    together, each one's KV cache at its longest; "cache" is distill's one no-grad forward of the teacher for
    the top-k cache (a quarter of `generate.batch_size` sequences)."""
    if task not in INFERENCE_STAGES:
        raise BudgetReasonerError(f"inference task must be generate, cache or eval, got {task!r}")
    if task == "cache" and preset.distill.stream_layers:
        return estimate_streamed_cache_memory(shape, device)
    plan = plan_for(preset, task, device)
    compute = DTYPE_BYTES[plan.compute_dtype]
    estimate = _with_weights(shape, plan)
    parts = estimate.parts
    layer_transient = 4 * shape.hidden + 3 * shape.intermediate  # one layer's values per token, freed as it goes
    if task in ("generate", "eval"):
        settings = preset.generate if task == "generate" else preset.eval
        sequences = settings.batch_size
        prompt = max(256, preset.model.max_length - settings.max_new_tokens)  # what the training length leaves it
        parts["KV cache"] = sequences * (prompt + settings.max_new_tokens) * shape.layers * 2 * shape.kv_dim * compute
        parts["prefill (one layer)"] = sequences * prompt * layer_transient * compute
        parts["next-token scores"] = sequences * shape.vocab * 4 * 3  # fp32 logits, log-softmax, sampling probabilities
    elif task == "cache":
        tokens = teacher_cache_batch(preset) * preset.model.max_length
        parts["forward (one layer, no grad)"] = tokens * layer_transient * compute
        parts["final hidden states"] = tokens * shape.hidden * compute
        parts["top-k logits (one chunk)"] = chunk_tokens_for(shape.vocab, device) * shape.vocab * 4 * 2
    return _with_cuda_overheads(estimate, device)


def estimate_streamed_cache_memory(shape: ModelShape, device: str = "cuda") -> MemoryEstimate:
    """The top-k cache by layer streaming (scoring.LayerStreamedScorer) on `device`: one decoder layer in its
    stored 16-bit dtype, one block of sequences' activations and one block of fp32 logits (`work_bytes` each,
    STREAM_WORK_BYTES on CUDA), one block of LM-head rows. The batch's hidden states and the prefetched next
    layer wait in host memory (distill.stream_tokens x hidden x 2 bytes, and one layer more): not the card's."""
    from budget_reasoner.scoring import STREAM_HEAD_ROWS, STREAM_WORK_BYTES

    stored = 2  # bf16 / fp16 checkpoints
    work = STREAM_WORK_BYTES if device == "cuda" else STREAM_HEAD_ROWS * shape.hidden * stored
    estimate = MemoryEstimate()
    estimate.parts.update({
        "one decoder layer (streamed, 16-bit)": sum(a * b for a, b in shape.linear_shapes().values()) * stored,
        "one block's activations": work,
        "LM-head rows (one block)": STREAM_HEAD_ROWS * shape.hidden * stored,
        "top-k logits (one block, fp32)": work,
    })
    return _with_cuda_overheads(estimate, device)


def _with_weights(shape: ModelShape, plan: Plan) -> MemoryEstimate:
    estimate = MemoryEstimate()
    parts = estimate.parts
    compute = DTYPE_BYTES[plan.compute_dtype]
    if plan.four_bit:
        parts["base weights (NF4)"] = shape.linear_parameters * (4.127 / 8)
        parts["embeddings / LM head"] = shape.embedding_parameters * DTYPE_BYTES[plan.embeddings_dtype]
        parts["dequantized layer (transient)"] = max(a * b for a, b in shape.linear_shapes().values()) * compute
    else:
        parts["base weights"] = shape.parameters * compute
    return estimate


def _with_cuda_overheads(estimate: MemoryEstimate, device: str) -> MemoryEstimate:
    if device == "cuda":
        allocated = sum(estimate.parts.values())
        estimate.parts["allocator slack (5%)"] = allocated * (FRAGMENTATION - 1)
        estimate.parts["CUDA context + workspaces"] = CUDA_CONTEXT_BYTES
    return estimate


TEACHER_STAGES = ("generate", "cache")  # the teacher samples and is cached; the student trains and is evaluated


def estimate_stage(preset: Preset, stage: str, model: str | None = None) -> tuple[str, MemoryEstimate]:
    """(model, estimate) of any stage: training and eval run the student, generate and cache the teacher."""
    if stage not in TRAINING_STAGES + INFERENCE_STAGES:
        raise BudgetReasonerError(f"--stage must be one of {', '.join(TRAINING_STAGES + INFERENCE_STAGES)}, got {stage!r}")
    if model is None:
        teachers = {"generate": preset.chain_teacher, "cache": preset.scoring_teacher or preset.chain_teacher}
        model = teachers.get(stage, preset.model.student)
    if stage in TRAINING_STAGES:
        return model, estimate_training_memory(read_model_shape(model), preset, stage)
    return model, estimate_inference_memory(read_model_shape(model), preset, stage)


def preset_fits(preset: Preset, vram_gb: float, headroom: float = HEADROOM) -> tuple[bool, dict[str, MemoryEstimate]]:
    """Whether every stage of `preset` fits `vram_gb` with `headroom`, and the estimates. A server teacher
    (openai:MODEL) runs elsewhere: its generation (generate.teacher) or scoring (distill.teacher) is not this
    card's, and with a server chain teacher and no distill.teacher quickstart skips the cache."""
    stages = TRAINING_STAGES + INFERENCE_STAGES
    served = {"generate": preset.chain_teacher.startswith("openai:"),
              "cache": (preset.scoring_teacher or "openai:").startswith("openai:")}
    stages = tuple(stage for stage in stages if not served.get(stage, False))
    estimates = {stage: estimate_stage(preset, stage)[1] for stage in stages}
    return all(e.fits(vram_gb, headroom) for e in estimates.values()), estimates


def largest_stage(estimates: dict[str, MemoryEstimate]) -> tuple[str, MemoryEstimate]:
    return max(estimates.items(), key=lambda item: item[1].total)


def recommend_preset(hardware) -> tuple[str, str]:
    """(preset name, why): on a GPU the largest shipped GPU preset whose every stage the estimator says fits the
    memory torch reports (GiB; its estimates hold the CUDA context and allocator slack) with 10% headroom, not the
    GB it is named for; a card without bf16 (before sm_80) takes an fp16 preset. On the CPU, cpu-tiny."""
    from budget_reasoner.config import available_presets, load_preset

    if hardware.device != "cuda":
        return "cpu-tiny", "no CUDA GPU: the offline CPU preset"
    card = f"{hardware.name} ({hardware.total_memory_gb:.2f} GiB as torch reports it)"
    presets = sorted((load_preset(name) for name in available_presets()), key=lambda p: p.vram_gb, reverse=True)
    fitting = [p for p in presets if p.vram_gb > 0 and preset_fits(p, hardware.total_memory_gb)[0]]
    if hardware.supports_bf16:  # the fp16 presets are for cards without bf16
        chosen = next((p for p in fitting if p.quantization.compute_dtype != "float16"), None)
    else:  # fp16 presets first; a bf16 one only with the override it needs
        chosen = next((p for p in fitting if p.quantization.compute_dtype != "bfloat16"), None)
        if chosen is None and fitting:
            return fitting[0].name, (f"{card} has no bf16 (sm_{hardware.compute_capability[0]}{hardware.compute_capability[1]}): "
                                     f"run {fitting[0].name} with --set quantization.compute_dtype=float16")
    if chosen is None:
        return "cpu-tiny", f"{card} is smaller than any GPU preset's estimate with 10% headroom"
    stage, peak = largest_stage(preset_fits(chosen, hardware.total_memory_gb)[1])
    return chosen.name, (f"{card}: {chosen.name}'s largest stage ({stage}) is estimated at {peak.total / GIB:.1f} GiB, "
                         f"{peak.total / (hardware.total_memory_gb * GIB):.0%} of it (10% headroom kept)")


def check_preset_fits(preset: Preset, hardware) -> None:
    """Refuse, in one line and before any model loads, a preset this card cannot run: a stage whose estimate does
    not fit its memory, or bf16 compute on a card without bf16. A model whose config cannot be read is not checked."""
    name, capability = hardware.name, hardware.compute_capability
    if preset.quantization.compute_dtype == "bfloat16" and not hardware.supports_bf16:
        raise BudgetReasonerError(
            f"preset {preset.name} computes in bfloat16, which {name} (sm_{capability[0]}{capability[1]}) lacks; "
            f"add --set quantization.compute_dtype=float16, or use --preset {recommend_preset(hardware)[0]}"
        )
    try:
        fits, estimates = preset_fits(preset, hardware.total_memory_gb)
    except BudgetReasonerError:
        return
    if not fits:
        stage, peak = largest_stage(estimates)
        suggestion, _ = recommend_preset(hardware)
        raise BudgetReasonerError(
            f"preset {preset.name} does not fit {name}: its {stage} stage is estimated at {peak.total / GIB:.1f} GiB, over "
            f"{(1 - HEADROOM) * hardware.total_memory_gb:.1f} of its {hardware.total_memory_gb:.1f} GiB (10% headroom); "
            f"--preset {suggestion} fits it (`budget-reasoner vram --preset {preset.name} --stage {stage}` shows the parts)"
        )


def longest_sequence(shape: ModelShape, preset: Preset, vram_gb: float, stage: str = "sft", headroom: float = 0.10) -> int:
    """The longest training sequence (at the preset's batch size) whose estimate fits `vram_gb` with `headroom`
    (grpo, opd: its prompt + completion, the completion grown)."""
    import copy

    trial = copy.deepcopy(preset)

    def fits(length: int) -> bool:
        if stage in ("grpo", "opd"):
            getattr(trial, stage).max_completion_length = max(1, length - trial.grpo.max_prompt_length)
            trial.model.max_length = max(trial.model.max_length, length)  # opd's sequence stays within it
        else:
            trial.model.max_length = length
        return estimate_training_memory(shape, trial, stage).fits(vram_gb, headroom)

    low, high = 0, 1024
    while fits(high) and high < 2**21:
        low, high = high, high * 2
    while high - low > 64:  # a multiple of 64 is precise enough to size a preset
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
