"""Dedup and decontamination of training problems.

A held-out score means something only if no training problem is an evaluation problem in disguise. A
training problem is dropped when it shares a 13-token n-gram with any reference question (the test
that GPT-3's and Llama's contamination studies use), or, for questions shorter than that, when the
whole normalized question is equal. Tokens are lowercased words and single punctuation or operator
characters, so "3+4*2" and "3-4*2" stay different problems while spacing and case do not matter.
"""

from __future__ import annotations

import re

NGRAM = 13


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The text's n-grams of tokens; a text shorter than n is its own single gram."""
    words = tokens(text)
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def deduplicate(problems: list[dict]) -> tuple[list[dict], int]:
    """The problems without repeats of a question (normalized), first kept; and how many were dropped."""
    seen, kept = set(), []
    for problem in problems:
        key = tuple(tokens(problem["question"]))
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept, len(problems) - len(kept)


def decontaminate(problems: list[dict], references: dict[str, list[str]], n: int = NGRAM) -> tuple[list[dict], dict[str, int]]:
    """Drop the problems that overlap a reference question; returns the kept ones and the drops per reference set."""
    owner: dict[tuple[str, ...], str] = {}
    for name, questions in references.items():
        for question in questions:
            for gram in ngrams(question, n):
                owner.setdefault(gram, name)
    kept, removed = [], {name: 0 for name in references}
    for problem in problems:
        hit = next((owner[gram] for gram in ngrams(problem["question"], n) if gram in owner), None)
        if hit is None:
            kept.append(problem)
        else:
            removed[hit] += 1
    return kept, removed
