import pytest

from budget_reasoner.verify import check, extract_answer

# (completion, reference, verdict), each checked by hand
CASES = [
    ("<think>\n2+3=5\n</think>\n\\boxed{5}", "5", True),
    ("<think>\n2+3=5\n</think>\n\\boxed{6}", "5", False),
    ("so \\boxed{\\frac{14}{3}}", "14/3", True),
    ("so \\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
    ("\\boxed{18.0}", "18", True),
    ("\\boxed{18.00}", "18", True),
    ("\\boxed{18.5}", "18", False),
    ("The answer is $1,234.", "1234", True),
    ("#### 42", "42", True),
    ("after all that, 7 apples and then 12 apples", "12", True),  # last number fallback
    ("\\boxed{\\text{12 cm}}", "12", True),
    ("first \\boxed{3} then \\boxed{3}", "3", True),  # the same answer twice is fine
    ("\\boxed{3} or maybe \\boxed{4}", "4", False),  # hedging over answers is wrong
    ("\\boxed{{5}}", "5", True),  # a LaTeX group: {5} renders as 5
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", True),
    ("\\boxed{2\\sqrt{3}}", "3\\sqrt{2}", False),
    ("\\boxed{2\\pi}", "\\pi \\cdot 2", True),
    ("\\boxed{6.28}", "2\\pi", False),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("\\boxed{[2, 5)}", "[2,5)", True),
    ("\\boxed{(2, 5)}", "[2,5)", False),  # an open and a half-open interval differ
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x^2+1}", "(x+1)^2", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("A: 12", "12", True),
    ("", "5", False),
    ("no number here", "5", False),
    ("-3", "-3", True),
]


@pytest.mark.parametrize("completion, reference, verdict", CASES)
def test_hand_checked_cases(completion, reference, verdict):
    assert check("math", completion, reference) is verdict


def test_extract_answer_takes_the_last_box_with_nested_braces():
    assert extract_answer("\\boxed{1} and finally \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("nothing") is None
    assert extract_answer(None) is None


def test_non_text_and_giant_completions_are_simply_wrong():
    assert check("math", None, "5") is False
    assert check("math", 5, "5") is False
    assert check("math", "1 " * 30_000 + "\\boxed{5}", "5") is False


def test_the_timeout_holds_inside_a_worker_thread():
    import threading
    import time

    from budget_reasoner.verify.math import _worker

    outcome = {}

    def slow():
        started = time.time()
        try:
            _worker.run(time.sleep, 30, timeout=1.0)
        except TimeoutError as error:
            outcome["error"], outcome["seconds"] = str(error), time.time() - started

    thread = threading.Thread(target=slow)
    thread.start()
    thread.join(20)
    assert "took over 1.0 s" in outcome["error"] and outcome["seconds"] < 10
    # the worker is replaced: the next comparison works
    assert check("math", "\\boxed{\\sqrt{4}}", "2")


def test_an_unparseable_reference_is_an_error_not_a_pass():
    from budget_reasoner.verify import grade

    verdict = grade("math", "\\boxed{\\sqrt{4}}", "\\frac{")
    assert verdict.correct is False and "could not be parsed" in verdict.error
