"""On-policy distillation: the reverse-KL advantage and its gradient against a hand computation, the teacher's
log-prob of the sampled token against its full softmax, and the stage end to end on the toy run: the teacher
tokens it counts against the sampler's own count, a resume, a bad problem file."""

import json
import math

import pytest
import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.scoring import ScoredSequence
from budget_reasoner.train.opd import opd_loss, reverse_kl_advantages, student_logprobs, teacher_token_logprobs
from tests.conftest import TINY_ARGS, invoke, one_error_line

LN2 = math.log(2)


def test_reverse_kl_advantage_and_gradient_by_hand():
    # two sampled tokens over a vocabulary of 3; the LM head is the identity, so hidden states are the logits
    # position 1: student p = (1/4, 1/2, 1/4), sampled token 1, teacher log p(1) = ln 1/8 -> A = ln(1/8) - ln(1/2) = -2 ln 2
    # position 2: student p = (1/3, 1/3, 1/3), sampled token 0, teacher log p(0) = ln 2/3 -> A = ln(2/3) - ln(1/3) = ln 2
    logits = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    tokens = torch.tensor([1, 0])
    teacher = torch.tensor([math.log(1 / 8), math.log(2 / 3)])
    student = student_logprobs(logits, torch.eye(3), tokens, chunk_tokens=1)  # one token a chunk
    assert torch.allclose(student, torch.tensor([math.log(1 / 2), math.log(1 / 3)]))
    assert torch.allclose(reverse_kl_advantages(student, teacher), torch.tensor([-2 * LN2, LN2]))
    loss, reverse_kl = opd_loss(student, teacher)
    assert math.isclose(loss.item(), (2 * LN2 - LN2) / 2, rel_tol=1e-6)  # its value: the mean sampled reverse KL
    assert torch.allclose(reverse_kl, torch.tensor([2 * LN2, -LN2]))
    loss.backward()
    # d loss / d z = -(1/N) A_t (onehot(x_t) - p_t), N = 2 tokens
    expected = torch.tensor([[-1 / 4, 1 / 2, -1 / 4], [-1 / 3, 1 / 6, 1 / 6]]) * LN2
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_topk_reverse_kl_by_hand_and_against_the_full_softmax():
    from budget_reasoner.train.opd import topk_reverse_kl

    # student (1/2, 1/4 | tail 1/4), teacher (1/4, 1/2 | tail 1/4): 1/2 ln 2 + 1/4 ln 1/2 + 0 = ln 2 / 4
    value = topk_reverse_kl(torch.tensor([[0.5, 0.25]]).log(), torch.tensor([[0.25, 0.5]]).log())
    assert torch.allclose(value, torch.tensor([LN2 / 4]))
    # a vocabulary of 3 and k = 2: the tail bucket is the third token, so the bucketed KL is the whole reverse KL,
    # and through student_logprobs its gradient is autograd's of KL(softmax(z) || teacher) written out in full
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]], requires_grad=True)
    teacher = torch.tensor([[0.2, 0.1, 0.7], [0.6, 0.3, 0.1]]).log()
    topk = torch.tensor([[2, 0], [0, 1]])
    bucketed = topk_reverse_kl(student_logprobs(logits, torch.eye(3), topk), teacher.gather(1, topk))
    (grad,) = torch.autograd.grad(bucketed.sum(), logits)
    full_logits = logits.detach().clone().requires_grad_(True)
    student = full_logits.log_softmax(-1)
    full = (student.exp() * (student - teacher)).sum(-1)
    (full_grad,) = torch.autograd.grad(full.sum(), full_logits)
    assert torch.allclose(bucketed, full.detach(), atol=1e-5) and torch.allclose(grad, full_grad, atol=1e-5)


