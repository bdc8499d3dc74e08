"""The OpenAI-compatible teacher against a stub server, for what a real server will not produce on demand: 429s,
5xx, malformed JSON, empty choice lists, hangs, 401 and 404, a key echoed back, shuffled choices, a reasoning
server's separate thought. The real thing (`transformers serve` on loopback) is in test_teacher_server.py."""

import json
import socket
import threading
import time

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.generate.teachers import OpenAITeacher
from budget_reasoner.io import read_shards
from tests.conftest import TINY, TINY_ARGS, ScriptedTeacher, invoke, one_error_line
from tests.loopback_http import JsonHandler, LoopbackServer

SECRET = "sk-live-0123456789"
FAST = {"backoff_seconds": 0.01, "max_backoff_seconds": 0.05}  # retries in milliseconds, not seconds


class StubServer(LoopbackServer):
    """POST /v1/chat/completions and GET /v1/models as OpenAI's API reference documents them: a `chat.completion`
    object `{"id", "object", "created", "model", "choices": [{"index", "message": {"role", "content"},
    "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}`, a `list` of models
    `{"object": "list", "data": [{"id", "object": "model", ...}]}`, and errors as `{"error": {"message", "type",
    "code"}}` with their HTTP status.

    The chains are the scripted teacher's (even samples right, odd ones wrong; a request's choices count from its
    seed, so one-choice requests with seeds s, s+1, ... answer as one request with n), the choices shuffled out of
    order (the protocol numbers them); `usage` counts one token per character. `fail(request_number)` returns None to
    answer, or what to do instead: an HTTP status, "malformed", "empty", "hang". `max_choices` caps the choices
    (a server that ignores `n`); `reasoning=True` sends the thought apart, as R1-style servers do."""

    def __init__(self, fail=lambda number: None, max_choices: int | None = None, reasoning: bool = False,
                 delay=lambda body: 0.0):
        self.requests, self.fail, self.max_choices, self.reasoning, self.delay = [], fail, max_choices, reasoning, delay
        self.lock = threading.Lock()
        stub = self

        class Handler(JsonHandler):
            def do_GET(self):
                self.reply(200, {"object": "list", "data": [{"id": "served-model", "object": "model", "owned_by": "me"}]})

            def do_POST(self):
                body = self.body()
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    number = len(stub.requests)
                failure = stub.fail(number)
                if failure == "hang":
                    time.sleep(3)
                    return
                if isinstance(failure, int):
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    message = f"Incorrect API key provided: {key}" if failure == 401 else f"status {failure}"
                    return self.reply(failure, {"error": {"message": message, "type": "error", "code": failure}})
                if failure == "malformed":
                    return self.reply(200, b"<html>502 Bad Gateway</html>")
                time.sleep(stub.delay(body))
                n = min(body["n"], stub.max_choices or body["n"])
                first = body["seed"] % 2
                chains = [] if failure == "empty" else ScriptedTeacher().sample([body["messages"]], first + n, 0, 0, 0)[0][first:]
                choices = [{"index": i, "message": stub.message(chain), "finish_reason": "stop"}
                           for i, chain in enumerate(chains)][::-1]
                prompt_tokens = len(json.dumps(body["messages"]))
                completion_tokens = sum(len(chain) for chain in chains)
                self.reply(200, {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": 0,
                                 "model": body["model"], "choices": choices,
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}})

        self.start(Handler)

    def message(self, chain: str) -> dict:
        if not self.reasoning:
            return {"role": "assistant", "content": chain}
        thought, _, answer = chain.partition("</think>\n")
        return {"role": "assistant", "reasoning_content": thought.removeprefix("<think>\n").rstrip("\n"), "content": answer}


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


@pytest.fixture
def serve():
    """StubServer(...) that is closed after the test."""
    started = []
    yield lambda **kwargs: started.append(StubServer(**kwargs)) or started[-1]
    for server in started:
        server.close()


PROMPTS = [[{"role": "user", "content": "3+4*2"}], [{"role": "user", "content": "(12+7)*3-5"}]]


