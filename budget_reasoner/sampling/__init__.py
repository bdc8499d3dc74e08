"""Sampling: the one place that turns chat prompts into sampled completions with their token counts.

Two samplers behind one call, `sample(prompts, num_samples, temperature, max_new_tokens, seed)` ->
`num_samples` `Generated` per prompt, in prompt order:

- `sampling.local`: a model loaded here, on the transformers backend (the offline teacher, eval, a student's own
  samples for self-play and RL).
- `sampling.server`: any OpenAI-compatible server (vLLM, `transformers serve`, llama.cpp, a hosted API), many
  requests in flight, retried, with the server's own token counts.
- `sampling.loopback`: a real such server on this machine (`transformers serve` on a loopback port), to try
  and test the server path offline.

Generate, eval and the RL stages all call these; none of them imports another stage to sample. This module
imports neither torch nor transformers, so a server sampler starts without them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generated:
    text: str
    mean_logprob: float | None  # average log-prob of the generated tokens under the sampling distribution (local only)
    tokens: int | None  # generated tokens, the stop token included (a server's: its `usage` count)
    prompt_tokens: int | None = None  # the prompt tokens a server billed for this completion (its share of them)
    # the sampled token ids, the stop token included (local only): what on-policy training scores and trains on,
    # since decoding and re-encoding the text need not give the same tokens back
    token_ids: list[int] | None = None


def chat_prompt(question: str, instruction: str = "") -> list[dict]:
    content = f"{question}\n{instruction}".strip() if instruction else question
    return [{"role": "user", "content": content}]
