"""Peak training memory of a stage, estimated from a model's config and a preset, without loading weights.

The parts, per stage (sft, dpo, distill), in bytes:
- base weights: linear layers in NF4 (4 bits + one fp32 absmax per 64 weights, itself 8-bit quantized
  with double quantization: ~4.13 bits), embeddings and an untied LM head in the compute dtype (bitsandbytes
  leaves them unquantized); or every weight in the compute dtype without 4-bit;
- the largest linear layer dequantized for the duration of its matmul (4-bit only);
- LoRA adapters: fp32 weights and gradients, plus the optimizer's two moments (fp32, or 8-bit);
- activations saved for the backward: per token per layer about 8*hidden + 2*kv + 4*intermediate
  values (the norms' inputs, q/k/v/output for attention, gate/up/act for the MLP); with gradient
  checkpointing one hidden vector per layer plus one layer's worth recomputed; eager attention adds
  the heads x T x T scores;
- logits: tokens x vocab x 14 bytes in bf16 (logits, their fp32 copy, fp32 log-softmax and gradient),
  or one chunk of fp32 logits with the fused loss (DPO in TRL always uses its chunked LM head);
- on CUDA, 5% for the caching allocator's fragmentation and a fixed allowance for the CUDA context and
  cuBLAS workspaces (on the CPU, measured with steady malloc settings, neither is needed).
DPO runs chosen and rejected together (twice the sequences). The teacher's work is estimated too: sampling
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

GIB = 2**30
KNOWN_CONFIGS = Path(__file__).resolve().parent.parent / "data" / "model_configs"
CUDA_CONTEXT_BYTES = 0.6 * GIB  # context + cuBLAS/cuDNN workspaces; not in max_memory_allocated but on the card
FRAGMENTATION = 1.05  # CUDA's caching allocator rarely packs perfectly
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
        lines = [f"{'part':<34}{'GiB':>8}"]
        lines += [f"{name:<34}{value / GIB:>8.2f}" for name, value in self.parts.items()]
        lines.append(f"{'total':<34}{self.total / GIB:>8.2f}")
        if vram_gb:
            verdict = "fits" if self.fits(vram_gb) else "does NOT fit"
            lines.append(f"{verdict} a {vram_gb:g} GiB card with 10% headroom ({self.total / (vram_gb * GIB):.0%} used)")
        return "\n".join(lines)


def lora_parameters(shape: ModelShape, preset: Preset) -> int:
    shapes = shape.linear_shapes()
    return shape.layers * sum(preset.lora.r * (shapes[name][0] + shapes[name][1]) for name in preset.lora.target_modules if name in shapes)


def estimate_training_memory(shape: ModelShape, preset: Preset, stage: str = "sft", device: str = "cuda") -> MemoryEstimate:
    """Peak memory of one training step of `stage` ("sft", "dpo" or "distill") under `preset`."""
    settings = {"sft": preset.sft, "dpo": preset.dpo, "distill": preset.distill}[stage]
    compute = 4 if device == "cpu" else DTYPE_BYTES[preset.quantization.compute_dtype]
    tokens = settings.batch_size * preset.model.max_length * (2 if stage == "dpo" else 1)
    estimate = _with_weights(shape, preset, compute)
    parts = estimate.parts
    lora = lora_parameters(shape, preset)
    optimizer_bytes = 2 if "8bit" in settings.optimizer else 8
    parts["LoRA weights + grads + optimizer"] = lora * (4 + 4 + optimizer_bytes)
    per_token_layer = (8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) * compute
    if settings.gradient_checkpointing:
        parts["activations (checkpointed)"] = tokens * (shape.layers * shape.hidden * compute + per_token_layer)
    else:
        parts["activations"] = tokens * shape.layers * per_token_layer
    if preset.model.attention == "eager":
        parts["attention scores (eager)"] = (settings.batch_size * (2 if stage == "dpo" else 1) * shape.heads
                                             * preset.model.max_length**2 * (compute + 4) * (1 if settings.gradient_checkpointing else shape.layers))
    fused = settings.fused_loss or stage in ("dpo", "distill")  # TRL's DPO and our distill are chunked already
    if fused:
        parts["logits (fused, one chunk)"] = min(tokens, chunk_tokens_for(shape.vocab)) * shape.vocab * 4
    else:
        parts["logits + loss"] = tokens * shape.vocab * (compute + 4 + 4 + (4 if compute == 2 else 0))
    return _with_cuda_overheads(estimate, device)


def teacher_cache_batch(preset: Preset) -> int:
    """Sequences per forward of distill's teacher top-k cache: a quarter of `generate.batch_size`, as each is a
    whole prompt + chain at once rather than one token a step."""
    return max(1, preset.generate.batch_size // 4)


def estimate_inference_memory(shape: ModelShape, preset: Preset, task: str = "generate", device: str = "cuda") -> MemoryEstimate:
    """Peak memory of a model's inference work under `preset`, loaded as the preset loads models (4-bit on GPUs):
    "generate" (the teacher samples chains) and "eval" (the student answers) decode `batch_size` sequences
    together, each one's KV cache at its longest; "cache" is distill's one no-grad forward of the teacher for
    the top-k cache (a quarter of `generate.batch_size` sequences)."""
    compute = 4 if device == "cpu" else DTYPE_BYTES[preset.quantization.compute_dtype]
    estimate = _with_weights(shape, preset, compute)
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
        parts["top-k logits (one chunk)"] = chunk_tokens_for(shape.vocab) * shape.vocab * 4 * 2
    else:
        raise BudgetReasonerError(f"inference task must be generate, cache or eval, got {task!r}")
    return _with_cuda_overheads(estimate, device)


def _with_weights(shape: ModelShape, preset: Preset, compute: int) -> MemoryEstimate:
    estimate = MemoryEstimate()
    parts = estimate.parts
    if preset.quantization.load_in_4bit:
        parts["base weights (NF4)"] = shape.linear_parameters * (4.127 / 8)
        parts["embeddings / LM head"] = shape.embedding_parameters * compute
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


TRAINING_STAGES = ("sft", "dpo", "distill")
INFERENCE_STAGES = ("generate", "cache", "eval")
TEACHER_STAGES = ("generate", "cache")  # the teacher samples and is cached; the student trains and is evaluated


def estimate_stage(preset: Preset, stage: str, model: str | None = None) -> tuple[str, MemoryEstimate]:
    """(model, estimate) of any stage: training and eval run the student, generate and cache the teacher."""
    if stage not in TRAINING_STAGES + INFERENCE_STAGES:
        raise BudgetReasonerError(f"--stage must be one of {', '.join(TRAINING_STAGES + INFERENCE_STAGES)}, got {stage!r}")
    model = model or (preset.model.teacher if stage in TEACHER_STAGES else preset.model.student)
    if stage in TRAINING_STAGES:
        return model, estimate_training_memory(read_model_shape(model), preset, stage)
    return model, estimate_inference_memory(read_model_shape(model), preset, stage)


def preset_fits(preset: Preset, vram_gb: float, headroom: float = 0.10) -> tuple[bool, dict[str, MemoryEstimate]]:
    """Whether every stage of `preset` fits `vram_gb` with `headroom`, and the estimates. A server teacher
    (openai:MODEL) runs elsewhere: its generation and cache are not this card's."""
    stages = TRAINING_STAGES + INFERENCE_STAGES
    if preset.model.teacher.startswith("openai:"):
        stages = tuple(stage for stage in stages if stage not in TEACHER_STAGES)
    estimates = {stage: estimate_stage(preset, stage)[1] for stage in stages}
    return all(e.fits(vram_gb, headroom) for e in estimates.values()), estimates