def test_the_server_teacher_speaks_the_protocol_and_keeps_the_servers_token_counts(stub):
    teacher = OpenAITeacher("Qwen/Qwen2.5-72B-Instruct", base_url=stub.url, api_key="sk-test")
    samples = teacher.sample(PROMPTS, num_samples=3, temperature=0.8, max_new_tokens=64, seed=8)
    assert [[s.text for s in row] for row in samples] == ScriptedTeacher().sample(PROMPTS, 3, 0, 0, 0)  # index order
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"] == {"model": "Qwen/Qwen2.5-72B-Instruct", "messages": PROMPTS[0], "n": 3,
                               "temperature": 0.8, "max_tokens": 64, "seed": 8}
    assert len(stub.requests) == len(PROMPTS)  # n honoured: one request per prompt
    for prompt, row in zip(PROMPTS, samples):  # one usage per request, split over its choices, sums exact
        assert sum(s.tokens for s in row) == sum(len(s.text) for s in row)
        assert sum(s.prompt_tokens for s in row) == len(json.dumps(prompt))
        assert max(s.prompt_tokens for s in row) - min(s.prompt_tokens for s in row) <= 1


def test_a_reasoning_servers_separate_thought_is_put_back_in_the_chain_format(serve):
    server = serve(reasoning=True)
    samples = OpenAITeacher("r1", base_url=server.url).sample(PROMPTS[1:], 2, 0.6, 64, 0)
    assert [[s.text for s in row] for row in samples] == ScriptedTeacher().sample(PROMPTS[1:], 2, 0, 0, 0)


def test_a_server_that_ignores_n_is_found_on_the_first_request_and_said_once(serve, capfd):
    server = serve(max_choices=1)
    teacher = OpenAITeacher("m", base_url=server.url)
    samples = teacher.sample(PROMPTS, 4, 1.0, 64, seed=10)
    samples += teacher.sample(PROMPTS, 4, 1.0, 64, seed=20)  # the next shard: planned as separate requests at once
    assert [[s.text for s in row] for row in samples] == ScriptedTeacher().sample(PROMPTS * 2, 4, 0, 0, 0)
    bodies = [r["body"] for r in server.requests]
    assert [b["n"] for b in bodies] == [4] + [1] * (2 * 2 * 4 - 1)  # only the first asked for 4
    seeds = sorted((b["messages"][0]["content"], b["seed"]) for b in bodies)  # each sample its own seed
    assert seeds == sorted((p[0]["content"], base + k) for base in (10, 20) for p in PROMPTS for k in range(4))
    assert capfd.readouterr().err.count("answered 1 of 4 choices") == 1


def test_many_requests_in_flight_and_the_results_in_prompt_order(serve):
    import random

    delays = random.Random(0)
    server = serve(delay=lambda body: delays.uniform(0, 0.05))  # answers finish out of order
    prompts = [[{"role": "user", "content": f"{a}+{a + 1}*2"}] for a in range(40)]
    teacher = OpenAITeacher("m", base_url=server.url, concurrency=8)
    samples = teacher.sample(prompts, 2, 1.0, 64, 0)
    assert [[s.text for s in row] for row in samples] == ScriptedTeacher().sample(prompts, 2, 0, 0, 0)
    assert 2 <= teacher.peak_in_flight <= 8


@pytest.mark.parametrize("failure", [429, 500, 503, "malformed", "empty", "hang"])
def test_busy_slow_or_garbled_answers_are_retried(serve, failure):
    server = serve(fail=lambda number: failure if number <= 2 else None)
    teacher = OpenAITeacher("m", base_url=server.url, timeout=0.5, max_retries=2, **FAST)
    samples = teacher.sample(PROMPTS[:1], 2, 1.0, 64, 0)
    assert [[s.text for s in row] for row in samples] == ScriptedTeacher().sample(PROMPTS[:1], 2, 0, 0, 0)
    assert teacher.retries == 2 and len(server.requests) == 3


# (what the server does from the 5th request on, what the one line must say): the first shard of 4 problems is
# answered (one request each, n honoured), the second is not
FAILURES = [
    (503, "HTTP 503 (status 503) on all 3 tries"),
    ("malformed", "a malformed answer, not a chat completion ('<html>502 Bad Gateway</html>') on all 3 tries"),
    ("empty", "an empty choice list on all 3 tries"),
    ("hang", "no answer within 0.5 s (timed out) on all 3 tries"),
    (401, f"HTTP 401 (Incorrect API key provided: ***): the key was refused"),
    (404, "HTTP 404 (status 404): the server has no model 'stub-72b' or no /chat/completions under this URL; "
          "it serves: served-model"),
]


