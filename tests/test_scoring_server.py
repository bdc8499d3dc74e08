"""Scoring through a server (scoring.ServerScorer): the cache it writes is the local teacher's, and a server that
cannot give prompt log-probs, gives too few, is busy or stops half-way is one line or a retry, with nothing lost.

No server on this machine returns prompt log-probs: `transformers serve` refuses them (transformers 5.24,
cli/serving/utils.py `BaseHandler._validate_request` answers 422 "Unexpected fields in the request" for any field
outside OpenAI's schema, prompt_logprobs included; cli/serving/completion.py `CompletionHandler.handle_request`
takes only a string prompt, 400 "prompt must be a string.", and lists logprobs and echo as ignored). So the server
here is a stub on loopback that answers exactly as vLLM documents (see the comment above ServerScorer in
scoring.py for the files it is read from), its numbers from the tiny offline teacher's own forward pass."""

import json
import re
import threading

import numpy as np
import pytest
import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import detect
from tests.conftest import invoke, one_error_line
from tests.loopback_http import JsonHandler, LoopbackServer
from tests.test_scoring import encoded_rows, preset, teacher_and_data  # noqa: F401 - fixtures

SERVED = "tiny-72b"  # the name the stub serves the teacher under (`vllm serve PATH --served-model-name tiny-72b`)
FAST = {"backoff_seconds": 0.01, "max_backoff_seconds": 0.05}


