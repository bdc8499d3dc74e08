"""Presets: typed dataclasses loaded from YAML, validated with one-line errors.

A preset sizes every stage of the recipe to one machine. `load_preset("cpu-tiny")` reads
`presets/cpu-tiny.yaml`; `load_preset("my.yaml")` reads any file. Keys missing from the file keep the
defaults below; an unknown key, a value of the wrong type, a value outside its range (RULES) or a
combination that cannot run (CROSS_RULES) is a `BudgetReasonerError` naming the file and the dotted key,
so a typo never silently falls back to a default and a zero never dies later inside a library.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from budget_reasoner.errors import BudgetReasonerError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class TinyModelConfig:
    """Shape of an offline model built from a config (used when the model name is `tiny-*`)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384


@dataclass
class ModelConfig:
    # "tiny-student" / "tiny-teacher" build offline models inside the run folder; anything else is a
    # hub id or a local path loaded with transformers (or Unsloth).
    student: str = "tiny-student"
    teacher: str = "tiny-teacher"
    tiny_student: TinyModelConfig = field(default_factory=TinyModelConfig)
    tiny_teacher: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=768)
    )
    max_length: int = 160  # prompt + completion tokens seen in training
    attention: str = "sdpa"  # "sdpa" | "eager" | "budget_flash" (our fused Triton kernel)
    # Who loads the model and adds LoRA for training (hardware.py decides "auto"): Unsloth's
    # FastLanguageModel when CUDA and unsloth are present, else transformers + peft + bitsandbytes.
    backend: Literal["auto", "unsloth", "bitsandbytes"] = "auto"


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = False  # NF4 base weights through bitsandbytes (QLoRA)
    compute_dtype: str = "float32"  # "bfloat16" on Ampere+, "float16" on a T4, "float32" on the CPU
    # how bitsandbytes stores the packed 4-bit weights: uint8 (its default), or the compute dtype for FSDP, which
    # flattens and shards only parameters of one dtype (presets/accelerate/fsdp2-qlora.yaml; same numbers either way)
    quant_storage: str = "uint8"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class PretrainConfig:
    """Offline bootstrap only: how long the tiny teacher and student base train from scratch.

    The teacher's schedule follows its greedy accuracy on held-aside problems (checked every `check_every`
    steps): a constant rate until it reaches `cooldown_at_accuracy` (past its learning transition), a
    cool-down over `cooldown_steps`, then a low rate until it reaches `teacher_target_accuracy`, at most
    `teacher_steps` in all. A fixed step count stopped it on the edge of its transition, where another
    machine's rounding moved it from 99.7% to 87% and everything downstream with it. A target of 0 trains
    a fixed `teacher_steps` with a cosine schedule."""

    teacher_steps: int = 1200
    student_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3
    num_problems: int = 20000
    teacher_target_accuracy: float = 0.0
    cooldown_at_accuracy: float = 0.75
    check_every: int = 100
    check_problems: int = 200
    cooldown_steps: int = 100


@dataclass
class TrainConfig:
    """One training stage (sft, dpo, distill)."""

    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = False
    fused_loss: bool = False
    save_steps: int = 100  # checkpoints every N steps, so an interrupted stage resumes
    optimizer: str = "adamw_torch"


@dataclass
class DpoConfig(TrainConfig):
    beta: float = 0.1
    # weight of an NLL term on the chosen chain beside the DPO loss (RPO / Iterative RPO for reasoning):
    # pure DPO on pairs that differ in one digit lowers the chosen chain's likelihood too and can collapse
    sft_weight: float = 1.0


