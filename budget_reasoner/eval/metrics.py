"""Metrics over k samples per problem: pass@k (unbiased), maj@k (self-consistency), best-of-N.

Majority vote is by meaning: answers the domain's grader treats as equal (`0.5`, `1/2`, `\\frac12`) vote
together, and the vote is correct exactly when grading its first member's completion is. That way pass@k,
maj@k and best-of-N agree on what a correct sample is; a completion the grader refuses (hedging over
several boxes, no answer) does not vote.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence

from budget_reasoner import verify


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Chen et al. (2021): the chance that at least one of k samples drawn from n (c correct) is correct."""
    if not 0 < k <= num_samples:
        raise ValueError(f"k must be in 1..{num_samples}, got {k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer string among samples (ties: the first seen); samples without an answer do not vote.

    Votes by spelling only; `majority` votes by meaning."""
    counts = Counter(answer for answer in answers if answer is not None)
    return counts.most_common(1)[0][0] if counts else None


def cluster_answers(answers: Sequence[str | None], equal: Callable[[str, str], bool],
                    correct: Sequence[bool] | None = None) -> list[int | None]:
    """A cluster id per answer (None for no answer), numbered in order of first appearance.

    An answer joins the first cluster whose first member it is `equal` to (`equal(answer, first)`), so the
    clusters of a prefix of the samples are those of all samples cut to that prefix. The same spelling is
    looked up, not compared. With `correct` (each answer's verdict against the reference), correct answers
    are one cluster without comparing (each equals the reference) and never share one with a wrong answer,
    so only wrong answers are compared with each other."""
    ids: list[int | None] = []
    firsts: list[str] = []  # each cluster's first answer
    cluster_correct: list[bool] = []
    by_spelling: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            ids.append(None)
            continue
        right = bool(correct[index]) if correct is not None else None
        found = by_spelling.get(answer)
        if found is None:
            for cluster, first in enumerate(firsts):
                if right is not None:
                    if right != cluster_correct[cluster]:
                        continue  # a correct and a wrong answer never mean the same
                    if right:
                        found = cluster  # correct answers all mean the reference
                        break
                if equal(answer, first):
                    found = cluster
                    break
        if found is None:
            found = len(firsts)
            firsts.append(answer)
            cluster_correct.append(bool(right))
        by_spelling.setdefault(answer, found)
        ids.append(found)
    return ids


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the winning cluster's first answer, as extracted
    count: int  # samples in the winning cluster
    correct: bool  # the verdict on the winning cluster's first completion
    tally: dict[str, int]  # each cluster's first answer -> its votes, most votes first


def vote(answers: Sequence[str | None], clusters: Sequence[int | None], correct: Sequence[bool],
         k: int | None = None) -> Vote:
    """The majority over the first k samples (all by default); ties go to the cluster seen first."""
    k = len(answers) if k is None else k
    counts = Counter(cluster for cluster in clusters[:k] if cluster is not None)
    if not counts:
        return Vote(None, 0, False, {})
    firsts = {cluster: clusters.index(cluster) for cluster in counts}  # each cluster's first sample
    winner = min(counts, key=lambda cluster: (-counts[cluster], cluster))
    tally = {answers[firsts[c]]: counts[c] for c in sorted(counts, key=lambda c: (-counts[c], c))}
    return Vote(answers[firsts[winner]], counts[winner], bool(correct[firsts[winner]]), tally)


def majority(domain: str, completions: Sequence[str], reference) -> Vote:
    """Majority vote by meaning over completions, graded against `reference`."""
    answers = [verify.ballot(domain, completion) for completion in completions]
    correct = [answer is not None and verify.check(domain, completion, reference)
               for answer, completion in zip(answers, completions)]
    clusters = cluster_answers(answers, lambda a, b: verify.equivalent(domain, a, b), correct)
    return vote(answers, clusters, correct)


def majority_correct(domain: str, completions: Sequence[str], reference) -> bool:
    """maj@k for one problem: is the answer most completions agree on (by meaning) correct?"""
    return majority(domain, completions, reference).correct


def best_of_n(completions: Sequence[str], scores: Sequence[float]) -> str:
    """The completion with the highest score (a verifier's, a reward model's, or the model's own log-prob)."""
    if len(completions) != len(scores) or not completions:
        raise ValueError("best_of_n needs one score per completion, and at least one completion")
    return completions[max(range(len(scores)), key=scores.__getitem__)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def accuracy_curve(per_problem_answers: Sequence[Sequence[str | None]], per_problem_clusters: Sequence[Sequence[int | None]],
                   per_problem_correct: Sequence[Sequence[bool]], budgets: Sequence[int]) -> dict[int, float]:
    """maj@k accuracy for each k in `budgets`, voting (by `cluster_answers` clusters) over each problem's first k samples."""
    problems = list(zip(per_problem_answers, per_problem_clusters, per_problem_correct))
    return {k: mean([vote(answers, clusters, correct, k).correct for answers, clusters, correct in problems])
            for k in budgets}


def tokens_curve(per_problem_tokens: Sequence[Sequence[int]], budgets: Sequence[int]) -> dict[int, float]:
    """Generated tokens per problem for each k in `budgets`: the mean over problems of its first k samples' tokens."""
    return {k: mean([sum(tokens[:k]) for tokens in per_problem_tokens]) for k in budgets}
