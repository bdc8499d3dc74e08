"""Math answers: extraction from free text and equivalence with a reference.

Equivalence tries, in order: the same normalized string; the same exact number (`18` = `18.0` =
`36/2` = `\\frac{36}{2}`, compared as fractions); then symbolic equality through HF's math-verify
(radicals, `\\pi`, tuples, intervals, expressions). math-verify's own timeouts use signals, which
silently return False in worker threads, so it runs with them off inside a separate worker process
that we time out ourselves: a pathological expression costs `timeout` seconds, never a hang, in any
thread. Its argument order matters (gold first) and is kept.

Guards against reward hacking: a completion with several *different* boxed answers, or one far longer
than any honest chain, is wrong whatever it contains. A reference that cannot be parsed is not a pass:
`grade` reports it as an error, and eval counts those errors.
"""

from __future__ import annotations

import atexit
import multiprocessing
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from fractions import Fraction

MAX_COMPLETION_CHARS = 50_000
SYMBOLIC_TIMEOUT_SECONDS = 5.0
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_PHRASES = (
    re.compile(r"####\s*(.+)"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*(.+)"),
    re.compile(r"(?:^|\n)\s*A:\s*(.+)"),
)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    error: str | None = None  # set when the reference itself could not be graded against


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
    """The final answer: the last box, else `#### x`, else "The answer is x", else "A: x", else the last number."""
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
    """Strip what does not change the value: `\\text{}`, units after a number, `$`, thousands commas, `%`, a final period."""
    text = answer.strip()
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\%", "%").strip()
    text = re.sub(r"\\(?:left|right)\s*", "", text)  # \left( 3, \pi \right) -> ( 3, \pi )
    text = text.rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    number_with_unit = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(?:%|[a-zA-Z][a-zA-Z\s.]*)?", text)
    if number_with_unit:
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


def _symbolic_equal_in_worker(reference: str, predicted: str) -> bool | None:
    """Runs in the worker process. None: the reference looks like math but does not parse."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": ours is outside
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    parsed_as_math = any(not isinstance(item, str) for item in gold)
    if not parsed_as_math and (not gold or re.search(r"[\\{}^_()\[\]=+*/]", reference)):
        return None  # plain words ("Evelyn") compare as strings; broken notation is an error
    target = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    return bool(target) and verify(gold, target, timeout_seconds=None)


class _SymbolicWorker:
    """One long-lived process for math-verify; killed and replaced when a call runs past its timeout."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None

    def run(self, function, *args, timeout: float):
        """`function(*args)` in the worker; TimeoutError (and a fresh worker next time) past `timeout` seconds."""
        with self._lock:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            pending = self._pool.apply_async(function, args)
            try:
                return pending.get(timeout)
            except (FutureTimeout, multiprocessing.TimeoutError):
                self._pool.terminate()
                self._pool = None
                raise TimeoutError(f"took over {timeout} s") from None


    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None


_worker = _SymbolicWorker()
atexit.register(_worker.close)  # a pool left to the garbage collector at exit fails noisily


def compare(predicted: str, reference: str, timeout: float = SYMBOLIC_TIMEOUT_SECONDS) -> Verdict:
    if predicted == reference:
        return Verdict(True)
    left, right = to_number(predicted), to_number(reference)
    if left is not None and right is not None:
        return Verdict(left == right)
    try:
        equal = _worker.run(_symbolic_equal_in_worker, reference, predicted, timeout=timeout)
    except TimeoutError as error:
        return Verdict(False, f"comparing {predicted[:40]!r} with {reference[:40]!r} {error}")
    if equal is None:
        return Verdict(False, f"reference answer {reference!r} could not be parsed")
    return Verdict(equal)


def answers_equal(predicted: str, reference: str) -> bool:
    return compare(predicted, reference).correct


def grade_math(completion: str, reference: str) -> Verdict:
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return Verdict(False)
    if len({normalize(box) for box in boxed_contents(completion)}) > 1:
        return Verdict(False)  # hedging over several answers is not an answer
    predicted = extract_answer(completion)
    if predicted is None:
        return Verdict(False)
    return compare(predicted, normalize(str(reference)))


def check_math(completion: str, reference: str) -> bool:
    return grade_math(completion, reference).correct
