"""Chains that call tools: the one call syntax, the runtime that runs calls during generation, and the tokens that
training must not learn.

The syntax (ToRA's and Qwen2.5-Math's tool-integrated reasoning, TIR): inside its chain a model writes a fenced
python block; the fence that closes the block ends the call. The runtime runs the block in the code sandbox
(verify/sandbox.py: its own locked-in process, a short wall clock, output capped), appends what the program printed
in an output block, and generation continues after it:

    <think>
    ```python
    print(4821*529)
    ```
    ```output
    2550309
    ```
    </think>
    \\boxed{2550309}

The output block is the runtime's, never the model's: SFT and DPO give its tokens no loss (`mask_observations`), and
generation stops at the call so the model never writes one. What it holds, one case each:

    a program that ran to its end        what it printed (stdout and stderr, a trailing newline dropped)
    a program that raised                what it printed, then the sandbox's line: `error: ZeroDivisionError:
                                         division by zero (line 1: print(1/0))`
    a hang                               what it printed, then `timeout after 2 s`
    a flood                              its first `tools.output_bytes` bytes, then `output cut at 512 bytes`
    any other end                        what it printed, then the sandbox's verdict (`memory`, `killed by ...`)
    a call past `tools.max_calls`        `not run: this chain already made N tool calls`; the chain ends there
A run of three backticks in the output is written with a space (`` ` ``) so that it cannot close the block early.
A sandbox that cannot start at all is a BudgetReasonerError: every chain would be graded on a broken tool.

`complete_with_tools(generate, texts, ...)` runs the loop over a batch: generate every text until it ends or closes
a call, run the open calls (concurrently), append their outputs, continue those chains, until none has an open call.
`generate` is any function of (texts, per-text token budgets, samples per text, seed) -> Generated lists;
`local_generator` makes one from a local model (sampling/local.py, stopping each row at its call's closing fence).
The OpenAI-server teacher cannot continue a half-written assistant message portably, so tools run on local models.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Sequence

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.sampling import Generated

CALL_OPEN = "```python\n"
OUTPUT_OPEN = "```output\n"
FENCE_CLOSE = "```\n"
# A call: a ```python line, its code, and a closing fence line (its newline, or the end of the text).
_CALL = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*(?:\n|\Z)", re.DOTALL | re.MULTILINE)
# An output block as the runtime writes it (its content can hold no ``` run: `observation` breaks those up).
_OBSERVATION = re.compile(r"```output\n.*?```\n?", re.DOTALL)


@dataclass(frozen=True)
class ToolSettings:
    """How calls run (preset section `tools`, config.ToolsConfig, has the same fields)."""

    max_calls: int = 4  # calls run per completion; the next one ends the chain
    timeout_s: float = 2.0  # wall clock per call
    output_bytes: int = 512  # what the output block keeps of a call's output
    memory_mb: int = 512


def settings_of(config) -> ToolSettings:
    """ToolSettings from a preset's `tools` section (or anything with its fields)."""
    return ToolSettings(config.max_calls, config.timeout_s, config.output_bytes, getattr(config, "memory_mb", 512))


@dataclass
class ToolGenerated(Generated):
    """A completion whose calls were run: `text` holds the output blocks; `tokens` counts the generated tokens only."""

    tool_calls: int = 0  # calls run in the sandbox
    tool_failures: int = 0  # of those, the ones that did not run to their end (error, timeout, flood, ...)


def find_call(text: str) -> re.Match | None:
    """The first complete call in `text` (group 1: its code), or None."""
    return _CALL.search(text)


def call_closed(text: str) -> bool:
    """Whether `text` holds a complete call: where a local generation stops to run it."""
    return _CALL.search(text) is not None


def observation(result, settings: ToolSettings) -> str:
    """The output block for a sandbox result (verify/sandbox.SandboxResult)."""
    if result.sandbox_error:
        raise BudgetReasonerError(f"tool call: the code sandbox does not run here ({result.verdict}); generation with "
                                  f"tools needs it (see budget_reasoner/verify/sandbox.py)")
    printed = result.output
    if result.verdict == "output too large":
        end = f"output cut at {settings.output_bytes} bytes"
    elif result.verdict == "timeout":
        end = f"timeout after {settings.timeout_s:g} s"
    elif result.passed:
        end = ""
    else:
        end = result.verdict
    body = printed[:-1] if printed.endswith("\n") else printed
    body = "\n".join(part for part in (body, end) if part)
    body = re.sub(r"`{3,}", lambda run: " ".join(run.group(0)), body)  # no fence inside the block
    return f"{OUTPUT_OPEN}{body}\n{FENCE_CLOSE}"


