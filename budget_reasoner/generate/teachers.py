"""Teacher backends: anything that turns chat prompts into k sampled completions (text, or `Generated`
objects that also carry their token counts).

- `TransformersTeacher`: a local model (the offline tiny teacher, or any hub checkpoint that fits).
- `OpenAITeacher`: any OpenAI-compatible server (vLLM's `vllm serve`, llama.cpp, a hosted 70B endpoint),
  configured by `BUDGET_REASONER_TEACHER_URL` / `BUDGET_REASONER_TEACHER_KEY`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.eval.generation import Generated, generate_texts, prompt_texts


class TransformersTeacher:
    """A local model. Its samples carry their generated token counts (the chains' `tokens` column)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.device = next(model.parameters()).device.type  # where the generate stage's peak memory is measured

    def sample(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int,
               seed: int) -> list[list[Generated]]:
        return generate_texts(self.model, self.tokenizer, prompt_texts(self.tokenizer, prompts), max_new_tokens, self.batch_size,
                              temperature=temperature, num_samples=num_samples, seed=seed, description="teacher chains")


class OpenAITeacher:
    """Chat completions over HTTP, `n` samples per request (the server batches them)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 600):
        self.name = model
        self.base_url = (base_url or os.environ.get("BUDGET_REASONER_TEACHER_URL", "")).rstrip("/")
        self.api_key = api_key or os.environ.get("BUDGET_REASONER_TEACHER_KEY", "EMPTY")
        self.timeout = timeout
        if not self.base_url:
            raise BudgetReasonerError("an OpenAI-compatible teacher needs BUDGET_REASONER_TEACHER_URL (e.g. http://localhost:8000/v1)")

    def sample(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        return [self._complete(messages, num_samples, temperature, max_new_tokens, seed) for messages in prompts]

    def _complete(self, messages, num_samples, temperature, max_new_tokens, seed) -> list[str]:
        body = json.dumps({"model": self.name, "messages": messages, "n": num_samples, "temperature": temperature,
                           "max_tokens": max_new_tokens, "seed": seed}).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError) as error:
            raise BudgetReasonerError(f"teacher server {self.base_url} did not answer: {error}") from None
        choices = sorted(payload.get("choices", []), key=lambda choice: choice.get("index", 0))
        return [_as_chain(choice["message"]) for choice in choices]


def _as_chain(message: dict) -> str:
    """Reasoning servers (DeepSeek-R1 style) return the thought apart from the answer; put it back in our format."""
    reasoning = message.get("reasoning_content")
    return f"<think>\n{reasoning}\n</think>\n{message['content']}" if reasoning else message["content"]


def is_server_teacher(name: str) -> bool:
    """`openai:MODEL` names a model on the OpenAI-compatible server; anything else loads locally."""
    return name.startswith("openai:")