@dataclass
class DistillConfig(TrainConfig):
    top_k: int = 8  # teacher log-probs cached per token
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to cross-entropy on the chain
    # KD over k+1 buckets: the teacher's top-k plus the probability mass outside it, against the student's full
    # softmax at those ids plus its own tail (fused_linear_kd_loss's `tail`); temperature 1.0 only, torch kernels
    kd_tail: bool = False
    # Who scores the chains for the top-k cache (empty: model.teacher, when it is local). The teacher's two jobs
    # are apart: generate.teacher writes chains (a server, a hosted API), distill.teacher only reads them, one
    # forward each, so a checkpoint far bigger than the card can do it a layer at a time (stream_layers).
    teacher: str = ""
    stream_layers: bool = False  # scoring.LayerStreamedScorer: one decoder layer in memory at a time
    # Streamed: tokens (padded) per pass over the layers. A pass reads the whole checkpoint from disk once, so it
    # must serve many tokens; their hidden states wait in host memory (stream_tokens x hidden x 2 bytes: 2 GiB
    # for a 72B's 8,192), a block at a time on the card.
    stream_tokens: int = 131072


@dataclass
class GrpoConfig(TrainConfig):
    """RL with verifiable rewards (TRL's GRPOTrainer): `batch_size` completions per device step, `num_generations`
    of them per problem (a group), the advantage each one's reward against its group's. TRL samples
    `batch_size x grad_accum` completions at once (a generation batch of whole groups) and takes one optimizer step
    over them, `batch_size` at a time."""

    learning_rate: float = 1e-5
    max_steps: int = 100
    num_generations: int = 4
    max_completion_length: int = 64
    # TRL does not cut prompts: a problem whose prompt has more tokens is left out (counted), so that a sequence is
    # never longer than max_prompt_length + max_completion_length, the length the estimator sizes the step for
    max_prompt_length: int = 96
    temperature: float = 1.0
    # On CUDA where vLLM imports, TRL's colocated vLLM engine samples the completions and reserves this share of the
    # card (its own 4-bit copy of the weights and its KV cache) for the whole run; 0: transformers' generate always
    vllm_gpu_memory_utilization: float = 0.3
    beta: float = 0.0  # KL to the start model; 0 needs no reference model (DAPO, Dr. GRPO and most R1 reproductions)
    loss_type: str = "dr_grpo"  # TRL's: grpo, dr_grpo (no length or std bias), dapo, bnpo
    epsilon: float = 0.2
    epsilon_high: float = 0.28  # DAPO's clip-higher: room for unlikely tokens to grow
    mask_truncated_completions: bool = True  # a chain cut at the length limit teaches nothing either way
    format_weight: float = 0.1  # small beside correctness (1.0): format alone must not pay
    length_weight: float = 0.0  # -weight x completion tokens / max_completion_length


@dataclass
class OpdConfig(TrainConfig):
    """On-policy distillation (train/opd.py): `batch_size` completions per device step, `num_generations` of them
    per problem, every sampled token scored by the teacher; the advantage is the per-token reverse KL."""

    learning_rate: float = 1e-4
    max_steps: int = 100
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0  # sampling only: the loss reads the student's own (temperature 1) log-probs
    # "sampled": policy gradient with the per-token advantage log p_teacher - log p_student on the sampled token
    # (Thinking Machines' on-policy distillation); "topk": at every sampled position, KL(student || teacher) over
    # the teacher's top-k tokens and the mass outside them, differentiated exactly (GKD's reverse KL, top-k bucketed)
    objective: str = "sampled"
    top_k: int = 8  # the teacher's top-k: the buckets of "topk"; for "sampled" read only from a scorer without token log-probs


@dataclass
class GenerateConfig:
    num_train_problems: int = 1000
    num_eval_problems: int = 300
    min_steps: int = 2  # operations per problem
    max_steps: int = 3
    samples_per_problem: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 256  # prompts per generate() call
    shard_size: int = 200  # problems per shard on disk; an interrupted run resumes at the last shard
    # A server teacher (openai:MODEL): requests in flight at once (vLLM batches them; one at a time leaves it idle),
    # tries after a 429/5xx/timeout, and seconds to wait for one answer. How chains are fetched, not which: not in
    # the generate folder's fingerprint, so a resumed run may change them.
    # Who writes the chains (empty: model.teacher): a local model, or openai:MODEL for any compatible server
    teacher: str = ""
    concurrency: int = 64
    max_retries: int = 5
    request_timeout: float = 600.0
    seed: int = 0
    instruction: str = ""  # appended to each question; real models want "Please reason step by step..."
    # problems beside the procedural ones: a benchmark's training split, "gsm8k" (hub) or "gsm8k=PATH_OR_ID"
    seed_sets: list[str] = field(default_factory=list)
    num_seed_problems: int = 0  # a seeded sample of that many seed problems; 0 takes them all
    # sets no training problem may overlap (13-gram), in the same form; the held-out split always is one
    decontaminate: list[str] = field(default_factory=list)
    tools: bool = False  # the chains may call tools: python blocks run in the sandbox, their output appended (tools.py)