def calls_in(completion: str) -> int:
    """The calls a completion ran: its output blocks, less a refused call's."""
    return sum(not block.startswith(f"{OUTPUT_OPEN}not run: ") for block in _OBSERVATION.findall(completion))


def refusal(settings: ToolSettings) -> str:
    return f"{OUTPUT_OPEN}not run: this chain already made {settings.max_calls} tool calls\n{FENCE_CLOSE}"


# Line-buffered output, so that what a call printed before it hung or was killed reaches its output block (a pipe's
# block buffer would hold it back); one line before the call's code, taken off the line numbers errors name.
_PRELUDE = "import sys; sys.stdout.reconfigure(line_buffering=True); sys.stderr.reconfigure(line_buffering=True)\n"


def run_calls(codes: Sequence[str], settings: ToolSettings) -> list[tuple[str, bool]]:
    """Each call's output block and whether the program ran to its end; the programs run concurrently."""
    from dataclasses import replace

    from budget_reasoner.verify.sandbox import run_many

    results = run_many([_PRELUDE + code for code in codes], settings.timeout_s, settings.memory_mb, settings.output_bytes)
    results = [replace(result, verdict=re.sub(r"\(line (\d+):", lambda m: f"(line {int(m[1]) - 1}:", result.verdict))
               for result in results]
    return [(observation(result, settings), result.passed) for result in results]


@dataclass
class _Chain:
    prompt: int  # index of its text
    text: str = ""
    tokens: int = 0
    logprob_sum: float = 0.0
    logprob_tokens: int = 0
    calls: int = 0
    failures: int = 0
    pending: str | None = None  # the code of a call closed but not yet run
    observed: list[str] = field(default_factory=list)

    def absorb(self, sample) -> None:
        """Append a generated segment, cut just after its first call (whose code becomes pending)."""
        text = getattr(sample, "text", sample)
        match = find_call(text)
        if match is not None:
            text = text[: match.end()]
            if not text.endswith("\n"):
                text += "\n"  # the closing fence ended the generation: its line ends before the output block
            self.pending = textwrap.dedent(match.group(1))
        self.text += text
        tokens = getattr(sample, "tokens", None) or 0
        self.tokens += tokens
        mean = getattr(sample, "mean_logprob", None)
        if mean is not None and tokens:
            self.logprob_sum += mean * tokens
            self.logprob_tokens += tokens

    def result(self) -> ToolGenerated:
        mean = self.logprob_sum / self.logprob_tokens if self.logprob_tokens else None
        return ToolGenerated(self.text, mean, self.tokens, tool_calls=self.calls, tool_failures=self.failures)


Generate = Callable[[list[str], list[int], int, int], list[list[Generated]]]


def complete_with_tools(generate: Generate, texts: list[str], num_samples: int, max_new_tokens: int, seed: int,
                        settings: ToolSettings) -> list[list[ToolGenerated]]:
    """`num_samples` completions of each text (a rendered prompt), their calls run and observed, in input order.

    `max_new_tokens` bounds the tokens each completion generates over all its segments (output blocks do not
    count). A chain ends when a segment ends without a call, when its budget is spent (a call closed with the
    last tokens still runs, and the chain ends after its output), or at a call past `settings.max_calls`."""
    chains = [[_Chain(index) for _ in range(num_samples)] for index in range(len(texts))]
    for per_text, samples in zip(chains, generate(texts, [max_new_tokens] * len(texts), num_samples, seed)):
        for chain, sample in zip(per_text, samples):
            chain.absorb(sample)
    flat = [chain for per_text in chains for chain in per_text]
    round_ = 0
    while pending := [chain for chain in flat if chain.pending is not None]:
        round_ += 1
        runnable = [chain for chain in pending if chain.calls < settings.max_calls]
        for chain in pending:
            if chain.calls >= settings.max_calls:  # one call too many: refused, and the chain ends
                chain.text += refusal(settings)
                chain.pending = None
        for chain, (block, passed) in zip(runnable, run_calls([chain.pending for chain in runnable], settings)):
            chain.text += block
            chain.calls += 1
            chain.failures += not passed
            chain.pending = None
        going_on = [chain for chain in runnable if chain.tokens < max_new_tokens]
        if not going_on:
            break
        budgets = [max_new_tokens - chain.tokens for chain in going_on]
        continued = generate([texts[chain.prompt] + chain.text for chain in going_on], budgets, 1, seed + round_)
        for chain, (sample,) in zip(going_on, continued):
            chain.absorb(sample)
    return [[chain.result() for chain in per_text] for per_text in chains]


