"""Sampling is what our settings say: a checkpoint's generation_config.json does not leak into generate().

Two folders hold the same tiny model; one also ships a generation_config.json that sets every knob it can
(Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8; this one is extreme so a leak shows).
Greedy and seeded sampling must give the same tokens and log-probs from both, and those must equal a plain
reference computed from the logits by hand.
"""

import json

import pytest
import torch

from budget_reasoner.config import TinyModelConfig
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.local import generate_texts, prompt_texts
from budget_reasoner.models import build_tiny_model, build_tokenizer

LEAKY = {
    "do_sample": True, "temperature": 0.05, "top_k": 1, "top_p": 0.1, "min_p": 0.9, "typical_p": 0.2,
    "repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_new_tokens": 6, "min_length": 40,
    "epsilon_cutoff": 0.3, "eta_cutoff": 0.3, "num_beams": 2, "renormalize_logits": True,
    "suppress_tokens": [5, 6, 7], "begin_suppress_tokens": [8, 9], "bad_words_ids": [[10], [11]],
    "sequence_bias": [[[12], -50.0]], "forced_eos_token_id": 13, "exponential_decay_length_penalty": [2, 3.0],
    "max_new_tokens": 3, "output_scores": True, "return_dict_in_generate": True,
}
CORPUS = ["3+4*2=11", "(12+7)*3-5=52", "9*2=18", "17-3+8*2=30", "<think>\n3+4=7\n</think>\n\\boxed{7}"] * 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    model = build_tiny_model(tokenizer, TinyModelConfig(32, 2, 2, 1, 64), max_positions=256, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: varied, non-repeating text (a fresh toy model repeats one token)
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    for name in ("plain", "leaky"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    config_path = root / "leaky" / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **LEAKY}))
    loaded = {name: AutoModelForCausalLM.from_pretrained(root / name).eval() for name in ("plain", "leaky")}
    assert loaded["leaky"].generation_config.repetition_penalty == 5.0  # the leak is really there to be stopped
    return loaded, AutoTokenizer.from_pretrained(root / "plain")


def _run(model, tokenizer, temperature, samples):
    texts = prompt_texts(tokenizer, [chat_prompt(q) for q in ("3+4", "(12+7)*3-5", "9*2")])
    return generate_texts(model, tokenizer, texts, 10, batch_size=8, temperature=temperature, num_samples=samples, seed=5)


def _greedy_by_hand(model, tokenizer, text, max_new_tokens):
    """Argmax decoding with a full forward per step (no cache, no padding, no generate()): text, tokens, mean log-prob."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new, logprobs = [], []
    with torch.no_grad():
        while len(new) < max_new_tokens:
            step = model(torch.tensor([ids + new])).logits[0, -1].float().log_softmax(-1)
            new.append(int(step.argmax()))
            logprobs.append(step.max().item())
            if new[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True), len(new), sum(logprobs) / len(logprobs)


@pytest.mark.parametrize("temperature, samples", [(0.0, 1), (1.0, 3), (0.7, 2)])
def test_a_shipped_generation_config_changes_nothing(folders, temperature, samples):
    models, tokenizer = folders
    plain = _run(models["plain"], tokenizer, temperature, samples)
    leaky = _run(models["leaky"], tokenizer, temperature, samples)
    assert [[(g.text, g.tokens) for g in row] for row in leaky] == [[(g.text, g.tokens) for g in row] for row in plain]
    assert [[g.mean_logprob for g in row] for row in leaky] == [[g.mean_logprob for g in row] for row in plain]
    assert models["leaky"].generation_config.repetition_penalty == 5.0  # put back after each call

    if temperature == 0:  # ... and greedy is what the model's own argmax says, by hand, one prompt at a time
        texts = prompt_texts(tokenizer, [chat_prompt(q) for q in ("3+4", "(12+7)*3-5", "9*2")])
        for text, (sample,) in zip(texts, plain):
            assert (sample.text, sample.tokens) == pytest.approx(_greedy_by_hand(models["plain"], tokenizer, text, 10)[:2])
            assert sample.mean_logprob == pytest.approx(_greedy_by_hand(models["plain"], tokenizer, text, 10)[2], abs=1e-4)
        assert max(sample.tokens for (sample,) in plain) > 3  # longer than the leaky max_new_tokens: our length wins


def test_sampling_with_the_leak_would_differ(folders):
    """The check above can fail: the same call with the checkpoint's defaults let through gives other tokens."""
    models, tokenizer = folders
    texts = prompt_texts(tokenizer, [chat_prompt("3+4")])
    batch = tokenizer(texts, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ours = generate_texts(models["plain"], tokenizer, texts, 10, batch_size=8)[0][0]
        leaked = models["leaky"].generate(**batch, max_new_tokens=10, do_sample=False, num_beams=1,
                                          pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=False)
    assert tokenizer.decode(leaked[0, batch["input_ids"].shape[1]:], skip_special_tokens=True) != ours.text
