"""Sampling from an OpenAI-compatible server (vLLM's `vllm serve`, `transformers serve`, llama.cpp, a hosted API).

A server is fast only when it is busy: vLLM and `transformers serve --continuous-batching` batch the requests
that are in flight at the same time, so one request at a time leaves them idle. `ServerSampler.sample` keeps up
to `concurrency` chat-completion requests in flight and returns the results in prompt order, as if it had sent
them one by one. The HTTP side (`OpenAIClient`) is shared with scoring.ServerScorer, which asks a vLLM server for
prompt log-probs instead of chains. What can go wrong with a remote server is handled per request:

- 429, 5xx, timeouts, refused or reset connections, malformed JSON and empty choice lists are retried
  `max_retries` times, waiting 1, 2, 4, ... s (capped, with jitter so that many threads do not retry in step;
  a server's Retry-After is honoured). After the last try: one line saying what was tried.
- 401/403 (the key), 404 (the model or path), 400/422 (a request the server refuses) are not retried: retrying
  cannot fix them.
- A server that answers fewer choices than `n` (llama.cpp, Ollama, `transformers serve`, several hosted APIs
  return one) is found on the first request, said once, and sent one request per sample from then on.
- Token counts come from the server's `usage` (prompt and completion); a request that carried several choices
  has one `usage` for all of them, split evenly over its choices so that sums stay exact.

The key goes only into the Authorization header. A key can also sit in the URL (`https://user:KEY@host/v1`,
`https://host/v1?api_key=KEY`); `redact` takes it out of anything we print or write (errors, model names in the
chains' `teacher` column, stage records), and any text a server sends back is scrubbed of the key too.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.progress import progress_bar, say
from budget_reasoner.sampling import Generated

# user:password@ after a scheme, and query values whose name says they are secret (api_key, token, sig, ...)
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"<>]+@")
_SECRET_QUERY = re.compile(r"([?&][^=&#\s]*(?:key|token|secret|passw|auth|sig|credential)[^=&#\s]*=)[^&#\s'\"<>]*",
                           re.IGNORECASE)

RETRIED_STATUS = {408, 409, 425, 429}  # and every 5xx: the server is busy, restarting or overloaded


def server_url(base_url: str | None = None) -> str:
    """The server's base URL: `base_url`, else BUDGET_REASONER_TEACHER_URL; refused in one line without a scheme."""
    base_url = base_url or os.environ.get("BUDGET_REASONER_TEACHER_URL", "")
    if not base_url:
        raise BudgetReasonerError("an OpenAI-compatible teacher needs BUDGET_REASONER_TEACHER_URL (e.g. http://localhost:8000/v1)")
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        # not echoed: without a scheme we cannot tell which part of it is a key
        raise BudgetReasonerError("BUDGET_REASONER_TEACHER_URL must start with http:// or https:// (e.g. http://localhost:8000/v1)")
    return base_url


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***: fit for errors, logs and files."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", text))


