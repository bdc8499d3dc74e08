"""The export gate: before an export is declared done, the checkpoint on disk must behave like the stage it came from.

Two models answer the same held-out problems: the *reference* is the stage as it trained and was evaluated (its
base loaded by the stage's own loader, 4-bit when the stage was, with the adapter on top, unmerged), the *export*
is the merged folder loaded with plain transformers, its own tokenizer and chat template. Compared:

- greedy answers on a sample of held-out problems (identical completions, and equal final answers);
- the mean token log-likelihood of the same completions (the stage's own eval completions when the run has them,
  else the reference's greedy ones) under each model: its difference, averaged over the sample, must be within
  the tolerance (`thresholds`, nats per token).

A wrong base (the 16-bit original under an adapter trained on NF4), a template that renders prompts differently,
or a lost tokenizer token shows up in both. The result goes into the export's export.json.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.progress import progress_bar
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.local import generate_texts, prompt_texts
from budget_reasoner.verify import extract


def thresholds(dtype: str, reference_in_4bit: bool) -> tuple[float, float]:
    """(tolerance on the mean |log-likelihood difference| in nats/token, least fraction of equal greedy answers).

    Measured on the cpu-tiny student over 50 held-out problems (benchmarks/export.py, README "Take the model
    home"): an fp32 merge against an fp32 reference differs by ~5e-8 only (the same sums in another order) and
    answers the same everywhere, so it must; a bf16 export (6.6e-4), or a reference in 4-bit, whose bitsandbytes
    kernels round on their own (fp32 export 5.9e-4, bf16 1.9e-3, 47/50 answers), get 5e-3 and 90%. A QLoRA adapter
    merged into the original weights instead of the NF4 ones it trained against differed by 1.0e-2 and kept 28 and
    33 of 50 answers: it fails both."""
    if dtype == "fp32" and not reference_in_4bit:
        return 1e-3, 1.0
    return 5e-3, 0.9


@dataclass
class GateResult:
    problems: int
    identical_completions: int
    equal_answers: int
    min_answer_agreement: float
    mean_loglik_diff: float  # |mean token log-lik (export) - (reference)|, averaged over the sample, nats/token
    max_loglik_diff: float  # its largest value on one completion
    tolerance: float  # on mean_loglik_diff
    completions_from: str  # "the stage's eval" or "the reference's greedy answers"
    passed: bool

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"export gate {verdict}: {self.equal_answers}/{self.problems} greedy answers equal "
                f"({self.identical_completions} identical completions; at least {self.min_answer_agreement:.0%} needed), "
                f"token log-likelihood differs by {self.mean_loglik_diff:.2g} nats/token on average (tolerance "
                f"{self.tolerance:g}; at most {self.max_loglik_diff:.2g})")

    def to_dict(self) -> dict:
        return asdict(self)


def gate_sample(eval_rows: list[dict], problems: list[dict], size: int, seed: int) -> list[dict]:
    """Up to `size` problems (seeded): the stage's eval rows (problem + its own completion) when there are any."""
    rows = eval_rows or problems
    if not rows:
        raise BudgetReasonerError("the export gate needs held-out problems: export a stage of a run folder (its eval "
                                  "or data/problems/held_out.jsonl), or pass --problems FILE")
    return random.Random(seed).sample(rows, min(size, len(rows)))


def run_gate(reference, exported, sample: list[dict], preset, domain: str, dtype: str,
             min_answer_agreement: float | None = None, tolerance: float | None = None) -> GateResult:
    """Compare `reference` and `exported`, each a (model, tokenizer) pair, on `sample` (see the module docstring);
    thresholds left None are `thresholds(dtype, the preset loads the reference in 4-bit)`."""
    default_tolerance, default_agreement = thresholds(dtype, preset.quantization.load_in_4bit)
    tolerance = default_tolerance if tolerance is None else tolerance
    min_answer_agreement = default_agreement if min_answer_agreement is None else min_answer_agreement
    prompts = [chat_prompt(row["question"], preset.generate.instruction) for row in sample]
    answers = {}
    for label, (model, tokenizer) in (("reference", reference), ("export", exported)):
        generated = generate_texts(model, tokenizer, prompt_texts(tokenizer, prompts), preset.eval.max_new_tokens,
                                   preset.eval.batch_size, description=f"gate: {label} greedy")
        answers[label] = [g[0].text for g in generated]
    from_eval = all("completion" in row for row in sample)
    completions = [row["completion"] for row in sample] if from_eval else answers["reference"]
    logliks = {label: mean_token_logliks(model, tokenizer, prompt_texts(tokenizer, prompts), completions, label)
               for label, (model, tokenizer) in (("reference", reference), ("export", exported))}
    diffs = [abs(a - b) for a, b in zip(logliks["export"], logliks["reference"])]
    identical = sum(a == b for a, b in zip(answers["export"], answers["reference"]))
    equal = sum(extract(domain, a) == extract(domain, b) for a, b in zip(answers["export"], answers["reference"]))
    mean_diff = sum(diffs) / len(diffs)
    passed = mean_diff <= tolerance and equal >= min_answer_agreement * len(sample)
    return GateResult(len(sample), identical, equal, min_answer_agreement, mean_diff, max(diffs), tolerance,
                      "the stage's eval" if from_eval else "the reference's greedy answers", passed)


@torch.no_grad()
def mean_token_logliks(model, tokenizer, prompts: list[str], completions: list[str], label: str = "") -> list[float]:
    """Each completion's mean log-probability per token (its end-of-turn token included) after its prompt, as
    training encoded them: prompt and completion tokenized apart. One sequence at a time: the logits of a real
    vocabulary (152k) over a long chain are the memory here, not the weights."""
    device = next(model.parameters()).device
    values = []
    with progress_bar() as bar:
        task = bar.add_task(f"gate: {label} log-likelihood", total=len(prompts))
        for prompt, completion in zip(prompts, completions):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + completion_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
            targets = ids[0, len(prompt_ids):]
            logprobs = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)
            values.append(logprobs.mean().item())
            bar.advance(task)
    return values
