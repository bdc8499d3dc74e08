"""The chain format every stage writes and every verifier reads: reasoning between `<think>` and `</think>`, then
the final answer as `\\boxed{...}`. One definition, shared by all domains."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def format_chain(steps, answer: str) -> str:
    """A worked chain: one step per line inside the thought, then the boxed answer."""
    return f"{THINK_OPEN}\n" + "".join(step + "\n" for step in steps) + f"{THINK_CLOSE}\n\\boxed{{{answer}}}"


def format_direct(answer: str) -> str:
    """An answer with an empty thought: how the offline student base is taught to reply."""
    return format_chain([], answer)
