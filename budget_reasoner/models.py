"""Load a model and tokenizer for the current backend, and build the offline tiny ones.

Real models are hub ids or local paths, loaded with transformers (4-bit through bitsandbytes when the
preset asks); training on the Unsloth backend loads through Unsloth instead (`train/common.py`). With no hub to download from, the offline world
builds its own: a byte-level BPE tokenizer trained on domain text (digits kept single, a ChatML template
with `<think>`) and Qwen2 models from a config, so the code path is the same one that loads Qwen2.5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from budget_reasoner.config import Preset, TinyModelConfig, check_positions
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware

log = logging.getLogger(__name__)

TINY_MODELS = ("tiny-student", "tiny-teacher")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # ordinary added tokens: they stay in decoded text for the verifier


def build_tokenizer(corpus: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (offline, deterministic). Digits stay single tokens so arithmetic is learnable."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, shape: TinyModelConfig, max_positions: int, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialized Qwen2 of the given shape, sized to the tokenizer."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_scripted_model(tokenizer: PreTrainedTokenizerFast, completion: str) -> Qwen2ForCausalLM:
    """A Qwen2 that answers `completion`, then its stop token, to any chat prompt: for testing what serves or samples
    a model (a real server, a resumed run) where training one that answers something checkable would take minutes.

    Every layer's output projections are zero, so each position sees only its own token's embedding; the untied LM
    head is a bigram table that maps the generation prompt's last token to the completion's first, each completion
    token to the next, the last to the stop token, with a margin of ~100 logits (greedy or sampled alike). So each
    of those tokens may appear only once."""
    generation_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1"}], add_generation_prompt=True,
                                                      tokenize=False)
    script = [tokenizer(generation_prompt, add_special_tokens=False)["input_ids"][-1],
              *tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(set(script[:-1])) < len(script) - 1:
        raise BudgetReasonerError(f"a scripted model needs each token of {completion!r} once (and not the prompt's last)")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is the token's own embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        for current, following in zip(script, script[1:]):
            model.lm_head.weight[following] = 20 * embeddings[current] / embeddings[current].norm()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(preset: Preset, hardware: Hardware) -> torch.dtype:
    """The dtype a base model loads in: the precision plan's compute dtype (fp32 on the CPU; plan.py says why), so
    the loader, the Trainer's autocast flags and the estimator read one rule."""
    from budget_reasoner.plan import training_plan

    return getattr(torch, training_plan(preset, hardware).compute_dtype)


def attn_implementation(attention: str) -> str:
    """A preset's `model.attention` as transformers' `attn_implementation`: budget_flash is our fused kernel,
    registered with transformers' attention interface under a name of its own."""
    if attention == "budget_flash":
        from budget_reasoner.kernels.attention import register_attention

        return register_attention()
    return attention


def load_model(name_or_path: str | Path, preset: Preset, hardware: Hardware, quantize: bool | None = None):
    """Load a causal LM with transformers (4-bit when the preset asks): inference, teachers, and training off Unsloth."""
    quantize = preset.quantization.load_in_4bit if quantize is None else quantize
    dtype = torch_dtype(preset, hardware)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation(preset.model.attention)}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=getattr(torch, preset.quantization.quant_storage),
        )
        # each data-parallel process loads its replica onto its own GPU (LOCAL_RANK, set by torchrun / accelerate)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if hardware.device == "cuda" else "cpu"
    try:
        # before the weights: a preset whose max_length the model cannot hold fails in seconds, not after the load
        positions = getattr(AutoConfig.from_pretrained(str(name_or_path)), "max_position_embeddings", None)
        check_positions(preset, positions, str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except OSError as error:
        raise BudgetReasonerError(f"cannot load model {str(name_or_path)!r}: {str(error).splitlines()[0]}") from None
    if not quantize and hardware.device == "cuda":
        model = model.to("cuda")
    return model


def describe_precision(preset: Preset, hardware: Hardware) -> str:
    """The line every training stage logs, so nobody wonders whether 4-bit was really used."""
    if preset.quantization.load_in_4bit:
        return f"QLoRA: NF4 4-bit base weights (bitsandbytes) + {torch_dtype(preset, hardware)} LoRA on {hardware.device}"
    return f"LoRA on a {torch_dtype(preset, hardware)} base on {hardware.device} (4-bit off in preset {preset.name})"