@dataclass
class EvalConfig:
    maj_k: int = 4  # samples per problem for pass@k, maj@k (self-consistency) and best-of-k; 1 = greedy only
    temperature: float = 0.7
    max_new_tokens: int = 64
    batch_size: int = 256
    think_budget: int = 0  # budget forcing (s1): cap the thinking at this many tokens; 0 = off
    min_think_tokens: int = 0  # ... and replace an earlier </think> with "Wait"
    max_waits: int = 0  # ... at most this many times
    # benchmarks every stage is also evaluated on in quickstart: "gsm8k" (hub test split) or "gsm8k=PATH_OR_ID"
    benchmarks: list[str] = field(default_factory=list)
    benchmark_problems: int = 0  # a seeded sample of that many problems per benchmark; 0 takes them all
    tools: bool = False  # answer with tool calls run, as generate.tools (`eval --tools`)


@dataclass
class ToolsConfig:
    """How a chain's tool calls run (tools.py), for generate.tools and eval.tools alike."""

    max_calls: int = 4  # calls run per completion; the next one ends the chain
    timeout_s: float = 2.0  # wall clock per call: a hang becomes the output "timeout after 2 s"
    output_bytes: int = 512  # what a call's output block keeps: a flood becomes "output cut at 512 bytes"
    memory_mb: int = 512  # address space per call


@dataclass
class Preset:
    name: str = "custom"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vram_gb: float = 0.0  # the GPU memory this preset is sized for (0: the CPU)
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    opd: OpdConfig = field(default_factory=OpdConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    # Per-domain settings, dotted as --set takes them: `domains: {logic: {sft.max_steps: 2400}}`. quickstart and
    # bootstrap apply the entry of their --domain (for_domain), so one preset sizes domains that need other sizes;
    # a --set of the same key wins over it.
    domains: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if not record["domains"]:
            record.pop("domains")  # a preset without per-domain settings digests as before they existed
        return record

    @property
    def chain_teacher(self) -> str:
        """The model that writes the chains (generate): generate.teacher, else model.teacher."""
        return self.generate.teacher or self.model.teacher

    @property
    def scoring_teacher(self) -> str | None:
        """The model that scores the chains for logit-level KD (the distill cache): distill.teacher, else
        model.teacher when it is local. None: nothing here can score (a server chain teacher and no distill.teacher)."""
        if self.distill.teacher:
            return self.distill.teacher
        return None if self.model.teacher.startswith("openai:") else self.model.teacher


# ---- What each value may be ---------------------------------------------------------------------------
# Checked when a preset loads (file values and overrides alike), so a bad value is one line naming the key,
# not a library traceback minutes into a run: HF reads max_steps=-1 as "train by epochs", 0 as one step.


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: str  # what the error says the value must be


def at_least(low: float) -> Rule:
    return Rule(lambda value: value >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda value: value > low, f"> {low}")


def between(low: float, high: float, high_open: bool = False) -> Rule:
    if high_open:
        return Rule(lambda value: low <= value < high, f"in [{low}, {high})")
    return Rule(lambda value: low <= value <= high, f"in [{low}, {high}]")


def one_of(*names: str) -> Rule:
    return Rule(lambda value: value in names, "one of " + ", ".join(names))


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
ATTENTION = ("sdpa", "eager", "budget_flash")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# TrainingArguments.optim names that run with what we install (torch, bitsandbytes); transformers knows more
# (galore, apollo, lomo, schedule_free...) that need packages we do not ship
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
    "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
    "ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
)

