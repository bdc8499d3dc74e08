"""GGUF for llama.cpp and Ollama, through llama.cpp's own converter, and the Ollama Modelfile beside it.

The converter (`convert_hf_to_gguf.py`, with the `gguf` package it imports) knows every architecture's tensor
names and, above all, which pre-tokenizer a vocabulary needs: it refuses one it does not recognize rather than
write a GGUF that tokenizes differently. Reimplementing that here would be a second converter to keep right, so
this module finds llama.cpp's (LLAMA_CPP_DIR, or the script on PATH) and says in one line how to get it when it
is absent. f16 and q8_0 come straight from the converter; q4_k_m is converted to f16 and then quantized with
llama.cpp's `llama-quantize` binary (LLAMA_CPP_DIR/build/bin, or PATH).

The Modelfile is written either way, next to where the GGUF goes: its TEMPLATE renders the ChatML turns the model
was trained on, and keeps earlier replies' thinking out of the prompt (Ollama hands a reply's thinking back in
`.Thinking`, apart from `.Content`); `think: false` asks for an empty thought, as the chain format allows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
CONVERTER = "convert_hf_to_gguf.py"
QUANTIZE = "llama-quantize"
HOW_TO_GET = ("git clone https://github.com/ggml-org/llama.cpp && pip install -r "
              "llama.cpp/requirements/requirements-convert_hf_to_gguf.txt && export LLAMA_CPP_DIR=$PWD/llama.cpp")


def gguf_name(quantization: str) -> str:
    return f"model-{quantization}.gguf"


def find_converter() -> Path | None:
    root = os.environ.get("LLAMA_CPP_DIR")
    if root and (Path(root) / CONVERTER).is_file():
        return Path(root) / CONVERTER
    found = shutil.which(CONVERTER)
    return Path(found) if found else None


def find_quantizer() -> Path | None:
    root = os.environ.get("LLAMA_CPP_DIR")
    for candidate in ([Path(root) / "build" / "bin" / QUANTIZE, Path(root) / QUANTIZE] if root else []):
        if candidate.is_file():
            return candidate
    found = shutil.which(QUANTIZE)
    return Path(found) if found else None


def missing_tools(quantization: str) -> str | None:
    """One line saying what is missing to write this GGUF and how to get it; None when everything is there."""
    if quantization not in GGUF_TYPES:
        raise BudgetReasonerError(f"--gguf must be one of {', '.join(GGUF_TYPES)}, got {quantization!r}")
    if find_converter() is None:
        extra = (" (q4_k_m also needs llama-quantize: `cmake -B build && cmake --build build --target llama-quantize` "
                 "in llama.cpp)") if quantization == "q4_k_m" else ""
        return f"GGUF: not written, llama.cpp's {CONVERTER} was not found; get it: {HOW_TO_GET}{extra}"
    if quantization == "q4_k_m" and find_quantizer() is None:
        return ("GGUF: not written, q4_k_m needs llama.cpp's llama-quantize (not found in $LLAMA_CPP_DIR/build/bin or "
                "on PATH): `cmake -B build && cmake --build build --target llama-quantize` in llama.cpp; or use --gguf q8_0")
    return None


def write_gguf(model_dir: Path, folder: Path, quantization: str) -> Path:
    """Convert the exported checkpoint in `model_dir` to `folder/model-<quantization>.gguf` (tools checked first)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / gguf_name(quantization)
    direct = "f16" if quantization == "q4_k_m" else quantization
    converted = folder / gguf_name("f16") if quantization == "q4_k_m" else target
    _run([sys.executable, str(find_converter()), str(model_dir), "--outfile", str(converted), "--outtype", direct],
         "convert_hf_to_gguf.py")
    if quantization == "q4_k_m":
        _run([str(find_quantizer()), str(converted), str(target), "Q4_K_M"], "llama-quantize")
        converted.unlink()
    return target


def _run(command: list[str], name: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BudgetReasonerError(f"{name} failed (exit {result.returncode}): {last[0][:300]}")


# Ollama's templates are Go text/template over .System, .Messages (.Role, .Content, .Thinking), .Think and
# .IsThinkSet. Ollama finds a model's thinking tags in its template (thinking.InferTags: the text around a
# `.Thinking` inside the range over .Messages) and then returns what the model writes between them as the reply's
# thinking, apart from its content. Earlier assistant turns go back in without their thinking; `think: false`
# prefills an empty thought, the chain format's own "<think>\n</think>\n".
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ if not $.System }}<|im_start|>system
{{ .Content }}<|im_end|>
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and $last .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>
</think>
{{ end }}
{{- end }}
{{- end }}"""


def is_chatml(tokenizer) -> bool:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return "<|im_start|>" in template and "<|im_end|>" in template


def modelfile(tokenizer, quantization: str, context_length: int, system: str | None = None) -> str:
    """The Ollama Modelfile for `model-<quantization>.gguf` in the same folder: greedy like the recipe's eval, the
    end-of-turn token as the stop, and the ChatML TEMPLATE above (a template that is not ChatML is left to the
    GGUF's own, which Ollama reads from the file)."""
    lines = [f"FROM ./{gguf_name(quantization)}", ""]
    if is_chatml(tokenizer):
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    vocabulary = tokenizer.get_vocab()
    stops = dict.fromkeys(token for token in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>")
                          if token and token in vocabulary)
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {context_length}", ""]
    return "\n".join(lines)
