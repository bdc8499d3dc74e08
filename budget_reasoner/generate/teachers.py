"""Teacher backends for the generate stage: anything with a `.name` and a `.sample` (see budget_reasoner.sampling)
that turns chat prompts into k sampled completions (text, or `Generated` objects that also carry token counts).

- `TransformersTeacher`: a local model (the offline tiny teacher, or any hub checkpoint that fits).
- `OpenAITeacher`: any OpenAI-compatible server (vLLM's `vllm serve`, llama.cpp, a hosted 70B endpoint),
  configured by `BUDGET_REASONER_TEACHER_URL` / `BUDGET_REASONER_TEACHER_KEY`.
"""

from __future__ import annotations

import os

from budget_reasoner.sampling import Generated
from budget_reasoner.sampling.server import ServerSampler, redact, server_url


class TransformersTeacher:
    """A local model. Its samples carry their generated token counts (the chains' `tokens` column)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, redact(name), batch_size
        self.device = next(model.parameters()).device.type  # where the generate stage's peak memory is measured

    def sample(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int,
               seed: int) -> list[list[Generated]]:
        from budget_reasoner.sampling.local import generate_texts, prompt_texts

        return generate_texts(self.model, self.tokenizer, prompt_texts(self.tokenizer, prompts), max_new_tokens, self.batch_size,
                              temperature=temperature, num_samples=num_samples, seed=seed, description="teacher chains")

    def sample_with_tools(self, prompts: list[list[dict]], num_samples: int, temperature: float, max_new_tokens: int,
                          seed: int, tools) -> list[list[Generated]]:
        """As `sample`, each chain's tool calls run as it writes them (tools.py; `tools` a tools.ToolSettings)."""
        from budget_reasoner.tools import sample_locally

        return sample_locally(self.model, self.tokenizer, prompts, num_samples, temperature, max_new_tokens, seed,
                              self.batch_size, tools, description="teacher chains with tools")


class OpenAITeacher(ServerSampler):
    """A model on an OpenAI-compatible server; URL and key from the arguments, else the environment."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 600,
                 concurrency: int = 64, max_retries: int = 5, **retry):
        super().__init__(model, server_url(base_url), api_key or os.environ.get("BUDGET_REASONER_TEACHER_KEY", "EMPTY"), timeout,
                         concurrency, max_retries, **retry)


def is_server_teacher(name: str) -> bool:
    """`openai:MODEL` names a model on the OpenAI-compatible server; anything else loads locally."""
    return name.startswith("openai:")
