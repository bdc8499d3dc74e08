"""`budget-reasoner chat`: ask the trained reasoner questions in a terminal.

The reply streams as the model writes it, its thinking (between `<think>` and `</think>`) dimmed, or hidden with
`hide_thinking`; then the final answer the domain's verifier extracts. Decoding is the recipe's eval decoding
(sampling.local's greedy config, the checkpoint's own sampling defaults off), so a held-out question gets the
answer the run's eval recorded. With `think_budget` the thinking is budget-forced (eval.budget_forcing): it runs
in rounds, so that reply prints when it is complete. Each question is answered on its own, as the model was
trained (one question per conversation).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

from budget_reasoner.progress import say
from budget_reasoner.sampling import chat_prompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")


@dataclass
class ChatOptions:
    stage: str | None = None  # of a run folder (default: its last trained stage)
    hide_thinking: bool = False
    think_budget: int = 0  # budget forcing: at most this many thinking tokens (0: off)
    max_new_tokens: int | None = None  # default: the eval setting the model was measured with
    preset: str | None = None


class ThinkingDisplay:
    """Prints streamed text, dimming (or hiding) what lies between <think> and </think>. A tag can arrive split over
    pieces ("<th", "ink>"), so text that could be the start of a tag waits for the next piece."""

    def __init__(self, console: Console, hide_thinking: bool):
        self.console, self.hide = console, hide_thinking
        self.thinking, self.pending, self.shown_hidden_note = False, "", False

    def feed(self, piece: str) -> None:
        text = self.pending + piece
        self.pending = ""
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            index = text.find(tag)
            if index >= 0:
                self._emit(text[:index + (len(tag) if self.thinking else 0)])
                self.thinking = not self.thinking
                text = text[index + (0 if self.thinking else len(tag)):]
                continue
            keep = next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)
            self._emit(text[: len(text) - keep])
            self.pending = text[len(text) - keep:]
            break

    def finish(self) -> None:
        self._emit(self.pending)
        self.pending = ""
        self.console.print()

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.thinking and self.hide:
            if not self.shown_hidden_note:
                self.console.print(Text("(thinking...)", style="dim italic"), end="")
                self.shown_hidden_note = True
            return
        self.console.print(Text(text, style="dim" if self.thinking else ""), end="")


class Chat:
    """A loaded model and how to prompt it; `reply(question)` streams one answer to the console."""

    def __init__(self, path: str | Path, options: ChatOptions | None = None, console: Console | None = None):
        from budget_reasoner.eval.run import load_for_inference
        from budget_reasoner.export.source import check_base_available, find_source, source_preset
        from budget_reasoner.hardware import detect

        self.options = options or ChatOptions()
        self.console = console or Console(highlight=False)
        self.source = find_source(path, self.options.stage)
        exported = Path(path) / "export.json"
        preset_name = self.options.preset or (_read(exported).get("preset") if exported.is_file() else None)
        self.preset = source_preset(self.source, preset_name, _prompt_settings(exported))
        check_base_available(self.source.base)
        hardware = detect(self.preset.device, "bitsandbytes")
        self.model, self.tokenizer = load_for_inference(self.source.stage_dir or self.source.base, self.preset, hardware)
        self.max_new_tokens = self.options.max_new_tokens or self.preset.eval.max_new_tokens

    def describe(self) -> str:
        thinking = "hidden" if self.options.hide_thinking else "dimmed"
        budget = f", thinking budget {self.options.think_budget} tokens" if self.options.think_budget else ""
        return (f"chat with {self.source.name} (base {self.source.base}), greedy, thinking {thinking}{budget}; "
                f"each question is answered on its own")

    def reply(self, question: str) -> tuple[str, str | None]:
        """Stream the reply to `question`; returns (reply text, extracted final answer or None)."""
        from budget_reasoner.verify import extract

        display = ThinkingDisplay(self.console, self.options.hide_thinking)
        prompt = chat_prompt(question, self.preset.generate.instruction)
        if self.options.think_budget > 0:
            from budget_reasoner.eval.budget_forcing import generate_with_budget

            texts, _ = generate_with_budget(self.model, self.tokenizer, [prompt], self.options.think_budget, 1,
                                            self.preset.eval.min_think_tokens, self.preset.eval.max_waits)
            text = texts[0]
            display.feed(text)
        else:
            text = ""
            for piece in self._stream(prompt):
                display.feed(piece)
                text += piece
        display.finish()
        answer = extract(self.source.domain, text)
        self.console.print(Text("answer: ", style="bold") + Text(answer if answer is not None else "(none found)",
                                                                  style="bold green" if answer is not None else "bold red"))
        return text, answer

    def _stream(self, prompt: list[dict]):
        """Pieces of the greedy reply as the model writes them (transformers' TextIteratorStreamer, generate in a
        thread). Ctrl-C stops the generation at the next token instead of leaving it running."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from budget_reasoner.sampling.local import checkpoint_defaults_off, prompt_texts, sampling_config

        text = prompt_texts(self.tokenizer, [prompt])[0]
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        config = sampling_config(self.tokenizer, self.max_new_tokens, 0.0, 1, [self.tokenizer.eos_token_id])
        stop = threading.Event()

        class StopOnRequest(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        failure: list[BaseException] = []

        def generate():
            try:
                with torch.no_grad(), checkpoint_defaults_off(self.model):
                    self.model.generate(**inputs, generation_config=config, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([StopOnRequest()]))
            except BaseException as error:  # surfaced in the caller's thread below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from streamer
        except KeyboardInterrupt:
            stop.set()
            worker.join()
            self.console.print(Text(" (stopped)", style="italic"), end="")
            return
        worker.join()
        if failure:
            raise failure[0]


def run_chat(path: str | Path, options: ChatOptions | None = None, once: str | None = None) -> int:
    """The terminal loop (or one question with `once`). Ctrl-D or /exit leaves; Ctrl-C stops a reply."""
    chat = Chat(path, options)
    say(chat.describe())
    if once is not None:
        chat.reply(once)
        return 0
    say("type a question and press Enter; Ctrl-D or /exit to leave, Ctrl-C to stop a reply")
    while True:
        try:
            question = chat.console.input("[bold]question>[/bold] ").strip()
        except (EOFError, KeyboardInterrupt):
            chat.console.print()
            return 0
        if question.lower() in EXIT_WORDS:
            return 0
        if question:
            chat.reply(question)


def _read(path: Path) -> dict:
    from budget_reasoner.io import read_json

    return read_json(path)


def _prompt_settings(export_record: Path) -> dict:
    """How an exported model loads, is prompted and was measured (export.json records it), as preset overrides."""
    return (_read(export_record).get("preset_overrides") or {}) if export_record.is_file() else {}


