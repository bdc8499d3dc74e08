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
    ("\\boxed{{5}}", "5", False),  # nested braces are kept, "{5}" is not a number
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
