"""Math answers: extraction from free text and equivalence with a reference.

Numbers are compared exactly (as fractions), so `18`, `18.0`, `18.00`, `36/2` and `\\frac{36}{2}` agree.
Guards against reward hacking: a completion with several *different* boxed answers, or one far longer
than any honest chain, is wrong whatever it contains.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_COMPLETION_CHARS = 50_000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_PHRASES = (
    re.compile(r"####\s*(.+)"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*(.+)"),
)


def boxed_contents(text: str) -> list[str]:
    """Every `\\boxed{...}` (or `\\fbox{...}`) content, with nested braces balanced, in order."""
    contents = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                contents.append(text[start:index])
                break
    return contents


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion: the last box, else `#### x`, else "The answer is x", else the last number."""
    if not isinstance(completion, str) or not completion.strip():
        return None
    boxes = boxed_contents(completion)
    if boxes:
        return normalize(boxes[-1])
    for pattern in _ANSWER_PHRASES:
        matches = pattern.findall(completion)
        if matches:
            return normalize(matches[-1].strip().splitlines()[0])
    numbers = _NUMBER.findall(completion)
    return normalize(numbers[-1]) if numbers else None


def normalize(answer: str) -> str:
    """Strip what does not change the value: `\\text{}`, units after a number, `$`, thousands commas, a final period."""
    text = answer.strip()
    text = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").strip()
    text = text.rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    number_with_unit = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*[a-zA-Z%\s]*", text)
    if number_with_unit and not text.endswith("%"):
        text = number_with_unit.group(1)
    return text


def to_number(text: str) -> Fraction | None:
    """A plain number, decimal, or simple fraction as an exact Fraction; None for anything else."""
    text = text.replace(" ", "")
    fraction = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", text) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", text)
    try:
        if fraction:
            sign = -1 if fraction.group(1) else 1
            return sign * Fraction(int(fraction.group(2)), int(fraction.group(3)))
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
            return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_equal(predicted: str, reference: str) -> bool:
    if predicted == reference:
        return True
    left, right = to_number(predicted), to_number(reference)
    return left is not None and left == right


def check_math(completion: str, reference: str) -> bool:
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return False
    if len({normalize(box) for box in boxed_contents(completion)}) > 1:
        return False  # hedging over several answers is not an answer
    predicted = extract_answer(completion)
    return predicted is not None and answers_equal(predicted, normalize(str(reference)))