def test_a_scorer_without_token_logprobs_falls_back_to_its_top_k_and_tail():
    # positions 0 and 1 predict tokens 1 and 0; the teacher's top-2 is {1: 1/2, 2: 1/4} at both
    scored = [ScoredSequence([5, 1, 0], 0, torch.tensor([[1, 2], [1, 2]]), torch.tensor([[0.5, 0.25], [0.5, 0.25]]).log())]
    counts = {"outside_topk": 0}
    values = teacher_token_logprobs(scored, counts)
    assert torch.allclose(values, torch.tensor([math.log(0.5), math.log(0.25)]))  # token 0: the tail, 1 - 3/4
    assert counts["outside_topk"] == 1


def test_scorers_give_the_full_log_prob_of_the_sampled_token(tiny_run):
    """Every sampled token, in the teacher's top-k or not (k = 1 here, so most are not), gets its log-prob under the
    teacher's full softmax, from the whole-model scorer and the layer-streamed one alike."""
    from budget_reasoner.models import load_model
    from budget_reasoner.scoring import LayerStreamedScorer, LocalScorer
    from budget_reasoner.hardware import detect

    out, preset, _ = tiny_run
    teacher = out / "models" / "teacher"
    model = load_model(teacher, preset, detect("cpu"))
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    encoded = [(torch.randint(0, vocab, (n,), generator=generator).tolist(), [0] * 5 + [1] * (n - 5)) for n in (12, 9)]
    with torch.no_grad():
        for scorer in (LocalScorer(model, 0), LayerStreamedScorer(teacher, 0)):
            for (ids, mask), scored in zip(encoded, scorer.score(encoded, 1)):
                full = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                positions = torch.arange(4, len(ids) - 1)  # position p predicts ids[p + 1], the completion's tokens
                expected = full[positions, torch.tensor(ids)[positions + 1]]
                assert scored.first_position == 4
                assert torch.allclose(scored.token_logprobs, expected, atol=1e-5), type(scorer).__name__


class CountingScorer:
    """Any object with `.score` is a teacher: this one counts the completion positions it was asked to score."""

    def __init__(self, inner):
        self.inner, self.positions, self.source = inner, 0, "counting-scorer"

    def score(self, encoded, top_k):
        self.positions += sum(sum(mask) for _, mask in encoded)
        return self.inner.score(encoded, top_k)


def opd_preset(tiny_preset, **changes):
    for key, value in changes.items():
        setattr(tiny_preset.opd, key, value)
    return tiny_preset