# per dataclass, per field; a subclass (DpoConfig) also obeys its base's (TrainConfig) rules
RULES: dict[type, dict[str, Rule]] = {
    Preset: {"vram_gb": NON_NEGATIVE, "threads": NON_NEGATIVE, "seed": NON_NEGATIVE},
    TinyModelConfig: {"hidden_size": POSITIVE, "num_layers": POSITIVE, "num_heads": POSITIVE, "num_kv_heads": POSITIVE,
                      "intermediate_size": POSITIVE},
    ModelConfig: {"max_length": POSITIVE, "attention": one_of(*ATTENTION)},
    QuantizationConfig: {"compute_dtype": one_of(*COMPUTE_DTYPES), "quant_storage": one_of("uint8", *COMPUTE_DTYPES)},
    LoraConfig: {"r": POSITIVE, "alpha": above(0), "dropout": between(0, 1, high_open=True)},
    PretrainConfig: {"teacher_steps": POSITIVE, "student_steps": POSITIVE, "batch_size": POSITIVE,
                     "learning_rate": above(0), "num_problems": POSITIVE, "teacher_target_accuracy": between(0, 1),
                     "cooldown_at_accuracy": between(0, 1),
                     "check_every": POSITIVE, "check_problems": POSITIVE, "cooldown_steps": NON_NEGATIVE},
    TrainConfig: {"max_steps": POSITIVE, "batch_size": POSITIVE, "grad_accum": POSITIVE, "learning_rate": above(0),
                  "warmup_ratio": between(0, 1), "save_steps": POSITIVE, "optimizer": one_of(*OPTIMIZERS)},
    DpoConfig: {"beta": above(0), "sft_weight": NON_NEGATIVE},
    DistillConfig: {"top_k": POSITIVE, "temperature": above(0), "alpha": between(0, 1), "stream_tokens": POSITIVE},
    GrpoConfig: {"num_generations": at_least(2), "max_completion_length": POSITIVE, "temperature": above(0),
                 "beta": NON_NEGATIVE, "loss_type": one_of("grpo", "dr_grpo", "dapo", "bnpo"), "epsilon": above(0),
                 "epsilon_high": above(0), "format_weight": NON_NEGATIVE, "length_weight": NON_NEGATIVE,
                 "max_prompt_length": POSITIVE, "vllm_gpu_memory_utilization": between(0, 1, high_open=True)},
    OpdConfig: {"num_generations": POSITIVE, "max_completion_length": POSITIVE, "temperature": above(0), "top_k": POSITIVE,
                "objective": one_of("sampled", "topk")},
    GenerateConfig: {"num_train_problems": POSITIVE, "num_eval_problems": POSITIVE, "min_steps": POSITIVE,
                     "max_steps": POSITIVE, "samples_per_problem": POSITIVE, "temperature": NON_NEGATIVE,
                     "max_new_tokens": POSITIVE, "batch_size": POSITIVE, "shard_size": POSITIVE, "seed": NON_NEGATIVE,
                     "num_seed_problems": NON_NEGATIVE, "concurrency": POSITIVE, "max_retries": NON_NEGATIVE,
                     "request_timeout": above(0)},
    EvalConfig: {"maj_k": POSITIVE, "temperature": NON_NEGATIVE, "max_new_tokens": POSITIVE, "batch_size": POSITIVE,
                 "think_budget": NON_NEGATIVE, "min_think_tokens": NON_NEGATIVE, "max_waits": NON_NEGATIVE,
                 "benchmark_problems": NON_NEGATIVE},
    ToolsConfig: {"max_calls": POSITIVE, "timeout_s": above(0), "output_bytes": POSITIVE, "memory_mb": at_least(64)},
}


