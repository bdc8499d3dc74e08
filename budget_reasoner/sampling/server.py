"""Sampling from an OpenAI-compatible server (vLLM's `vllm serve`, `transformers serve`, llama.cpp, a hosted API):
chat completions over HTTP, `n` samples per request (the server batches them).

A key can sit in the URL (`https://user:KEY@host/v1`, `https://host/v1?api_key=KEY`); `redact` takes it out of
anything we print or write: errors, model names in the chains' `teacher` column and stage records.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

from budget_reasoner.errors import BudgetReasonerError

# user:password@ after a scheme, and query values whose name says they are secret (api_key, token, sig, ...)
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"<>]+@")
_SECRET_QUERY = re.compile(r"([?&][^=&#\s]*(?:key|token|secret|passw|auth|sig|credential)[^=&#\s]*=)[^&#\s'\"<>]*",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***: fit for errors, logs and files."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", text))


class ServerSampler:
    """Chat completions from `model` on the server at `base_url` (ending in /v1)."""

    def __init__(self, model: str, base_url: str, api_key: str = "EMPTY", timeout: float = 600):
        self.model = model
        self.name = redact(model)  # written to every chain row and the stage record
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def sample(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        return [self._complete(messages, num_samples, temperature, max_new_tokens, seed) for messages in prompts]

    def _endpoint(self) -> str:
        """base/chat/completions, keeping a query (a gateway's ?api_key=) after the path rather than inside it."""
        parts = urllib.parse.urlsplit(self.base_url)
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))

    def _complete(self, messages, num_samples, temperature, max_new_tokens, seed) -> list[str]:
        body = json.dumps({"model": self.model, "messages": messages, "n": num_samples, "temperature": temperature,
                           "max_tokens": max_new_tokens, "seed": seed}).encode()
        try:
            request = urllib.request.Request(self._endpoint(), data=body, method="POST",
                                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts, resets; a malformed URL; a non-JSON answer
            raise BudgetReasonerError(f"teacher server {redact(self.base_url)} did not answer: {redact(str(error))}") from None
        choices = sorted(payload.get("choices", []), key=lambda choice: choice.get("index", 0))
        return [_as_chain(choice["message"]) for choice in choices]


def _as_chain(message: dict) -> str:
    """Reasoning servers (DeepSeek-R1 style) return the thought apart from the answer; put it back in our format."""
    reasoning = message.get("reasoning_content")
    return f"<think>\n{reasoning}\n</think>\n{message['content']}" if reasoning else message["content"]