class PromptLogprobServer(LoopbackServer):
    """POST /v1/completions, GET /v1/models and POST /tokenize as vLLM answers them, from the model in `folder`.

    The completion's `prompt_logprobs` (vllm/v1/engine/logprobs.py `_make_logprob_dict`, serialized as
    completion/protocol.py `CompletionResponseChoice` declares it): None for the first prompt token, then for each
    token p a dict keyed by token id (a JSON string) of {"logprob", "rank", "decoded_token"}, holding the prompt
    token p itself at its true rank and the top-k at ranks 1..k (k + 1 entries when p is not among them),
    log-probs below -9999 clamped to it. `max_logprobs` refuses larger requests with vLLM's 400.

    `fail(number)` for the number-th completion request: None to answer, an HTTP status, or "none" (no
    prompt_logprobs, as a server that ignores the field), "fewer" (only the top-2), "transformers" (the 422
    `transformers serve` sends for the field). `tokenizer` answers /tokenize (default: the model's own)."""

    def __init__(self, folder, fail=lambda number: None, max_logprobs: int = 20, tokenizer=None, max_model_len=128):
        from transformers import AutoModelForCausalLM

        from budget_reasoner.models import load_tokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = load_tokenizer(folder)
        self.served_tokenizer = tokenizer or self.tokenizer
        self.fail, self.max_logprobs, self.max_model_len = fail, max_logprobs, max_model_len
        self.requests, self.outside_top_k, self.lock = [], 0, threading.Lock()
        stub = self

        class Handler(JsonHandler):
            def do_GET(self):
                self.reply(200, {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "vllm",
                                                             "root": str(folder), "max_model_len": max_model_len}]})

            def do_POST(self):
                body = self.body()
                if self.path == "/tokenize":
                    tokens = stub.served_tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    return self.reply(200, {"count": len(tokens["input_ids"]), "max_model_len": max_model_len,
                                            "tokens": tokens["input_ids"]})
                with stub.lock:
                    stub.requests.append(body)
                    number = len(stub.requests)
                failure = stub.fail(number)
                if isinstance(failure, int):
                    return self.error(failure, f"status {failure}", "ServiceUnavailableError")
                if failure == "transformers":
                    return self.reply(422, {"detail": "Unexpected fields in the request: {'prompt_logprobs', "
                                                      "'return_tokens_as_token_ids'}"})
                k = body["prompt_logprobs"]
                if k > stub.max_logprobs:
                    return self.error(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                           f"{stub.max_logprobs}", "BadRequestError")
                entries = None if failure == "none" else stub.prompt_logprobs(body["prompt"], 2 if failure == "fewer" else k)
                self.reply(200, {"id": f"cmpl-{number}", "object": "text_completion", "created": 0, "model": SERVED,
                                 "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                                              "stop_reason": None, "prompt_logprobs": entries}],
                                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1,
                                           "total_tokens": len(body["prompt"]) + 1}})

            def error(self, status, message, kind):
                self.reply(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

        self.start(Handler)

    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        with self.lock, torch.no_grad():  # one forward at a time; requests still overlap in flight
            log_probs = self.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        entries = [None]
        for p in range(1, len(ids)):
            distribution, token = log_probs[p - 1], ids[p]
            rank = int((distribution > distribution[token]).sum()) + 1
            top = distribution.topk(k)
            # the prompt token first, then ranks 1..k: a dict, so a prompt token in the top-k is there once
            made = {token: (float(distribution[token]), rank)}
            made.update({int(i): (float(v), r) for r, (v, i) in enumerate(zip(top.values, top.indices), 1)})
            self.outside_top_k += rank > k
            entries.append({str(i): {"logprob": max(v, -9999.0), "rank": r, "decoded_token": self.tokenizer.decode([i])}
                            for i, (v, r) in made.items()})
        return entries


@pytest.fixture
def serve():
    started = []
    yield lambda folder, **kwargs: started.append(PromptLogprobServer(folder, **kwargs)) or started[-1]
    for server in started:
        server.close()


def sequences(folder) -> list[dict]:
    from budget_reasoner.scoring import read_cache

    return list(read_cache(folder))


def test_the_server_cache_is_the_local_cache(teacher_and_data, preset, serve, tmp_path):
    """Same sequences, positions and top-k ids as the local teacher's cache; log-probs within one float16 step."""
    from budget_reasoner.io import read_json
    from budget_reasoner.train.distill import cache_teacher_topk

    teacher, sft_file = teacher_and_data
    server = serve(teacher)
    preset.generate.concurrency = 4
    local = cache_teacher_topk(teacher, sft_file, tmp_path / "local", preset, detect("cpu"))
    served = cache_teacher_topk(SERVED, sft_file, tmp_path / "served", preset, detect("cpu"), server=server.url,
                                tokenizer_source=teacher)
    for mine, reference in zip(sequences(tmp_path / "served"), sequences(tmp_path / "local"), strict=True):
        for key in ("input_ids", "positions", "topk_ids"):
            assert mine[key].tolist() == reference[key].tolist(), key
        # both are float16 roundings of float32 values that agree to ~1e-6: at most one step (2**-10 relative) apart
        np.testing.assert_allclose(mine["topk_logprobs"].astype(np.float32), reference["topk_logprobs"].astype(np.float32),
                                   rtol=2**-10, atol=1e-6)
    manifest = read_json(tmp_path / "served" / "COMPLETE.json")
    assert manifest["teacher"] == SERVED and manifest["device"] == f"server {server.url}"
    for key in ("top_k", "temperature", "tokenizer_hash", "source_data", "examples", "cached_positions", "bytes_per_token"):
        assert manifest[key] == local[key] == served[key], key
    ids = [ids for ids, _ in encoded_rows(teacher, sft_file)]
    assert sorted(map(tuple, (r["prompt"] for r in server.requests))) == sorted(map(tuple, ids))  # one request each
    assert server.requests[0] | {"prompt": None} == {"model": SERVED, "prompt": None, "max_tokens": 1, "temperature": 1.0,
                                                     "prompt_logprobs": 4, "return_tokens_as_token_ids": True}
    assert server.outside_top_k > 0  # dicts of k + 1 entries (the prompt token outside the top-k) were read right


def test_busy_answers_are_retried(teacher_and_data, serve):
    """429 then 503, then the answer: two retries, and the scores are the local teacher's (top-k and the
    log-prob of each next token)."""
    from transformers import AutoModelForCausalLM

    from budget_reasoner.models import load_tokenizer
    from budget_reasoner.scoring import LocalScorer, ServerScorer

    teacher, sft_file = teacher_and_data
    server = serve(teacher, fail=lambda number: {1: 429, 2: 503}.get(number))
    encoded = encoded_rows(teacher, sft_file)[:1]
    scorer = ServerScorer(SERVED, server.url, max_retries=2, **FAST)
    (mine,) = scorer.score(encoded, 5)
    (reference,) = LocalScorer(AutoModelForCausalLM.from_pretrained(teacher), load_tokenizer(teacher).pad_token_id).score(encoded, 5)
    assert scorer.retries == 2 and len(server.requests) == 3
    assert mine.first_position == reference.first_position and mine.topk_ids.tolist() == reference.topk_ids.tolist()
    torch.testing.assert_close(mine.topk_logprobs, reference.topk_logprobs, rtol=0, atol=1e-5)
    # the sampled token's own log-prob (on-policy distillation's input), top-k or not: the server's dict carries it
    torch.testing.assert_close(mine.token_logprobs, reference.token_logprobs, rtol=0, atol=1e-5)


# what the server does, and what the one line must say (the preset's top-k is 4)
REFUSALS = [
    ("none", "its answer has no prompt_logprobs; scoring needs 4 prompt log-probs a position: serve the teacher with "
             "vLLM, `vllm serve MODEL --max-logprobs 20`"),
    # the top-2, and the prompt token when its rank is 3 or 4
    ("fewer", "returned [23] log-probs at a position, 4 asked for; scoring needs 4 prompt log-probs a position"),
    ("capped", "HTTP 400 (Requested prompt logprobs of 4, which is greater than max allowed: 2): scoring needs 4 "
               "prompt log-probs a position: serve the teacher with vLLM, `vllm serve MODEL --max-logprobs 20`"),
    ("transformers", "HTTP 422 (Unexpected fields in the request: {'prompt_logprobs', 'return_tokens_as_token_ids'}): "
                     "it takes no prompt_logprobs or no token-id prompt; scoring needs 4 prompt log-probs a position"),
]


@pytest.mark.parametrize("failure, said", REFUSALS, ids=[failure for failure, _ in REFUSALS])
def test_a_server_without_enough_prompt_logprobs_is_one_line_naming_the_flag(teacher_and_data, serve, tmp_path,
                                                                             failure, said):
    teacher, sft_file = teacher_and_data
    server = serve(teacher, max_logprobs=2) if failure == "capped" else serve(teacher, fail=lambda number: failure)
    line = one_error_line(invoke("cache", "--teacher", SERVED, "--server", server.url, "--tokenizer", teacher,
                                 "--data", sft_file, "--out", tmp_path / "cache", "--top-k", 4, "--preset", "cpu-tiny"))
    assert line.startswith(f"error: teacher server {server.url} (model {SERVED}): "), line
    assert re.search(re.escape(said).replace(re.escape("[23]"), "[23]"), line), line
    assert len(server.requests) <= 64  # not retried: every request of the first batch, none sent again


def test_an_interrupted_server_cache_resumes_with_nothing_lost(teacher_and_data, preset, serve, tmp_path):
    """The server stops answering after the first shard (8 sequences): one line; the shard stays. The same cache
    against a server that answers (another URL: it is not part of the cache's fingerprint) finishes the rest."""
    from budget_reasoner.train.distill import cache_teacher_topk

    teacher, sft_file = teacher_and_data
    preset.generate.max_retries = 0
    cache = tmp_path / "cache"
    broken = serve(teacher, fail=lambda number: 503 if number > 8 else None)
    with pytest.raises(BudgetReasonerError, match="HTTP 503 \\(status 503\\) on all 1 tries"):
        cache_teacher_topk(SERVED, sft_file, cache, preset, detect("cpu"), server=broken.url, tokenizer_source=teacher)
    (first,) = sorted(cache.glob("shard-*.safetensors"))
    kept = (first.read_bytes(), first.stat().st_mtime_ns)
    assert not (cache / "COMPLETE.json").exists()

    healthy = serve(teacher)
    info = cache_teacher_topk("openai:" + SERVED, sft_file, cache, preset, detect("cpu"), server=healthy.url,
                              tokenizer_source=teacher)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept
    assert len(healthy.requests) == info["examples"] - 8  # only the sequences not yet cached
    cache_teacher_topk(teacher, sft_file, tmp_path / "local", preset, detect("cpu"))
    for mine, reference in zip(sequences(cache), sequences(tmp_path / "local"), strict=True):
        assert mine["topk_ids"].tolist() == reference["topk_ids"].tolist()


def test_a_server_with_another_tokenizer_is_one_line_before_anything_is_scored(teacher_and_data, preset, serve,
                                                                                 tmp_path):
    from budget_reasoner.models import build_tokenizer
    from budget_reasoner.train.distill import cache_teacher_topk

    teacher, sft_file = teacher_and_data
    other = build_tokenizer(["What is 1+1?"] * 5, vocab_size=280)
    server = serve(teacher, tokenizer=other)
    with pytest.raises(BudgetReasonerError, match=f"\\(model {SERVED}\\): tokenizes differently from {teacher} "
                                                  f"\\(the first sequence: \\d+ tokens there"):
        cache_teacher_topk(SERVED, sft_file, tmp_path / "cache", preset, detect("cpu"),
                           server=server.url, tokenizer_source=teacher)
    assert server.requests == []


def test_sequences_longer_than_the_served_context_are_refused_first(teacher_and_data, preset, serve, tmp_path):
    from budget_reasoner.train.distill import cache_teacher_topk

    teacher, sft_file = teacher_and_data
    server = serve(teacher, max_model_len=20)
    with pytest.raises(BudgetReasonerError, match=f"{sft_file}: \\d+ of 21 examples are longer than the teacher's 19 positions"):
        cache_teacher_topk(SERVED, sft_file, tmp_path / "cache", preset, detect("cpu"), server=server.url,
                           tokenizer_source=teacher)
    assert server.requests == []


# ---- a cache folder from other inputs, a checkpoint with missing or damaged files (issue #14's bad input) -----

def test_a_cache_folder_made_with_another_k_data_or_tokenizer_is_refused_in_one_line(teacher_and_data, preset, serve,
                                                                                     tmp_path):
    """Resuming into a cache made from other inputs would mix them: one line naming the folder and what differs."""
    from budget_reasoner.train.distill import cache_teacher_topk

    teacher, sft_file = teacher_and_data
    cache = tmp_path / "cache"
    cache_teacher_topk(teacher, sft_file, cache, preset, detect("cpu"))
    before = {path.name: path.read_bytes() for path in cache.iterdir()}
    preset.distill.top_k = 3
    with pytest.raises(BudgetReasonerError, match=f"^{cache} holds teacher top-k cache output made from other inputs "
                                                  f"or settings \\(differs: settings.distill.top_k\\); pass a new --out"):
        cache_teacher_topk(teacher, sft_file, cache, preset, detect("cpu"))
    preset.distill.top_k = 4
    other = tmp_path / "other.jsonl"
    other.write_text("".join(sft_file.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(BudgetReasonerError, match="differs: inputs.data\\)"):
        cache_teacher_topk(teacher, other, cache, preset, detect("cpu"))
    server = serve(teacher)
    served = tmp_path / "served"
    cache_teacher_topk(SERVED, sft_file, served, preset, detect("cpu"), server=server.url, tokenizer_source=teacher)
    with pytest.raises(BudgetReasonerError, match="differs: inputs.tokenizer\\)"):
        cache_teacher_topk(SERVED, sft_file, served, preset, detect("cpu"), server=server.url,
                           tokenizer_source=tmp_path / "other-tokenizer")
    assert {path.name: path.read_bytes() for path in cache.iterdir()} == before  # nothing of it touched


def sharded_checkpoint(teacher, folder):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(teacher).save_pretrained(folder, max_shard_size="20KB")
    return sorted(folder.glob("model-*.safetensors"))


def test_a_checkpoint_shard_cut_short_is_one_line_naming_it_before_scoring(teacher_and_data, tmp_path):
    """A download that stopped part-way: the file is there, its tensors are not all in it."""
    from budget_reasoner.scoring import LayerStreamedScorer

    teacher, _ = teacher_and_data
    shards = sharded_checkpoint(teacher, tmp_path / "sharded")
    shards[1].write_bytes(shards[1].read_bytes()[:-100])
    with pytest.raises(BudgetReasonerError, match=f"^{shards[1]}: cut short \\(.* bytes, its tensors need "):
        LayerStreamedScorer(tmp_path / "sharded", 0)
    shards[1].write_bytes(shards[1].read_bytes()[:5])  # not even a header
    with pytest.raises(BudgetReasonerError, match=f"^{shards[1]}: not a safetensors file"):
        LayerStreamedScorer(tmp_path / "sharded", 0)


def test_a_tensor_the_index_lists_but_no_shard_holds_is_one_line(teacher_and_data, tmp_path):
    """An index from one download and shards from another: found when the folder is opened, not at that layer."""
    from budget_reasoner.scoring import LayerStreamedScorer

    teacher, _ = teacher_and_data
    sharded_checkpoint(teacher, tmp_path / "sharded")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name, file = next(iter(sorted(data["weight_map"].items())))
    other = next(f for f in sorted(set(data["weight_map"].values())) if f != file)
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    with pytest.raises(BudgetReasonerError, match=f"^{tmp_path / 'sharded' / other}: has no tensor {name} \\(listed "
                                                  f"there in {index}\\)"):
        LayerStreamedScorer(tmp_path / "sharded", 0)