class _Retry(Exception):
    """A failure worth another try (the server is busy, slow, restarting or answered garbage)."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.what, self.retry_after = what, retry_after


@dataclass(frozen=True)
class _Job:
    prompt: int  # index into the prompts
    first_sample: int  # the sample index of its first choice
    n: int  # choices asked for


class OpenAIClient:
    """The HTTP side of a model on an OpenAI-compatible server, shared by every client of one (the chains teacher
    below, scoring.ServerScorer's prompt log-probs): POST a JSON body to base/PATH with the retries, backoff,
    error lines and key scrubbing the module describes; `concurrency` is how many requests a client keeps in flight."""

    def __init__(self, model: str, base_url: str, api_key: str = "EMPTY", timeout: float = 600, concurrency: int = 64,
                 max_retries: int = 5, backoff_seconds: float = 1.0, max_backoff_seconds: float = 60.0):
        self.model = model
        self.name = redact(model)  # written to every chain row and the stage record
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout, self.concurrency, self.max_retries = timeout, concurrency, max_retries
        self.backoff_seconds, self.max_backoff_seconds = backoff_seconds, max_backoff_seconds
        self.retries = 0  # requests sent again after a retryable failure, over this client's life
        self.peak_in_flight = 0  # the most requests that were waiting on the server at once
        self._in_flight = 0
        self._lock = threading.Lock()

    def _request(self, path: str, body: dict, parse):
        """POST `body` to base/`path` and return `parse(raw answer)`, retried as the module says (`parse` raises
        `_Retry` for an answer worth asking again, a BudgetReasonerError for one that no retry can fix)."""
        started = time.monotonic()
        for attempt in range(self.max_retries + 1):
            try:
                return parse(self._post(path, body))
            except _Retry as failure:
                last = failure
                if attempt == self.max_retries:
                    break
                with self._lock:
                    self.retries += 1
                wait = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt) * random.uniform(0.5, 1.0)
                if failure.retry_after is not None:
                    wait = max(wait, min(failure.retry_after, self.max_backoff_seconds))
                time.sleep(wait)
        raise BudgetReasonerError(
            f"{self._where()}: {last.what} on all {self.max_retries + 1} tries over {time.monotonic() - started:.0f} s "
            f"(429, 5xx, timeouts of {self.timeout:g} s, refused connections and malformed answers are retried "
            f"generate.max_retries={self.max_retries} times with exponential backoff)")

    def _post(self, path: str, body: dict) -> bytes:
        """One request: the answer's bytes, or `_Retry`, or a BudgetReasonerError for what no retry can fix."""
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            request = urllib.request.Request(self._url(path), data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {self.api_key}"})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise self._http_failure(error, path) from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise _Retry(f"no answer within {self.timeout:g} s (timed out)") from None
            if isinstance(reason, ValueError):  # urllib's "unknown url type" and the like
                raise BudgetReasonerError(f"{self._where()}: not a usable URL ({self._scrub(str(reason))})") from None
            raise _Retry(f"no answer ({self._scrub(str(reason)) or type(reason).__name__})") from None
        except ValueError as error:  # a URL urllib cannot parse
            raise BudgetReasonerError(f"{self._where()}: not a usable URL ({self._scrub(str(error))})") from None
        finally:
            with self._lock:
                self._in_flight -= 1

    def _http_failure(self, error: urllib.error.HTTPError, path: str) -> Exception:
        said = self._server_message(error)
        status = f"HTTP {error.code}{f' ({said})' if said else ''}"
        if error.code in RETRIED_STATUS or error.code >= 500:
            retry_after = error.headers.get("Retry-After") if error.headers else None
            return _Retry(status, float(retry_after) if retry_after and retry_after.isdigit() else None)
        if error.code in (401, 403):
            why = "the key was refused: set BUDGET_REASONER_TEACHER_KEY to a key this server accepts"
        elif error.code == 404:
            served = self._served_models()
            why = (f"the server has no model {self.name!r} or no /{path} under this URL"
                   + (f"; it serves: {', '.join(served)}" if served else ""))
        else:
            why = self._refusal(said)
        return BudgetReasonerError(f"{self._where()}: {status}: {why}")

    def _refusal(self, said: str) -> str:
        """What a 400/422 means to this client (the server's own words are already in the line)."""
        return "the server refused the request"

    def _server_message(self, error: urllib.error.HTTPError) -> str:
        """The server's own explanation (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), one line, no key."""
        try:
            text = error.read(2000).decode("utf-8", "replace")
        except OSError:
            return ""
        try:
            data = json.loads(text)
            found = data.get("error", data.get("detail", text)) if isinstance(data, dict) else text
            text = found.get("message", json.dumps(found)) if isinstance(found, dict) else str(found)
        except ValueError:
            pass
        return self._scrub(" ".join(text.split()))[:200]

    def _served_models(self) -> list[str]:
        """GET /models, for the 404 line; nothing when the server does not say."""
        return [self._scrub(str(entry["id"])) for entry in self._models()][:10]

    def _models(self) -> list[dict]:
        """GET /models: the server's model cards (vLLM's carry `max_model_len`); empty when it does not answer."""
        request = urllib.request.Request(self._url("models"), headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10)) as response:
                return [entry for entry in json.loads(response.read())["data"] if isinstance(entry, dict) and "id" in entry]
        except Exception:  # noqa: BLE001 - only a hint for an error line, or a check that is skipped without it
            return []

    def _url(self, path: str) -> str:
        """base/PATH, keeping a query (a gateway's ?api_key=) after the path rather than inside it. A PATH that
        starts with / is from the server's root, beside /v1 (vLLM's /tokenize)."""
        parts = urllib.parse.urlsplit(self.base_url)
        base = parts.path.rstrip("/")
        if path.startswith("/"):
            return urllib.parse.urlunsplit(parts._replace(path=base.removesuffix("/v1") + path))
        return urllib.parse.urlunsplit(parts._replace(path=base + "/" + path))

    def _where(self) -> str:
        return f"teacher server {redact(self.base_url)} (model {self.name})"

    def _scrub(self, text: str) -> str:
        """Server text without our key: some servers echo the key they refused."""
        text = redact(text)
        return text.replace(self.api_key, "***") if len(self.api_key) >= 8 else text


class ServerSampler(OpenAIClient):
    """Chat completions from `model` on the server at `base_url` (ending in /v1), many requests at once."""

    def __init__(self, model: str, base_url: str, api_key: str = "EMPTY", timeout: float = 600, concurrency: int = 64,
                 max_retries: int = 5, backoff_seconds: float = 1.0, max_backoff_seconds: float = 60.0):
        super().__init__(model, base_url, api_key, timeout, concurrency, max_retries, backoff_seconds,
                         max_backoff_seconds)
        self.honours_n: bool | None = None  # unknown until the first request that asks for several choices

    def sample(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int,
               seed: int) -> list[list[Generated]]:
        """`num_samples` completions of each chat prompt, in prompt order. Sample k of a prompt is asked with seed
        `seed + k` (choices of one request share the request's seed, as the server numbers them)."""
        results: list[list[Generated | None]] = [[None] * num_samples for _ in prompts]

        def ask(job: _Job) -> list[Generated]:
            return self._complete(prompts[job.prompt], job.n, temperature, max_new_tokens, seed + job.first_sample)

        jobs = self._plan(range(len(prompts)), num_samples)
        if prompts and num_samples > 1 and self.honours_n is None:
            # the first request tells whether this server honours n; the rest are planned by its answer
            jobs = [job for job in jobs if job.prompt != 0]
            answered = ask(_Job(0, 0, num_samples))
            self.honours_n = len(answered) >= num_samples
            if not self.honours_n:
                say(f"teacher server {redact(self.base_url)} answered {len(answered)} of {num_samples} choices asked "
                    f"for (it ignores `n`): sending one request per sample from now on")
            results[0][: len(answered)] = answered[:num_samples]
            jobs = [_Job(0, k, 1) for k in range(len(answered), num_samples)] + self._plan(range(1, len(prompts)),
                                                                                         num_samples)
        with progress_bar() as bar:
            task = bar.add_task(f"requests to {self.name}", total=len(jobs))
            for job, answered in _concurrently(jobs, self._filled(ask), self.concurrency):
                results[job.prompt][job.first_sample : job.first_sample + job.n] = answered
                bar.advance(task)
        return results  # every slot filled: _filled tops a short answer up

    def _plan(self, prompt_indices, num_samples: int) -> list[_Job]:
        if num_samples == 1 or self.honours_n:
            return [_Job(i, 0, num_samples) for i in prompt_indices]
        return [_Job(i, k, 1) for i in prompt_indices for k in range(num_samples)]

    def _filled(self, ask):
        """`ask`, topped up with one-choice requests when a server that honoured n once answers fewer."""
        def fill(job: _Job) -> list[Generated]:
            answered = ask(job)[: job.n]
            while len(answered) < job.n:
                answered += ask(_Job(job.prompt, job.first_sample + len(answered), 1))[:1]
            return answered
        return fill

    def _complete(self, messages: list[dict], n: int, temperature: float, max_new_tokens: int, seed: int) -> list[Generated]:
        """One chat completion with `n` choices, retried as the module says; its choices in index order."""
        body = {"model": self.model, "messages": messages, "n": n, "temperature": temperature,
                "max_tokens": max_new_tokens, "seed": seed}
        return self._request("chat/completions", body, self._choices)

    def _choices(self, raw: bytes) -> list[Generated]:
        try:
            payload = json.loads(raw)
            choices = sorted(payload["choices"], key=lambda choice: choice.get("index", 0))
            texts = [_as_chain(choice["message"]) for choice in choices]
            if not all(isinstance(text, str) for text in texts):
                raise TypeError("a choice without text content")
        except (ValueError, KeyError, TypeError, AttributeError):
            excerpt = self._scrub(raw[:80].decode("utf-8", "replace")).replace("\n", " ")
            raise _Retry(f"a malformed answer, not a chat completion ({excerpt!r})") from None
        if not texts:
            raise _Retry("an empty choice list")
        usage = payload.get("usage") or {}
        completion = _shares(usage.get("completion_tokens"), len(texts))
        prompt = _shares(usage.get("prompt_tokens"), len(texts))
        return [Generated(text, None, tokens, prompt_tokens) for text, tokens, prompt_tokens in zip(texts, completion, prompt)]


def _concurrently(jobs: list, function, workers: int):
    """(job, function(job)) for every job, as each finishes, with up to `workers` calls running at once.

    Daemon threads, not a ThreadPoolExecutor: on an error or Ctrl-C this returns at once, and requests still
    waiting on a hung server end with the process instead of holding its exit for their whole timeout."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)
    done: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work():
        while not stop.is_set():
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((job, function(job), None))
            except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
                done.put((job, None, error))

    for _ in range(min(workers, len(jobs))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in jobs:
            job, result, error = done.get()
            if error is not None:
                raise error
            yield job, result
    finally:
        stop.set()


def _shares(total: int | None, parts: int) -> list[int | None]:
    """`total` split into `parts` integers that sum to it (None when the server sent no count)."""
    if total is None:
        return [None] * parts
    base, extra = divmod(int(total), parts)
    return [base + (index < extra) for index in range(parts)]


def _as_chain(message: dict) -> str:
    """Reasoning servers (DeepSeek-R1 style) return the thought apart from the answer; put it back in our format."""
    reasoning = message.get("reasoning_content")
    return f"<think>\n{reasoning}\n</think>\n{message['content']}" if reasoning else message["content"]