def _tiny_shape_rules(name: str) -> list[tuple[str, Callable[[Preset], bool], str]]:
    shape = lambda p: getattr(p.model, name)  # noqa: E731
    return [
        (f"model.{name}.hidden_size", lambda p: shape(p).hidden_size % shape(p).num_heads == 0,
         f"a multiple of model.{name}.num_heads"),
        (f"model.{name}.num_heads", lambda p: shape(p).num_heads % shape(p).num_kv_heads == 0,
         f"a multiple of model.{name}.num_kv_heads"),
    ]


# (key the error names, test on the whole preset, what the key must be)
CROSS_RULES: list[tuple[str, Callable[[Preset], bool], str]] = [
    ("generate.max_steps", lambda p: p.generate.max_steps >= p.generate.min_steps, ">= generate.min_steps"),
    # generate() decodes all of one problem's samples in one batch: a smaller batch silently runs more at once
    ("generate.batch_size", lambda p: p.generate.batch_size >= p.generate.samples_per_problem,
     ">= generate.samples_per_problem"),
    ("eval.batch_size", lambda p: p.eval.batch_size >= p.eval.maj_k, ">= eval.maj_k"),
    # the cache holds the teacher's log-probs at temperature 1, so its tail bucket exists only there
    ("distill.kd_tail", lambda p: not p.distill.kd_tail or p.distill.temperature == 1.0,
     "false unless distill.temperature is 1.0 (the cached teacher log-probs are at temperature 1)"),
    # TRL samples a generation batch (batch_size x grad_accum completions) of whole groups of one problem's
    # completions, then trains on it batch_size at a time
    ("grpo.batch_size", lambda p: p.grpo.batch_size * p.grpo.grad_accum % p.grpo.num_generations == 0,
     "such that grpo.batch_size x grpo.grad_accum (a generation batch) is a multiple of grpo.num_generations"),
    # each problem of a step is sampled num_generations times
    ("opd.batch_size", lambda p: p.opd.batch_size % p.opd.num_generations == 0, "a multiple of opd.num_generations"),
    ("distill.stream_layers", lambda p: not (p.distill.stream_layers and (p.scoring_teacher or "").startswith("openai:")),
     "false when the scoring teacher is a server (openai:...): streaming reads a local checkpoint"),
    ("eval.min_think_tokens", lambda p: p.eval.think_budget == 0 or p.eval.min_think_tokens <= p.eval.think_budget,
     "<= eval.think_budget"),
    ("eval.tools", lambda p: not (p.eval.tools and p.eval.think_budget > 0),
     "false when eval.think_budget > 0 (budget forcing runs no tool calls)"),
    *_tiny_shape_rules("tiny_student"),
    *_tiny_shape_rules("tiny_teacher"),
]


def _rules_for(cls: type) -> dict[str, Rule]:
    merged: dict[str, Rule] = {}
    for base in reversed(cls.__mro__):
        merged.update(RULES.get(base, {}))
    return merged


def check_positions(preset: Preset, positions: int | None, model: str) -> None:
    """model.max_length against the positions a loaded model has (its config's max_position_embeddings)."""
    if positions is not None and preset.model.max_length > positions:
        raise BudgetReasonerError(f"preset {preset.name}: model.max_length must be <= {positions} (the positions of "
                                  f"{model}), got {preset.model.max_length}")


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def resolve_preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise BudgetReasonerError(f"preset file not found: {path}")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise BudgetReasonerError(
            f"unknown preset {str(name_or_path)!r}; choose one of {', '.join(available_presets())} or pass a .yaml file"
        )
    return candidate


