"""Sampling from a local model on the transformers backend: left padding, KV cache, many prompts per forward,
prompts batched by length. Each completion carries its token count and its mean token log-prob (the score
best-of-N ranks by)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from budget_reasoner.progress import progress_bar
from budget_reasoner.sampling import Generated

class ChosenTokenLogprobs(LogitsProcessor):
    """A logits processor that keeps the log-prob of each generated token under the sampling distribution.

    `output_scores=True` would keep every step's tokens x vocab scores until generation ends (64 sequences x
    1,024 steps x a 152k vocabulary is 40 GB); this keeps one float per token. At step t it holds the
    log-softmax of step t's scores; at step t+1 `input_ids` ends with the token drawn from them. Custom
    processors run before transformers' temperature warper, so the temperature is applied here.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0  # greedy: the model's own distribution
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Log-probs of the generated tokens (sequences x steps), the last step's included."""
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
            self.previous = None
        return torch.stack(self.chosen, 1)


class TextStop(StoppingCriteria):
    """Ends a row once `done(the text it generated)` holds: a tool call's closing fence (tools.py), which no token
    id marks. Each row's text grows by its newest token, decoded alone (special tokens, the padding of finished
    rows among them, add nothing); `done` is asked only when that token holds a newline, as a fence line ends in
    one. `lengths` are then the tokens each row generated up to and including the one that made `done` true."""

    def __init__(self, tokenizer, prompt_length: int, done: Callable[[str], bool]):
        self.tokenizer, self.prompt_length, self.done = tokenizer, prompt_length, done
        self.texts: list[str] = []
        self.stopped_at: list[int | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.texts:
            self.texts, self.stopped_at = [""] * input_ids.shape[0], [None] * input_ids.shape[0]
        step = input_ids.shape[1] - self.prompt_length
        pieces = self.tokenizer.batch_decode(input_ids[:, -1:], skip_special_tokens=True)
        for row, piece in enumerate(pieces):
            if self.stopped_at[row] is None and piece:
                self.texts[row] += piece
                if "\n" in piece and self.done(self.texts[row]):
                    self.stopped_at[row] = step
        return torch.tensor([at is not None for at in self.stopped_at], device=input_ids.device)

    def lengths(self, generated: int, device) -> torch.Tensor:
        """Per row: where it stopped, or `generated` (all it has) when it did not stop here."""
        return torch.tensor([generated if at is None else at for at in self.stopped_at] or [generated], device=device)


def sampling_config(tokenizer, max_new_tokens: int, temperature: float, num_samples: int, stops: list[int]) -> GenerationConfig:
    """The whole generation config, from our settings only: greedy at temperature 0, else plain sampling from the
    model's distribution at that temperature (no top-k, top-p, min-p or penalties), one beam, tensors out.

    Every field that changes which token comes next is set to its neutral value here, so that a checkpoint's
    `generation_config.json` (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8) cannot turn
    'greedy' into something else or skew the log-probs best-of-N ranks by.
    """
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0} if temperature > 0 else {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_return_sequences=num_samples, num_beams=1,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        length_penalty=1.0, guidance_scale=1.0, renormalize_logits=False, remove_invalid_values=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, use_cache=True,
        output_scores=False, output_logits=False, return_dict_in_generate=False, **sampling,
    )


@contextmanager
def checkpoint_defaults_off(model):
    """Hide the checkpoint's `generation_config` for the length of a generate() call.

    transformers (5.x, `_prepare_generation_config`) fills every field of the config we pass that is still None
    from `model.generation_config`; some fields have no neutral value but None (bad_words_ids, suppress_tokens,
    sequence_bias, forced_eos_token_id, top_h, max_time, ...), so passing a full config is not enough on its own.
    With a blank one in its place only transformers' global defaults fill the gaps. PEFT and similar wrappers
    forward to the transformers model underneath, which is the one generate() reads.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                   num_samples: int = 1, seed: int = 0, stop_ids: list[int] | None = None,
                   description: str = "generate", stop_when: Callable[[str], bool] | None = None) -> list[list[Generated]]:
    """`num_samples` continuations of each raw text (greedy when temperature is 0), in the input order.

    Batched by length: the texts are sorted by their token count, so a batch holds prompts of about one length and
    pads (and attends over padding) little, then the results are put back in input order. Special tokens are
    dropped from the output. `stop_when(text)` also ends a row, once its generated text makes it true (TextStop).
    """
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    results: list[list[Generated]] = [[] for _ in texts]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    prompts_per_batch = max(1, batch_size // num_samples)
    stops = [tokenizer.eos_token_id, *(stop_ids or [])]
    config = sampling_config(tokenizer, max_new_tokens, temperature, num_samples, stops)
    try:
        with progress_bar() as bar:
            task = bar.add_task(description, total=len(texts))
            for start in range(0, len(order), prompts_per_batch):
                chunk = order[start : start + prompts_per_batch]
                batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                recorder = ChosenTokenLogprobs(temperature)
                text_stop = TextStop(tokenizer, batch["input_ids"].shape[1], stop_when) if stop_when else None
                with checkpoint_defaults_off(model):
                    sequences = model.generate(**batch, generation_config=config, logits_processor=LogitsProcessorList([recorder]),
                                               stopping_criteria=StoppingCriteriaList([text_stop] if text_stop else []))
                new_tokens = sequences[:, batch["input_ids"].shape[1] :]
                logprobs = recorder.finish(sequences)
                # generated = up to and including the first stop token (padding follows it; the pad id may equal EOS)
                is_stop = torch.isin(new_tokens, torch.tensor(stops, device=device))
                counts = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new_tokens.shape[1])
                if text_stop is not None:
                    counts = torch.minimum(counts, text_stop.lengths(new_tokens.shape[1], device))
                generated = torch.arange(new_tokens.shape[1], device=device) < counts[:, None]
                means = (torch.where(generated, logprobs, 0.0).sum(1) / counts.clamp_min(1)).tolist()
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for offset, index in enumerate(chunk):
                    rows = range(offset * num_samples, (offset + 1) * num_samples)
                    results[index] = [Generated(decoded[r], means[r], int(counts[r]),
                                                token_ids=new_tokens[r, : counts[r]].tolist()) for r in rows]
                bar.advance(task, len(chunk))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results


def prompt_texts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