def test_opd_stage_counts_every_sampled_token_once(tiny_run, tiny_preset, tmp_path, monkeypatch):
    from budget_reasoner.hardware import detect
    from budget_reasoner.models import load_model
    from budget_reasoner.sampling import local
    from budget_reasoner.scoring import LocalScorer
    from budget_reasoner.train.opd import opd

    out, _, _ = tiny_run
    sampled = []
    original = local.generate_texts

    def recording(*args, **kwargs):
        results = original(*args, **kwargs)
        sampled.extend(g.tokens for row in results for g in row)  # the sampler's own count, stop token included
        return results

    monkeypatch.setattr(local, "generate_texts", recording)
    preset = opd_preset(tiny_preset, objective="sampled")  # the resume test below runs the preset's "topk"
    scorer = CountingScorer(LocalScorer(load_model(out / "models" / "teacher", preset, detect("cpu")), 0))
    record = opd(out / "data" / "problems" / "train.jsonl", out / "sft", scorer, tmp_path / "opd", preset)
    assert record["stage"] == "opd" and (tmp_path / "opd" / "adapter" / "adapter_config.json").is_file()
    steps = preset.opd.max_steps
    assert len(sampled) == steps * preset.opd.batch_size  # every step sampled its batch of completions
    logged = [entry for entry in record["history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, steps + 1))
    assert record["teacher_tokens"] == sum(sampled) == scorer.positions
    assert sum(entry["teacher_tokens"] for entry in logged) == sum(sampled) == logged[-1]["teacher_tokens_total"]
    assert all(entry["loss"] == pytest.approx(entry["reverse_kl"], rel=1e-4, abs=1e-6) for entry in logged)
    saved = json.loads((tmp_path / "opd" / "stage.json").read_text())
    assert saved["teacher_tokens"] == record["teacher_tokens"] and saved["opd"]["completions"] == len(sampled)


def test_interrupted_opd_resumes_and_counts_as_one_run(tiny_run, tiny_preset, tmp_path, monkeypatch, capfd):
    """Killed after its step-2 checkpoint: the rerun resumes there, samples what the uninterrupted run sampled
    (seeds follow the step) and ends with the same teacher-token count and the same adapter."""
    from safetensors.torch import load_file

    from budget_reasoner.train import common
    from budget_reasoner.train.opd import opd

    out, _, _ = tiny_run
    preset = opd_preset(tiny_preset)
    problems, teacher = out / "data" / "problems" / "train.jsonl", out / "models" / "teacher"
    whole = opd(problems, out / "sft", teacher, tmp_path / "whole", preset)
    original = common.RichProgressCallback.on_step_end

    def interrupt_after_checkpoint(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoint-2 is on disk by now
            raise KeyboardInterrupt
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(common.RichProgressCallback, "on_step_end", interrupt_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        opd(problems, out / "sft", teacher, tmp_path / "resumed", preset)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(common.RichProgressCallback, "on_step_end", original)
    resumed = opd(problems, out / "sft", teacher, tmp_path / "resumed", preset)
    assert "resuming from" in capfd.readouterr().err
    assert resumed["teacher_tokens"] == whole["teacher_tokens"]
    assert [e["teacher_tokens_total"] for e in resumed["history"] if "loss" in e] == \
           [e["teacher_tokens_total"] for e in whole["history"] if "loss" in e]
    weights = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("whole", "resumed")]
    assert all(torch.allclose(weights[0][key], weights[1][key], atol=1e-6) for key in weights[0])


def test_a_bad_problem_row_is_one_line(tiny_run, tmp_path):
    out, _, _ = tiny_run
    problems = tmp_path / "problems.jsonl"
    rows = (out / "data" / "problems" / "train.jsonl").read_text().splitlines()[:3]
    problems.write_text("\n".join([rows[0], json.dumps({"id": "x", "question": "1+1"}), rows[2]]) + "\n")
    result = invoke("opd", "--from", out / "sft", "--problems", problems, "--teacher", out / "models" / "teacher",
                    "--out", tmp_path / "opd", "--preset", "cpu-tiny", *TINY_ARGS)
    assert one_error_line(result) == f"error: {problems}: line 2: missing column(s) domain, answer, source"
    assert not (tmp_path / "opd").exists()


def test_a_teacher_with_another_tokenizer_is_refused(tiny_run, tiny_preset, tmp_path, monkeypatch):
    from budget_reasoner.train import opd as opd_module

    out, _, _ = tiny_run
    monkeypatch.setattr(opd_module, "tokenizer_hash", lambda tokenizer: str(id(tokenizer)))
    with pytest.raises(BudgetReasonerError, match="tokenizer is not the student's"):
        opd_module.opd(out / "data" / "problems" / "train.jsonl", out / "sft", out / "models" / "teacher",
                       tmp_path / "opd", opd_preset(tiny_preset))


def test_quickstart_rl_opd_adds_the_stage_to_a_finished_run(tiny_run, tmp_path, monkeypatch):
    """A finished run rerun with --rl opd: the earlier stages are skipped, OPD runs from distill against the run's
    teacher, and the report gains its held-out row and its compute line."""
    import shutil

    from budget_reasoner import recipe
    from tests.conftest import stand_in_for

    out, preset, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)  # run folders are relocatable
    monkeypatch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
    results = recipe.quickstart(run, preset, rl="opd")
    record = json.loads((run / "opd" / "stage.json").read_text())
    assert record["teacher"] == str(run / "models" / "teacher") and record["teacher_tokens"] > 0
    assert 0.0 <= results["stages"]["opd"]["accuracy"] <= 1.0
    assert [row["stage"] for row in results["compute"]][-2:] == ["opd", "eval (6 runs)"]
    assert "| opd |" in (run / "report.md").read_text()
