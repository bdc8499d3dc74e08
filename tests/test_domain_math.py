import ast
import operator

from budget_reasoner.domains import math as math_domain

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """An independent evaluator of the problem notation (standard precedence)."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        return node.value
    return walk(ast.parse(expression, mode="eval").body)


def test_problems_mean_what_their_answers_say():
    problems = math_domain.make_problems(500, seed=3, min_steps=2, max_steps=3)
    for problem in problems:
        assert evaluate(problem.question) == int(problem.answer)
        assert 2 <= len(problem.steps) <= 3
        for step in problem.steps:  # every step of the chain is a correct single operation
            left, right = step.split("=")
            assert evaluate(left) == int(right)
            assert 0 <= int(right) <= math_domain.MAX_VALUE
        assert problem.steps[-1].endswith("=" + problem.answer)


def test_minimal_parentheses():
    problems = math_domain.make_problems(300, seed=5, min_steps=3, max_steps=3)
    assert any("(" in p.question for p in problems)
    for p in problems:
        if "(" in p.question:  # parentheses only where dropping them changes the value
            assert evaluate(p.question.replace("(", "").replace(")", "")) != int(p.answer), p.question
        else:
            assert evaluate(p.question) == int(p.answer)
    assert math_domain.make_problems(5, seed=1, min_steps=1, max_steps=1)[0].question.count("(") == 0


def test_splits_never_overlap_and_are_deterministic():
    train, held = math_domain.make_splits(400, 100, seed=0, min_steps=2, max_steps=3)
    assert len({p.question for p in train}) == 400 and len({p.question for p in held}) == 100
    assert not {p.question for p in train} & {p.question for p in held}
    again, _ = math_domain.make_splits(400, 100, seed=0, min_steps=2, max_steps=3)
    assert [p.question for p in train] == [p.question for p in again]


def test_chain_format():
    assert math_domain.format_chain(["2+3=5", "5*2=10"], "10") == "<think>\n2+3=5\n5*2=10\n</think>\n\\boxed{10}"
    assert math_domain.format_direct("7") == "<think>\n</think>\n\\boxed{7}"


def test_single_steps_are_the_chains_operations():
    problem = math_domain.Problem("(3+4)*2", "14", ("3+4=7", "7*2=14"))
    skills = math_domain.single_steps([problem])
    assert [(s.question, s.answer) for s in skills] == [("3+4", "7"), ("7*2", "14")]