@pytest.mark.parametrize("failure, said", FAILURES, ids=[str(f) for f, _ in FAILURES])
def test_a_server_that_stops_answering_is_one_line_and_the_finished_shards_stay(serve, tmp_path, monkeypatch, failure, said):
    server = serve(fail=lambda number: failure if number > 4 else None)
    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", server.url)
    monkeypatch.setenv("BUDGET_REASONER_TEACHER_KEY", SECRET)
    out = tmp_path / "data"
    result = invoke("generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny", "--out", out, *TINY_ARGS,
                    "--set", "generate.num_train_problems=8", "--set", "generate.shard_size=4",
                    "--set", "generate.max_retries=2", "--set", "generate.request_timeout=0.5")
    line = one_error_line(result)
    assert line.startswith(f"error: teacher server {server.url} (model stub-72b): {said}"), line
    assert line.endswith(f"1 finished shard(s) of chains kept in {out / 'chains'}, the same command resumes after them")
    assert [path.name for path in (out / "chains").iterdir()] == ["shard-00000.jsonl"]
    assert len(read_shards(out / "chains")) == 4 * TINY["generate.samples_per_problem"]
    assert SECRET not in result.output and not [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_an_unreachable_server_is_one_line_after_its_retries(monkeypatch):
    monkeypatch.delenv("BUDGET_REASONER_TEACHER_URL", raising=False)
    with pytest.raises(BudgetReasonerError, match="needs BUDGET_REASONER_TEACHER_URL"):
        OpenAITeacher("m")
    port = _dead_port()
    teacher = OpenAITeacher("m", base_url=f"http://127.0.0.1:{port}/v1", timeout=5, max_retries=2, **FAST)
    with pytest.raises(BudgetReasonerError, match=rf"^teacher server http://127.0.0.1:{port}/v1 \(model m\): no answer "
                                                  r"\(.*refused\) on all 3 tries over 0 s \(429, 5xx, timeouts of 5 s"):
        teacher.sample([[{"role": "user", "content": "1+1"}]], 1, 0, 8, 0)
    assert teacher.retries == 2


def test_quickstart_with_a_server_teacher_skips_logit_distillation(stub, tmp_path, monkeypatch, capfd):
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", stub.url)
    preset = load_preset("cpu-tiny", {**TINY, "model.teacher": "openai:stub-72b"})
    results = recipe.quickstart(tmp_path / "run", preset)
    assert set(results["stages"]) == {"base", "sft", "dpo"} and results["teacher"] == {}
    assert "distill: skipped, the chain teacher is a server and no distill.teacher" in capfd.readouterr().err
    assert len(stub.requests) == preset.generate.num_train_problems  # one request (n chains) per problem
    assert results["generate"]["device"] == "server" and results["generate"]["peak_memory_bytes"] is None
    chains = read_shards(tmp_path / "run" / "data" / "chains")
    assert all(row["teacher"] == "stub-72b" for row in chains)
    assert results["generate"]["tokens"] == sum(len(row["completion"]) for row in chains)  # the stub's usage
    assert "| dpo |" in (tmp_path / "run" / "report.md").read_text()


def test_a_server_chain_teacher_with_a_local_scoring_teacher_keeps_logit_distillation(stub, tmp_path, monkeypatch):
    """The teacher's two jobs apart: chains from the server, the top-k cache from distill.teacher, streamed a layer
    at a time (the 24gb preset's route for a 72B), so quickstart distills instead of skipping."""
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset
    from budget_reasoner.io import read_json

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", stub.url)
    preset = load_preset("cpu-tiny", {**TINY, "model.teacher": "openai:stub-72b", "distill.teacher": "tiny-teacher",
                                      "distill.stream_layers": True})
    results = recipe.quickstart(tmp_path / "run", preset)
    assert set(results["stages"]) == {"base", "sft", "dpo", "distill"} and results["teacher"] == {}
    assert all(row["teacher"] == "stub-72b" for row in read_shards(tmp_path / "run" / "data" / "chains"))
    cache = read_json(tmp_path / "run" / "distill" / "cache" / "COMPLETE.json")
    assert cache["teacher"] == str(tmp_path / "run" / "models" / "teacher")
    sft_rows = (tmp_path / "run" / "data" / "sft" / "train.jsonl").read_text().splitlines()
    assert cache["examples"] == len(sft_rows)


def test_redact_takes_credentials_out_of_urls_and_keeps_the_rest():
    from budget_reasoner.sampling.server import redact

    assert redact(f"http://user:{SECRET}@gpu-box:8000/v1") == "http://***@gpu-box:8000/v1"
    assert redact(f"https://host/v1?api_key={SECRET}&api-version=2024-06") == "https://host/v1?api_key=***&api-version=2024-06"
    assert redact(f"error at https://h/v1?x=1&Token={SECRET}#a, retry") == "error at https://h/v1?x=1&Token=***#a, retry"
    assert redact("http://localhost:8000/v1 and Qwen/Qwen2.5-7B-Instruct") == "http://localhost:8000/v1 and Qwen/Qwen2.5-7B-Instruct"


def _dead_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@127.0.0.1:{{port}}/v1", f"http://127.0.0.1:{{port}}/v1?api_key={SECRET}"])
def test_a_key_in_the_url_is_not_in_the_error_line(url):
    url = url.format(port=_dead_port())
    with pytest.raises(BudgetReasonerError, match="no answer") as error:
        OpenAITeacher("m", base_url=url, timeout=5, max_retries=0).sample([[{"role": "user", "content": "1+1"}]], 1, 0, 8, 0)
    assert SECRET not in str(error.value) and "***" in str(error.value)
    with pytest.raises(BudgetReasonerError, match="must start with http") as error:
        OpenAITeacher("m", base_url=f"user:{SECRET}@127.0.0.1:8000/v1")
    assert SECRET not in str(error.value)


@pytest.mark.parametrize("where", ["url", "environment"])
def test_the_key_reaches_the_server_and_nothing_the_run_writes_or_prints(stub, tmp_path, monkeypatch, capfd, where):
    """generate through the CLI with the key in the URL's query, or in BUDGET_REASONER_TEACHER_KEY: the server gets
    it, and no file in the output folder, no line on the terminal (the runner's output and the process's own
    stdout/stderr) shows it; a dead server with the key in the URL is one line without it."""
    if where == "url":
        monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", f"{stub.url}?api_key={SECRET}")
    else:
        monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", stub.url)
        monkeypatch.setenv("BUDGET_REASONER_TEACHER_KEY", SECRET)
    out = tmp_path / "data"
    result = invoke("generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny", "--out", out, *TINY_ARGS,
                    "--token-price", "0.15,0.60")
    assert result.exit_code == 0, result.output
    sent = [r["path"] for r in stub.requests] if where == "url" else [r["auth"] for r in stub.requests]
    assert sent and set(sent) == {f"/v1/chat/completions?api_key={SECRET}" if where == "url" else f"Bearer {SECRET}"}
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.parent.name == "chains" for path in written)
    assert not [path for path in written if SECRET.encode() in path.read_bytes()]
    assert SECRET not in result.output and SECRET not in "".join(capfd.readouterr())

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", f"http://user:{SECRET}@127.0.0.1:{_dead_port()}/v1")
    result = invoke("generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny", "--out", tmp_path / "dead",
                    *TINY_ARGS, "--set", "generate.max_retries=0")
    assert "no answer" in one_error_line(result) and SECRET not in result.output
    assert not [p for p in (tmp_path / "dead").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_an_api_teachers_tokens_are_priced_in_the_stage_record(stub, tmp_path, monkeypatch):
    from budget_reasoner.io import read_json

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", stub.url)
    out = tmp_path / "data"
    result = invoke("generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny", "--out", out, *TINY_ARGS,
                    "--token-price", "0.15,0.60")
    assert result.exit_code == 0, result.output
    chains = read_shards(out / "chains")
    prompt_tokens = sum(len(json.dumps(r["body"]["messages"])) for r in stub.requests)  # the stub's usage, by hand
    completion_tokens = sum(len(row["completion"]) for row in chains)
    record = read_json(out / "COMPLETE.json")
    assert (record["prompt_tokens"], record["tokens"]) == (prompt_tokens, completion_tokens)
    assert record["cost_usd"] == pytest.approx((prompt_tokens * 0.15 + completion_tokens * 0.60) / 1e6)
    assert record["token_price_usd_per_million"] == {"prompt": 0.15, "completion": 0.60}
    assert f"{record['cost_usd']:.4f} USD" in result.output
    assert "--token-price" in one_error_line(invoke("generate", "--teacher", "openai:m", "--token-price", "cheap"))