def local_generator(model, tokenizer, batch_size: int, temperature: float, description: str = "generate") -> Generate:
    """`generate` for complete_with_tools from a local model: each row stops at its call's closing fence, and a row
    with a smaller budget than the batch's largest is cut back to its own."""
    from budget_reasoner.sampling.local import generate_texts

    def generate(texts: list[str], budgets: list[int], num_samples: int, seed: int) -> list[list[Generated]]:
        results = generate_texts(model, tokenizer, texts, max(budgets), batch_size, temperature=temperature,
                                 num_samples=num_samples, seed=seed, stop_when=call_closed, description=description)
        for samples, budget in zip(results, budgets):
            for sample in samples:
                if sample.tokens is not None and sample.tokens > budget:
                    ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"][:budget]
                    sample.text, sample.tokens = tokenizer.decode(ids), budget
        return results

    return generate


def sample_locally(model, tokenizer, prompts: list[list[dict]], num_samples: int, temperature: float,
                   max_new_tokens: int, seed: int, batch_size: int, settings: ToolSettings,
                   description: str = "generate with tools") -> list[list[ToolGenerated]]:
    """Chat prompts -> `num_samples` tool-using completions each, from a local model."""
    from budget_reasoner.sampling.local import prompt_texts

    generate = local_generator(model, tokenizer, batch_size, temperature, description)
    return complete_with_tools(generate, prompt_texts(tokenizer, prompts), num_samples, max_new_tokens, seed, settings)


# ---- Training: output blocks get no loss ------------------------------------------------------------------------


def has_observation(text: str) -> bool:
    return OUTPUT_OPEN in text


def observation_tokens(tokenizer, ids: Sequence[int]) -> list[bool]:
    """For each token of `ids`, whether it lies in an output block: a token belongs to the block when its first
    character does. Found on the text of the tokens decoded one by one (a byte-level token that holds part of a
    character decodes to one replacement character; the ASCII fences are found all the same)."""
    ids = [int(token) for token in ids]
    pieces: dict[int, str] = {}
    for token in set(ids):
        pieces[token] = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    starts, text = [], []
    position = 0
    for token in ids:
        starts.append(position)
        text.append(pieces[token])
        position += len(pieces[token])
    spans = [match.span() for match in _OBSERVATION.finditer("".join(text))]
    inside, span = [], 0
    for start in starts:
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        inside.append(span < len(spans) and spans[span][0] <= start)
    return inside


def mask_observations(collate: Callable, tokenizer, key: str, masked_value: int) -> Callable:
    """A data collator that sets `batch[key]` to `masked_value` on every token inside an output block, after
    `collate` built the batch: SFT's `labels` (-100), DPO's `completion_mask` (0, which TRL 1.16's DPOTrainer turns
    into -100 labels and leaves out of the log-prob sums). Rows without an output block are left as they are."""
    import torch

    def collate_and_mask(examples):
        batch = collate(examples)
        for row, ids in enumerate(batch["input_ids"]):
            inside = observation_tokens(tokenizer, ids.tolist())
            if any(inside):
                batch[key][row][torch.tensor(inside, device=batch[key].device)] = masked_value
        return batch

    collate_and_mask.masks_observations = True
    return collate_and_mask


def mask_encoded(tokenizer, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(ids, completion mask) with 0 on the tokens inside output blocks (the offline bootstrap's own loop)."""
    inside = observation_tokens(tokenizer, ids)
    return ids, [0 if hidden else bit for bit, hidden in zip(mask, inside)]