def load_preset(name_or_path: str | Path = "cpu-tiny", overrides: dict[str, Any] | None = None) -> Preset:
    """Load a preset by name (`presets/NAME.yaml`) or path, then apply dotted overrides like {"sft.max_steps": 5}."""
    path = resolve_preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BudgetReasonerError(f"{path}:{where} is not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(raw, dict):
        raise BudgetReasonerError(f"{path}: a preset must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, str(path))
    domains = raw.get("domains") or {}
    if not isinstance(domains, dict) or not all(isinstance(entry, dict) for entry in domains.values()):
        raise BudgetReasonerError(f"{path}: domains must map a domain's name to its settings, e.g. "
                                  f"{{logic: {{sft.max_steps: 2400}}}}, got {domains!r}")
    for entry in domains.values():  # what --set names wins over a domain's entry
        for dotted in overrides or {}:
            entry.pop(dotted, None)
    source = _Source(str(path), frozenset(overrides or ()))
    preset = _build(Preset, raw, source, "")
    _check_cross_rules(preset, source)
    for domain in domains:  # a typo in a domain's entry is one line now, not when that domain runs
        for_domain(preset, domain, str(path))
    return preset


def _check_cross_rules(preset: Preset, source: _Source) -> None:
    for key, ok, allowed in CROSS_RULES:
        if not ok(preset):
            raise BudgetReasonerError(f"{source.where(key)}: {key} must be {allowed}, got {_lookup(preset, key)!r}")


def for_domain(preset: Preset, domain: str, file: str | None = None) -> Preset:
    """`preset` with its `domains` entry for `domain` applied (checked like the file's own values) and the per-domain
    entries dropped: what a run of that domain uses, and fingerprints. `file` names the preset in errors."""
    entry = preset.domains.get(domain) or {}
    if not preset.domains:
        return preset
    raw = preset.to_dict()
    raw["domains"] = {}
    where = f"{file or 'preset ' + preset.name} (domains.{domain})"
    for dotted, value in entry.items():
        _set_dotted(raw, str(dotted), value, where)
    source = _Source(where, frozenset())
    applied = _build(Preset, raw, source, "")
    _check_cross_rules(applied, source)
    return applied


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` strings to {"KEY": value}, each value read as YAML (so 5 is an int, [a, b] a list)."""
    parsed = {}
    for item in items or []:
        key, separator, text = item.partition("=")
        key = key.strip()
        if not separator or not key or "" in key.split("."):
            raise BudgetReasonerError(f"--set {item!r}: expected KEY=VALUE, e.g. sft.max_steps=50")
        try:
            parsed[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise BudgetReasonerError(f"--set {item!r}: {text!r} is not a valid value "
                                      f"({getattr(error, 'problem', None) or 'YAML syntax'}; quote it to pass a string)") from None
    return parsed


@dataclass(frozen=True)
class _Source:
    """Where values came from, for errors: the preset file, and which dotted keys an override set."""

    path: str
    overridden: frozenset[str]

    def where(self, key: str) -> str:
        parts = key.split("[")[0].split(".")
        overridden = any(".".join(parts[:i]) in self.overridden for i in range(1, len(parts) + 1))
        return f"{self.path} (overridden: {key})" if overridden else self.path


def _lookup(preset: Preset, dotted: str) -> Any:
    value: Any = preset
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, key in enumerate(parents):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise BudgetReasonerError(f"{source}: cannot set {dotted}: {'.'.join(parents[: depth + 1])} is a value "
                                      f"({node!r}), not a section")
    node[leaf] = value


def _build(cls: type, raw: dict, source: _Source, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise BudgetReasonerError(f"{source.where(prefix + str(key))}: unknown key {prefix + str(key)!r} "
                                      f"(known: {', '.join(sorted(known))})")
    values = {key: _coerce(hints[key], value, source, prefix + key) for key, value in raw.items()}
    rules = _rules_for(cls)
    for key, value in values.items():
        rule = rules.get(key)
        if rule is not None and not rule.ok(value):
            raise BudgetReasonerError(f"{source.where(prefix + key)}: {prefix + key} must be {rule.allowed}, got {value!r}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: _Source, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BudgetReasonerError(f"{source.where(key)}: {key} must be a mapping, got {value!r}")
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise BudgetReasonerError(
                f"{source.where(key)}: {key} must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise BudgetReasonerError(f"{source.where(key)}: {key} must be a list, got {value!r}")
        return [_coerce(item_type, item, source, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 2e-3 as a string; accept it as the float it means
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise BudgetReasonerError(f"{source.where(key)}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