def recommend_preset(hardware) -> tuple[str, str]:
    """(preset name, why): on a GPU the largest shipped preset sized for no more than its memory that the
    estimator says fits with 10% headroom; on the CPU, cpu-tiny."""
    from budget_reasoner.config import available_presets, load_preset

    if hardware.device != "cuda":
        return "cpu-tiny", "no CUDA GPU: the offline CPU preset"
    candidates = sorted((load_preset(name) for name in available_presets()), key=lambda p: p.vram_gb, reverse=True)
    for preset in candidates:
        if 0 < preset.vram_gb <= hardware.total_memory_gb and preset_fits(preset, hardware.total_memory_gb)[0]:
            return preset.name, f"{hardware.name} has {hardware.total_memory_gb:.0f} GiB; {preset.name} is sized for {preset.vram_gb:g} GiB and fits with 10% headroom"
    return "cpu-tiny", f"{hardware.name} has {hardware.total_memory_gb:.0f} GiB, less than any GPU preset needs"


def longest_sequence(shape: ModelShape, preset: Preset, vram_gb: float, stage: str = "sft", headroom: float = 0.10) -> int:
    """The longest training sequence (at the preset's batch size) whose estimate fits `vram_gb` with `headroom`."""
    import copy

    trial = copy.deepcopy(preset)

    def fits(length: int) -> bool:
        trial.model.max_length = length
        return estimate_training_memory(shape, trial, stage).fits(vram_gb, headroom)

    low, high = 0, 1024
    while fits(high) and high < 2**21:
        low, high = high, high * 2
    while high - low > 64:  # a multiple of 64 is precise enough to size a preset
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
