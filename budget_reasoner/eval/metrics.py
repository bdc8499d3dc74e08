"""Metrics over k samples per problem: pass@k (unbiased), maj@k (self-consistency), best-of-N."""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Callable, Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Chen et al. (2021): the chance that at least one of k samples drawn from n (c correct) is correct."""
    if not 0 < k <= num_samples:
        raise ValueError(f"k must be in 1..{num_samples}, got {k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer among samples (ties: the first seen); samples without an answer do not vote."""
    counts = Counter(answer for answer in answers if answer is not None)
    return counts.most_common(1)[0][0] if counts else None


def best_of_n(completions: Sequence[str], scores: Sequence[float]) -> str:
    """The completion with the highest score (a verifier's, a reward model's, or the model's own log-prob)."""
    if len(completions) != len(scores) or not completions:
        raise ValueError("best_of_n needs one score per completion, and at least one completion")
    return completions[max(range(len(scores)), key=scores.__getitem__)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def accuracy_curve(per_problem: Sequence[Sequence[str | None]], references: Sequence[str],
                   is_correct: Callable[[str | None, str], bool], budgets: Sequence[int]) -> dict[int, float]:
    """maj@k accuracy for each k in `budgets`, voting over each problem's first k samples."""
    return {k: mean([is_correct(majority_vote(samples[:k]), ref) for samples, ref in zip(per_problem, references)])
            for k in budgets}


def tokens_curve(per_problem_tokens: Sequence[Sequence[int]], budgets: Sequence[int]) -> dict[int, float]:
    """Generated tokens per problem for each k in `budgets`: the mean over problems of its first k samples' tokens."""
    return {k: mean([sum(tokens[:k]) for tokens in per_problem_tokens]) for k in budgets}
