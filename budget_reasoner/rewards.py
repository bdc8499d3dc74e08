"""Verifiable rewards for RL (GRPO): correctness from the domain's verifier, the chain format, an optional length penalty.

Each is a function in TRL's reward signature, `f(prompts, completions, **columns) -> list[float | None]`, called
once per generation batch with the dataset's columns (here `answer`) repeated per completion. The traps users of
TRL and Unsloth hit most, and what these do instead:
- a reference the verifier cannot parse would pay every completion 0 (or, with a lenient checker, 1), and the
  format reward would still pay its shape: every reward returns None for such a problem's samples, which TRL
  marks unscorable (advantage 0, out of the group's baseline), so it is never paid; it is counted;
- an empty or box-less answer scores 0 (the verifier's own verdict), and a chain that never closes `</think>` (cut
  off at the length limit) scores 0 even if a box appears inside the thinking;
- a format reward alone would teach the model to write empty chains with a box: it is small beside correctness
  (`grpo.format_weight`, default 0.1) and pays only the exact shape `<think> ... </think>` then one `\\boxed{}`;
- a reward function that raises or returns NaN for one completion must not end the run: the sample gets None
  and the count says how often;
- a completion missing any one reward (None, NaN, the verifier raised) is left out whole (`leave_out_unscored`):
  TRL would add up the rewards it has, so a format reward would pay a chain the verifier never graded;
- a group whose scored completions all earn the same reward has no advantage and teaches nothing: counted.
`RewardStats` keeps those counts; the stage logs them with its history (`counts/...` at every logged step) and
keeps them across a resume (saved with each checkpoint).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from budget_reasoner import verify
from budget_reasoner.domains.chain import THINK_CLOSE, THINK_OPEN
from budget_reasoner.verify.math import boxed_contents

CHAIN_SHAPE = re.compile(rf"^\s*{re.escape(THINK_OPEN)}(?P<thought>.*?){re.escape(THINK_CLOSE)}(?P<answer>.*)$", re.DOTALL)


@dataclass
class RewardStats:
    """How many completions each failure mode touched, over the whole stage."""

    completions: int = 0
    correct: int = 0
    unparseable_reference: int = 0  # no correctness reward: the reference cannot be graded against
    unclosed_think: int = 0  # the chain never closed </think>: correctness 0
    failed: int = 0  # the verifier raised or gave no verdict: the sample is left out
    left_out: int = 0  # completions some reward function could not score: no reward, advantage 0
    groups: int = 0  # groups of num_generations completions of one problem
    equal_reward_groups: int = 0  # groups whose scored completions all earned one reward (or fewer than two scored)
    by_function: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "by_function"}

    def log_fields(self) -> dict:
        """The counts as the trainer logs them beside its own metrics (cumulative over the stage)."""
        return {f"counts/{key}": value for key, value in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: dict) -> "RewardStats":
        known = {key: value for key, value in values.items() if key in cls.__dataclass_fields__}
        return cls(**known)


def leave_out_unscored(rewards_per_func, weights, group: int, stats: RewardStats):
    """TRL's rewards of one generation batch (completions x reward functions, NaN where a function gave None) with
    every row that misses any reward made all NaN: TRL leaves such a completion out of its group's baseline with
    advantage 0, where it would otherwise add up the rewards it has. Counts the rows left out, and the groups (of
    `group` consecutive completions: one problem's) whose scored completions' weighted totals are all equal."""
    import torch

    missing = torch.isnan(rewards_per_func).any(dim=1)
    rewards = rewards_per_func.clone()
    rewards[missing] = float("nan")
    stats.left_out += int(missing.sum())
    totals = (rewards * weights.to(rewards.device)).sum(dim=1).view(-1, group)  # NaN where left out
    for row in totals:
        scored = row[~torch.isnan(row)]
        stats.groups += 1
        stats.equal_reward_groups += int(scored.numel() < 2 or bool(torch.isclose(scored, scored[0]).all()))
    return rewards


def completion_text(completion) -> str:
    """TRL passes a conversational completion as a list of messages, a plain one as a string."""
    if isinstance(completion, list):
        return "".join(message.get("content") or "" for message in completion if isinstance(message, dict))
    return completion if isinstance(completion, str) else ""


def answer_part(text: str) -> str | None:
    """What follows `</think>` (the answer), or None when the chain never closed its thinking."""
    match = CHAIN_SHAPE.match(text)
    return match.group("answer") if match else None


def usable_reference(domain: str):
    """Whether the verifier can grade against a reference (probed once per reference)."""
    import functools

    @functools.lru_cache(maxsize=65536)
    def usable(reference) -> bool:
        try:
            return verify.grade(domain, "\\boxed{0}", reference).error is None
        except Exception:
            return False

    return lambda reference: usable(reference if isinstance(reference, str) else str(reference))


def correctness_reward(domain: str, stats: RewardStats):
    """1 when the verifier accepts the answer after `</think>`, else 0; None for an unusable reference."""

    def correctness(prompts, completions, answer, **_) -> list[float | None]:
        rewards = []
        for completion, reference in zip(completions, answer):
            stats.completions += 1
            answer_text = answer_part(completion_text(completion))
            if answer_text is None:
                stats.unclosed_think += 1
                rewards.append(0.0)
                continue
            try:
                verdict = verify.grade(domain, answer_text, reference)
            except Exception:  # a verifier bug must cost one sample, not the run
                stats.failed += 1
                rewards.append(None)
                continue
            if verdict.error is not None:
                stats.unparseable_reference += 1
                rewards.append(None)
                continue
            stats.correct += verdict.correct
            rewards.append(1.0 if verdict.correct else 0.0)
        return rewards

    return correctness


def format_reward(weight: float, usable):
    """`weight` for the exact chain shape: `<think>` ... `</think>`, then one `\\boxed{}` and nothing but it
    (None where the problem's reference is unusable: its samples are never paid)."""

    def chain_format(prompts, completions, answer, **_) -> list[float | None]:
        rewards = []
        for completion, reference in zip(completions, answer):
            if not usable(reference):
                rewards.append(None)
                continue
            answer_text = answer_part(completion_text(completion))
            boxes = boxed_contents(answer_text) if answer_text is not None else []
            shaped = answer_text is not None and len(boxes) == 1 and boxes[0].strip() != ""
            rewards.append(weight if shaped else 0.0)
        return rewards

    return chain_format


def length_penalty(weight: float, max_tokens: int, usable):
    """-weight x (completion tokens / max_tokens): a nudge toward shorter chains (None where the reference is unusable)."""

    def length(prompts, completions, answer, completion_ids=None, **_) -> list[float | None]:
        ids = completion_ids or [[] for _ in completions]
        return [None if not usable(reference) else -weight * len(row) / max_tokens for row, reference in zip(ids, answer)]

    return length


def guarded(function, stats: RewardStats):
    """`function` with NaN, infinities and exceptions turned into None (the sample is left out), counted."""
    name = getattr(function, "__name__", "reward")

    def reward(prompts, completions, **columns):
        try:
            values = function(prompts, completions, **columns)
        except Exception:
            stats.failed += len(completions)
            stats.by_function[name] = stats.by_function.get(name, 0) + len(completions)
            return [None] * len(completions)
        cleaned = []
        for value in values:
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                if value is not None:
                    stats.by_function[name] = stats.by_function.get(name, 0) + 1
                cleaned.append(None)
            else:
                cleaned.append(float(value))
        return cleaned

    reward.__name__ = name
    return reward


def reward_functions(domain: str, format_weight: float, length_weight: float, max_tokens: int,
                     stats: RewardStats) -> list:
    """The stage's rewards, each guarded: correctness, the chain format, and (when weighted) length."""
    usable = usable_reference(domain)
    functions = [correctness_reward(domain, stats), format_reward(format_weight, usable)]
    if length_weight:
        functions.append(length_penalty(length_weight, max_tokens, usable))
    return [guarded(function, stats) for function in functions]
