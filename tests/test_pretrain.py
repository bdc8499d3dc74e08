"""The offline bootstrap's teacher trains until it can do the task, not for a fixed step count."""

import pytest

from budget_reasoner.config import load_preset
from budget_reasoner.domains import math as math_domain
from budget_reasoner.models import build_tiny_model
from budget_reasoner.train.pretrain import build_offline_tokenizer, greedy_accuracy, train_from_scratch
from tests.conftest import TINY


@pytest.fixture(scope="module")
def world():
    preset = load_preset("cpu-tiny", dict(TINY))
    tokenizer = build_offline_tokenizer(preset)
    problems = math_domain.make_problems(40, 3, 1, 2)
    examples = [(p.question, math_domain.format_chain(p.steps, p.answer)) for p in problems]
    return preset, tokenizer, examples


def _model(world):
    preset, tokenizer, _ = world
    return build_tiny_model(tokenizer, preset.model.tiny_student, max_positions=96, seed=0)


def test_the_schedule_cools_down_past_the_transition_and_stops_at_the_target(world):
    _, tokenizer, examples = world
    scripted = iter([0.2, 0.5, 0.8, 0.9, 0.96])
    history = train_from_scratch(_model(world), tokenizer, examples, steps=100, batch_size=4, learning_rate=1e-3, seed=0,
                                 description="t", check=lambda model: next(scripted), target=0.95, cooldown_at=0.75, check_every=4,
                                 cooldown_steps=6)
    checks = [(entry["step"], entry["check_accuracy"]) for entry in history if "check_accuracy" in entry]
    # 0.8 at step 12 starts the cool-down (no checks during it), 0.9 at its end (18) is short of the target,
    # so training goes on at the low rate until the next check (22) reaches it: 22 of 100 steps allowed
    assert checks == [(4, 0.2), (8, 0.5), (12, 0.8), (18, 0.9), (22, 0.96)]
    assert max(entry["step"] for entry in history) == 22


def test_without_reaching_the_target_it_cools_down_before_the_step_limit(world):
    _, tokenizer, examples = world
    history = train_from_scratch(_model(world), tokenizer, examples, steps=20, batch_size=4, learning_rate=1e-3, seed=0,
                                 description="t", check=lambda model: 0.1, target=0.95, cooldown_at=0.75, check_every=8,
                                 cooldown_steps=5)
    checks = [entry["step"] for entry in history if "check_accuracy" in entry]
    assert checks == [8, 15, 20]  # a check at 15 = 20 - 5 starts the cool-down, so it ends at the limit
    assert max(entry["step"] for entry in history) == 20


def test_greedy_accuracy_grades_the_models_own_answers(world, monkeypatch):
    from budget_reasoner.sampling import Generated
    from budget_reasoner.train import pretrain

    _, tokenizer, _ = world
    problems = math_domain.make_problems(6, 5, 1, 1)
    assert greedy_accuracy(tokenizer, problems)(_model(world)) == 0.0  # an untrained model answers nothing right

    # a model that writes each problem's own worked chain, except a wrong answer to the first two
    def answer_key(model, tokenizer, texts, **kwargs):
        chains = []
        for text in texts:
            index, problem = next((i, p) for i, p in enumerate(problems) if p.question in text)
            answer = str(int(problem.answer) + 1) if index < 2 else problem.answer
            chains.append([Generated(math_domain.format_chain(problem.steps, answer), 0.0, 1)])
        return chains

    monkeypatch.setattr(pretrain, "generate_texts", answer_key)
    assert greedy_accuracy(tokenizer, problems)(None) == pytest.approx(4 / 6)
