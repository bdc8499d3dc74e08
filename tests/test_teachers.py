"""The OpenAI-compatible teacher against a stub server speaking the chat-completions protocol, and a whole
quickstart whose teacher is that server."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.generate.teachers import OpenAITeacher
from tests.conftest import TINY, ScriptedTeacher


class StubServer:
    """POST /v1/chat/completions: `n` choices, shuffled in order (the protocol numbers them), index 0 the scripted
    right chain and the others wrong; with `reasoning=True` the thought comes apart, as R1-style servers send it."""

    def __init__(self, reasoning: bool = False):
        self.requests, self.reasoning = [], reasoning
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                chains = ScriptedTeacher().sample([body["messages"]], body["n"], 0, 0, 0)[0]
                choices = [{"index": i, "message": stub.message(chain)} for i, chain in enumerate(chains)][::-1]
                payload = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def message(self, chain: str) -> dict:
        if not self.reasoning:
            return {"role": "assistant", "content": chain}
        thought, _, answer = chain.partition("</think>\n")
        return {"role": "assistant", "reasoning_content": thought.removeprefix("<think>\n").rstrip("\n"), "content": answer}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


def test_the_server_teacher_speaks_the_protocol(stub):
    teacher = OpenAITeacher("Qwen/Qwen2.5-72B-Instruct", base_url=stub.url, api_key="sk-test")
    prompts = [[{"role": "user", "content": "3+4*2"}], [{"role": "user", "content": "(12+7)*3-5"}]]
    samples = teacher.sample(prompts, num_samples=3, temperature=0.8, max_new_tokens=64, seed=7)
    assert samples == ScriptedTeacher().sample(prompts, 3, 0, 0, 0)  # choices put back in index order
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"] == {"model": "Qwen/Qwen2.5-72B-Instruct", "messages": prompts[0], "n": 3,
                               "temperature": 0.8, "max_tokens": 64, "seed": 7}


def test_a_reasoning_servers_separate_thought_is_put_back_in_the_chain_format():
    server = StubServer(reasoning=True)
    try:
        prompts = [[{"role": "user", "content": "(12+7)*3-5"}]]
        samples = OpenAITeacher("r1", base_url=server.url).sample(prompts, 2, 0.6, 64, 0)
        assert samples == ScriptedTeacher().sample(prompts, 2, 0, 0, 0)
    finally:
        server.close()


def test_a_missing_or_silent_server_is_one_line(monkeypatch):
    monkeypatch.delenv("BUDGET_REASONER_TEACHER_URL", raising=False)
    with pytest.raises(BudgetReasonerError, match="needs BUDGET_REASONER_TEACHER_URL"):
        OpenAITeacher("m")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BudgetReasonerError, match=f"teacher server http://127.0.0.1:{port}/v1 did not answer"):
        OpenAITeacher("m", base_url=f"http://127.0.0.1:{port}/v1", timeout=5).sample([[{"role": "user", "content": "1+1"}]], 1, 0, 8, 0)


def test_quickstart_with_a_server_teacher_skips_logit_distillation(stub, tmp_path, monkeypatch, capfd):
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", stub.url)
    preset = load_preset("cpu-tiny", {**TINY, "model.teacher": "openai:stub-72b"})
    results = recipe.quickstart(tmp_path / "run", preset)
    assert set(results["stages"]) == {"base", "sft", "dpo"} and results["teacher"] == {}
    assert "distill: skipped, the teacher is a server" in capfd.readouterr().err
    assert len(stub.requests) == preset.generate.num_train_problems  # one request (n chains) per problem
    assert results["generate"]["device"] == "server" and results["generate"]["peak_memory_bytes"] is None
    chains = [json.loads(line) for path in sorted((tmp_path / "run" / "data" / "chains").glob("*.jsonl"))
              for line in path.read_text().splitlines()]
    assert all(row["teacher"] == "stub-72b" and row["tokens"] is None for row in chains)
    assert "| dpo |" in (tmp_path / "run" / "report.md").read_text()


SECRET = "sk-live-0123456789"


def test_redact_takes_credentials_out_of_urls_and_keeps_the_rest():
    from budget_reasoner.sampling.server import redact

    assert redact(f"http://user:{SECRET}@gpu-box:8000/v1") == "http://***@gpu-box:8000/v1"
    assert redact(f"https://host/v1?api_key={SECRET}&api-version=2024-06") == "https://host/v1?api_key=***&api-version=2024-06"
    assert redact(f"error at https://h/v1?x=1&Token={SECRET}#a, retry") == "error at https://h/v1?x=1&Token=***#a, retry"
    assert redact("http://localhost:8000/v1 and Qwen/Qwen2.5-7B-Instruct") == "http://localhost:8000/v1 and Qwen/Qwen2.5-7B-Instruct"


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@127.0.0.1:{{port}}/v1", f"http://127.0.0.1:{{port}}/v1?api_key={SECRET}"])
def test_a_key_in_the_url_is_not_in_the_error_line(url):
    url = url.format(port=_dead_port())
    with pytest.raises(BudgetReasonerError, match="did not answer") as error:
        OpenAITeacher("m", base_url=url, timeout=5).sample([[{"role": "user", "content": "1+1"}]], 1, 0, 8, 0)
    assert SECRET not in str(error.value) and "***" in str(error.value)
    with pytest.raises(BudgetReasonerError, match="must start with http") as error:
        OpenAITeacher("m", base_url=f"user:{SECRET}@127.0.0.1:8000/v1")
    assert SECRET not in str(error.value)


def test_a_query_key_reaches_the_server_and_nothing_the_run_writes_or_prints(stub, tmp_path, monkeypatch):
    """generate through the CLI with the key in the URL's query: the server gets it, the output folder and the
    terminal never show it; a dead server with the key in user:key@ form is one line without it."""
    from typer.testing import CliRunner

    from budget_reasoner.cli import app

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", f"{stub.url}?api_key={SECRET}")
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny", "--out", str(out),
                                      *overrides])
    assert result.exit_code == 0, result.output
    assert stub.requests and all(r["path"] == f"/v1/chat/completions?api_key={SECRET}" for r in stub.requests)
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.parent.name == "chains" for path in written)
    assert not [path for path in written if SECRET.encode() in path.read_bytes()]
    assert SECRET not in result.output

    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", f"http://user:{SECRET}@127.0.0.1:{_dead_port()}/v1")
    result = CliRunner().invoke(app, ["generate", "--teacher", "openai:stub-72b", "--preset", "cpu-tiny",
                                      "--out", str(tmp_path / "dead"), *overrides])
    assert result.exit_code == 2 and "did not answer" in result.output and SECRET not in result.output, result.output
    assert not [p for p in (tmp_path / "dead").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
