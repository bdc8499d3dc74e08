"""Fused vs unfused SFT loss under the precisions training uses, on the device: bf16 autocast, and fp16 autocast with a
GradScaler (the T4 path). tests/test_fused_precision.py asserts the same comparison on the CPU; this runs it where
the Triton kernel and cuBLAS do the work.

    python benchmarks/fused_precision.py [--device cuda] [--write fused_precision]

Models (random weights, LoRA r=4 with nonzero B so every adapter gradient is compared):
- a tiny Gemma-2-style model with final-logit softcapping (vocab 256), 256 x 129 tokens (~30.5k label tokens: an
  fp16 gradient divided by N before the scaler's factor would underflow);
- a 2-layer model with Qwen2.5-0.5B's LM head (hidden 896, vocab 151,936), 4 x 1,025 tokens.
The reference is the model's own forward (full logits), through the same autocast wrapper accelerate puts on the
forward (`torch.autocast` inside `convert_outputs_to_fp32`); for fp16 the loss is scaled by 2^16 and the gradients
unscaled, as the Trainer's GradScaler does. Reported: the loss's relative difference and the worst LoRA gradient's
relative (L2) difference, per backend (torch; triton on CUDA).
"""

import argparse
import copy
import sys
import types
from pathlib import Path


def gemma2_tiny_softcap():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=64,
        final_logit_softcapping=2.0, attn_logit_softcapping=50.0, attn_implementation="eager"))
    with torch.no_grad():
        gemma.get_output_embeddings().weight.normal_(std=0.3)
    return gemma


def qwen_head_2_layers():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation="sdpa"))


MODELS = {"gemma2-tiny-softcap": (gemma2_tiny_softcap, 256, 129), "qwen2.5-0.5b-head-2-layers": (qwen_head_2_layers, 4, 1025)}


def batch(vocab, rows, length, device, prompt=8, seed=1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length // 2:] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {k: v.to(device) for k, v in {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()}


def with_lora(model):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def wrap(model, device, dtype):
    """What accelerate's prepare_model does to the forward under native AMP."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32

    forward = torch.autocast(device, dtype=dtype)(model.forward.__func__)
    model.forward = types.MethodType(convert_outputs_to_fp32(forward), model)
    return model


def compare(model, inputs, device, dtype, scale, backend):
    import torch

    from budget_reasoner.kernels.patch import add_fused_loss, fused_causal_lm_loss

    results = []
    for fused in (False, True):
        twin = copy.deepcopy(model)
        if fused:
            add_fused_loss(twin)
        twin = wrap(twin, device, dtype)
        loss = fused_causal_lm_loss(twin, inputs, backend=backend) if fused else twin(**inputs).loss
        scaler = torch.amp.GradScaler(device, init_scale=scale, enabled=scale != 1.0)
        scaler.scale(loss).backward()
        grads = {n: p.grad.detach().float() / scale for n, p in twin.named_parameters() if p.requires_grad}
        results.append((loss.detach().float(), grads))
        del twin
    (loss_ref, grads_ref), (loss, grads) = results
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
    return {"loss_unfused": loss_ref.item(), "loss_fused": loss.item(), "loss_rel_diff": abs(loss.item() / loss_ref.item() - 1),
            "worst_grad_rel_diff": max(rel(grads[n], grads_ref[n]) for n in grads_ref), "grads_finite": finite}


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both (on the CPU only the tiny Gemma 2: the other is slow)")
    parser.add_argument("--write", metavar="NAME", help="save the rows as benchmarks/results/<machine>/NAME.json")
    args = parser.parse_args()
    device = args.device
    chosen = args.models or (list(MODELS) if device == "cuda" else ["gemma2-tiny-softcap"])
    backends = ["torch", "triton"] if device == "cuda" else ["torch"]
    rows = []
    print(f"{'model':<28} {'precision':<18} {'backend':<7} {'loss rel diff':>14} {'worst grad rel diff':>20}")
    for name in chosen:
        build, rows_, length = MODELS[name]
        model = build()
        for precision, dtype, scale in (("bf16", torch.bfloat16, 1.0), ("fp16+GradScaler", torch.float16, 2.0**16)):
            base = model.to(dtype) if precision.startswith("fp16") else model  # fp16 base as Unsloth loads a T4 model
            lora = with_lora(copy.deepcopy(base)).to(device)
            inputs = batch(lora.config.vocab_size, rows_, length, device)
            for backend in backends:
                row = {"model": name, "precision": precision, "backend": backend, "device": device,
                       **compare(lora, inputs, device, dtype, scale, backend)}
                rows.append(row)
                print(f"{name:<28} {precision:<18} {backend:<7} {row['loss_rel_diff']:>14.2e} {row['worst_grad_rel_diff']:>20.2e}"
                      f"{'' if row['grads_finite'] else '  NON-FINITE'}", flush=True)
            del lora
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import write_result

        print(f"wrote {write_result(args.write, {'rows': rows})}")


if __name__ == "__main__":
    main()
