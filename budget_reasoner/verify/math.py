"""Math answers: extraction from free text and equivalence with a reference.

Equivalence tries, in order: the same normalized string; the same exact number (`18` = `18.0` =
`36/2` = `\\frac{36}{2}` = `\\frac12` vs `0.5`, compared as fractions); then symbolic equality through HF's
math-verify (radicals, `\\pi`, degrees, mixed numbers, tuples, intervals, expressions) in a worker process
(`verify/symbolic.py`) that any caller can use (a script without a main guard, `python -`, a notebook, a
thread, a pool) and that is killed when a comparison runs past its deadline. Its argument order matters
(gold first) and is kept.

Every path is bounded: extraction is one linear pass over the completion's braces; one `grade` shares a
single deadline (`SYMBOLIC_TIMEOUT_SECONDS`) across all its symbolic comparisons; answers longer or more
deeply nested than any real one are compared as strings and numbers only, never handed to sympy.

Guards against reward hacking: a completion with several boxed answers that differ in meaning, or one far
longer than any honest chain, is wrong whatever it contains. Boxes that hold no answer (empty, `\\phantom`,
spacing: long-division layouts) are not answers, and two boxes that say the same thing (`\\frac12`, `0.5`)
are one answer. A reference that is missing, empty, not text or cannot be parsed is not a pass: `grade`
reports it as an error, and eval counts those errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from budget_reasoner.verify.symbolic import Deadline, SymbolicTimeout, worker

MAX_COMPLETION_CHARS = 50_000
MAX_ANSWER_CHARS = 1_000  # MATH-500's longest answer is 53 characters
MAX_ANSWER_DEPTH = 12  # its deepest brace nesting is 2; a \\frac bomb stops at strings and numbers
MAX_DISTINCT_BOXES = 4  # more different-looking boxes than this is hedging without asking sympy
SYMBOLIC_TIMEOUT_SECONDS = 5.0
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# [ \t]* rather than \s*: a \s* that can cross newlines makes "\n\n\n...\n" quadratic
_ANSWER_PHRASES = (
    re.compile(r"####[ \t]*(.+)"),
    re.compile(r"[Tt]he (?:final )?answer is[: \t]*(.+)"),
    re.compile(r"^[ \t]*A:[ \t]*(.+)", re.MULTILINE),
)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (\\{, \\}, \\\\) is not a brace
_SPACES = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
_LAYOUT = re.compile(r"\\[hv]?phantom\{[^{}]*\}|\\(?:quad|qquad|enspace|hspace\*?\{[^{}]*\}|[ ,;:!])|~|\s")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    error: str | None = None  # set when the reference itself could not be graded against


def boxed_contents(text: str) -> list[str]:
    """Every closed `\\boxed{...}` (or `\\fbox{...}`) content, with nested braces balanced, in order of opening.

    One pass over the braces with a stack, so the cost is linear in the text however many boxes are left
    open (rescanning to the end for each open box made 7,000 unclosed boxes take minutes)."""
    openers = {match.end() - 1 for match in _BOX_OPEN.finditer(text)}  # positions of the boxes' own "{"
    if not openers:
        return []
    stack, found = [], []
    for token in _BRACE_TOKENS.finditer(text):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            start = stack.pop()
            if start in openers:
                found.append((start, text[start + 1 : token.start()]))
    return [content for _, content in sorted(found)]


def holds_answer(box: str) -> bool:
    """False for layout boxes: empty, whitespace, `\\phantom{..}` cells, `\\quad` and other spacing."""
    return bool(_LAYOUT.sub("", box))


def answer_boxes(completion: str) -> list[str]:
    """The normalized contents of the boxes that hold an answer, in order."""
    return [normalize(box) for box in boxed_contents(completion) if holds_answer(box)]


def extract_answer(completion: str) -> str | None:
    """The final answer: the last real box, else `#### x`, else "The answer is x", else "A: x", else the last number."""
    if not isinstance(completion, str) or not completion.strip() or len(completion) > MAX_COMPLETION_CHARS:
        return None
    return _extract(completion, answer_boxes(completion))


def _extract(completion: str, boxes: list[str]) -> str | None:
    if boxes:
        return boxes[-1]
    for pattern in _ANSWER_PHRASES:
        matches = pattern.findall(completion)
        if matches:
            return normalize(matches[-1].strip())
    numbers = _NUMBER.findall(completion)
    return normalize(numbers[-1]) if numbers else None


def normalize(answer: str) -> str:
    """Strip what does not change the value: `\\text{}`, units after a number, `$`, thousands commas, `%`, a final period."""
    text = answer.strip()
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\%", "%").strip()
    text = re.sub(r"\\(?:left|right)\s*", "", text)  # \\left( 3, \\pi \\right) -> ( 3, \\pi )
    text = text.rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    number_with_unit = re.fullmatch(r"(-?\d+(?:\.\d+)?)[ \t]*(?:%|[a-zA-Z][a-zA-Z \t.]*)?", text)
    if number_with_unit:
        text = number_with_unit.group(1)
    return text


def to_number(text: str) -> Fraction | None:
    """A plain number, decimal, or simple fraction (`\\frac{1}{2}`, `\\frac12`, `1/2`) as an exact Fraction; else None."""
    text = text.replace(" ", "")
    fraction = (re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", text)
                or re.fullmatch(r"(-?)\\[dt]?frac(\d)(\d)", text) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", text))
    try:
        if fraction:
            sign = -1 if fraction.group(1) else 1
            return sign * Fraction(int(fraction.group(2)), int(fraction.group(3)))
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
            return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _too_big_for_sympy(answer: str) -> bool:
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for token in _BRACE_TOKENS.finditer(answer):
        depth += {"{": 1, "}": -1}.get(token.group(), 0)
        deepest = max(deepest, depth)
    return deepest > MAX_ANSWER_DEPTH


def _squeeze(answer: str) -> str:
    """Spaces do not matter in math mode (`12 \\frac{3}{5}` = `12\\frac{3}{5}`), except to end a command (`\\pi r`)."""
    return _SPACES.sub(lambda match: match.group(1) + " " if match.group(1) else "", answer)


def cheap_equal(predicted: str, reference: str) -> bool | None:
    """True or False when strings and exact numbers decide it, None when only symbolic comparison can."""
    if predicted == reference or _squeeze(predicted) == _squeeze(reference):
        return True
    left, right = to_number(predicted), to_number(reference)
    if left is not None and right is not None:
        return left == right
    return None


def equivalent(predicted: str, reference: str, deadline: Deadline | None = None) -> bool:
    """Do two extracted answers mean the same (the relation `grade` uses)? False past `deadline`."""
    cheap = cheap_equal(predicted, reference)
    if cheap is not None:
        return cheap
    if _too_big_for_sympy(predicted) or _too_big_for_sympy(reference):
        return False
    try:
        _, equal = worker.compare(reference, predicted, (deadline or Deadline(SYMBOLIC_TIMEOUT_SECONDS)).at())
    except SymbolicTimeout:
        return False
    return bool(equal)


def compare(predicted: str, reference: str, timeout: float = SYMBOLIC_TIMEOUT_SECONDS) -> Verdict:
    """An extracted answer against a normalized reference (see `grade_math` for the whole completion)."""
    deadline = Deadline(timeout)
    problem = reference_problem(reference, deadline)
    return Verdict(False, problem) if problem else _compare(predicted, reference, deadline)


def _compare(predicted: str, reference: str, deadline: Deadline) -> Verdict:
    """`predicted` against a reference already known to be usable."""
    cheap = cheap_equal(predicted, reference)
    if cheap is not None:
        return Verdict(cheap)
    if _too_big_for_sympy(predicted):
        return Verdict(False)  # not an answer a person writes, and not one to hand to sympy
    try:
        _, equal = worker.compare(reference, predicted, deadline.at())
    except SymbolicTimeout as timeout:
        if timeout.stage == "gold":
            return Verdict(False, f"reference answer {reference[:40]!r} did not parse within the time limit")
        return Verdict(False)  # a pathological prediction costs its timeout and is wrong
    return Verdict(bool(equal))


_reference_problems: dict[str, str | None] = {}  # reference -> None (usable) or why not; the worker caches too


def reference_problem(reference: str, deadline: Deadline) -> str | None:
    """None when a normalized reference can be graded against (a number, math, plain words), else why not."""
    if to_number(reference) is not None:
        return None
    if _too_big_for_sympy(reference):
        return f"reference answer {reference[:40]!r}... is too long or too deeply nested to grade"
    if reference in _reference_problems:
        return _reference_problems.get(reference)
    try:
        kind, _ = worker.compare(reference, None, deadline.at())
    except SymbolicTimeout:
        return f"reference answer {reference[:40]!r} did not parse within the time limit"  # not cached: may be load
    problem = f"reference answer {reference!r} could not be parsed" if kind == "invalid" else None
    if len(_reference_problems) > 100_000:
        _reference_problems.clear()
    _reference_problems[reference] = problem
    return problem


def reference_text(reference) -> str | Verdict:
    """The normalized reference, or an error Verdict for one that is missing, empty or not a value."""
    if reference is None:
        return Verdict(False, "no reference answer")
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float, Fraction)):
        return Verdict(False, f"reference answer is a {type(reference).__name__}, not text")
    text = normalize(str(reference))
    if not text:
        return Verdict(False, "empty reference answer")
    return text


def ballot(completion, deadline: Deadline | None = None) -> str | None:
    """The answer `grade_math` would grade, or None when it refuses the completion (not text, giant,
    no answer, or hedging over boxes that differ in meaning). Majority vote counts exactly these."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    boxes = answer_boxes(completion)
    distinct = list(dict.fromkeys(boxes))
    if len(distinct) > 1:
        if len(distinct) > MAX_DISTINCT_BOXES:
            return None
        deadline = deadline or Deadline(SYMBOLIC_TIMEOUT_SECONDS)
        final = distinct[-1]
        if not all(equivalent(box, final, deadline) for box in distinct[:-1]):
            return None  # hedging over several answers is not an answer
    return _extract(completion, boxes) if completion.strip() else None


def grade_math(completion, reference, timeout: float = SYMBOLIC_TIMEOUT_SECONDS) -> Verdict:
    """Grade a completion against a reference, with `timeout` seconds of symbolic work for all of it."""
    reference = reference_text(reference)
    if isinstance(reference, Verdict):
        return reference
    deadline = Deadline(timeout)
    problem = reference_problem(reference, deadline)
    if problem:
        return Verdict(False, problem)
    predicted = ballot(completion, deadline)
    return Verdict(False) if predicted is None else _compare(predicted, reference, deadline)


def answers_equal(predicted: str, reference: str) -> bool:
    return equivalent(predicted, reference)


def check_math(completion, reference) -> bool:
    return grade_math(completion, reference).correct


grade = grade_math  # the names verify/__init__.py dispatches to, one per domain module
