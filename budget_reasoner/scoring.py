"""Scoring: token sequences in, a teacher's top-k log-probs out, and the compact cache that holds them.

The one place that does this (the distill cache and on-policy distillation both call it). Three sources give
the same scores:
- `LocalScorer`: the teacher loaded whole, one forward per batch (the ordinary path);
- `LayerStreamedScorer`: a teacher bigger than the card, its decoder layers read from the checkpoint one at a
  time, each pushed over the whole batch's hidden states and freed;
- `ServerScorer`: a teacher served by vLLM, whose /v1/completions returns prompt log-probs (sent as token ids,
  through the chains teacher's HTTP client: sampling/server.py).

Only the positions training reads are scored and kept: position p predicts token p + 1, so a sequence's cached
positions are those whose next token is a completion token. The prompt's positions (a third of the tokens on
the offline run, most of them with a long system prompt) are never written.

The cache (the data contract in ARCHITECTURE.md) is a folder of safetensors shards, one per `shard_size`
sequences, each holding the shard's sequences concatenated:
    input_ids       (tokens,)        uint16 when the vocabulary fits, else int32: every token, the student's input
    sequence_starts (sequences + 1,) int32: where each sequence starts in input_ids
    first_positions (sequences,)     int32: each sequence's first cached position (the rest follow contiguously)
    row_starts      (sequences + 1,) int32: where each sequence's rows start in the top-k arrays
    topk_ids        (positions, k)   int32
    topk_logprobs   (positions, k)   float16
so a cached position costs k x 6 bytes plus its share of the ids and offsets. A reader memory-maps the shards
and copies out one sequence at a time (`TopKCache`), so host RAM does not grow with the cache.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import COMPLETE, _atomic, digest, read_json, verify_complete
from budget_reasoner.progress import say
from budget_reasoner.sampling.server import OpenAIClient, _concurrently, _Retry

CACHE_FORMAT = "topk-safetensors-v1"  # in every shard's header and the manifest; a JSONL cache has none
LOGPROB_FLOOR = -60000.0  # float16's range ends at -65504: a -inf log-prob (a masked or softcapped logit) is kept finite
_DTYPES = {"U16": np.uint16, "I32": np.int32, "F16": np.float16}
_CACHE_TENSORS = ("input_ids", "sequence_starts", "first_positions", "row_starts", "topk_ids", "topk_logprobs")


def tokenizer_hash(tokenizer) -> str:
    """Two tokenizers with the same vocabulary and template hash the same; KD needs exactly that."""
    return digest([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template])


def cached_span(completion_mask: list[int]) -> tuple[int, int]:
    """The positions [start, stop) whose next token is a completion token: the ones KD trains on.

    The completion follows the prompt in one run (train/common.encode_prompt_completion), so they are contiguous;
    a mask with gaps (a multi-turn layout) is refused rather than cached wrongly."""
    first = completion_mask.index(1) if 1 in completion_mask else len(completion_mask)
    if any(value != 1 for value in completion_mask[first:]):
        raise ValueError("the completion mask must be one run of 1s at the end of the sequence")
    return max(first - 1, 0), max(len(completion_mask) - 1, 0)


@dataclass
class ScoredSequence:
    """One sequence's cache row: its tokens, and the teacher's top-k at positions first_position onwards."""
    input_ids: list[int]
    first_position: int
    topk_ids: torch.Tensor       # (positions, k)
    topk_logprobs: torch.Tensor  # (positions, k), fp32 as computed; the shard stores fp16
    # (positions,): the teacher's log-prob of the token that actually comes next, in its top-k or not: what
    # on-policy distillation reads (train/opd.py). Not cached. None from a source that cannot give it.
    token_logprobs: torch.Tensor | None = None


# ---- the local source: the teacher loaded whole ------------------------------------------------------------

class LocalScorer:
    """A loaded teacher: one forward per batch, then its LM head a chunk of cached positions at a time."""

    def __init__(self, model, pad_token_id: int):
        from budget_reasoner.kernels.patch import final_logit_softcap, lm_head_weight

        self.model, self.pad_token_id = model.eval(), pad_token_id
        self.head, self.softcap = lm_head_weight(model), final_logit_softcap(model)
        self.device = self.head.device

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from budget_reasoner.kernels.patch import final_hidden_states

        return final_hidden_states(self.model, input_ids.to(self.device), attention_mask.to(self.device))

    @torch.no_grad()
    def score(self, encoded: list[tuple[list[int], list[int]]], top_k: int) -> list[ScoredSequence]:
        input_ids, attention_mask = right_pad([ids for ids, _ in encoded], self.pad_token_id)
        hidden = self.hidden_states(input_ids, attention_mask)
        return topk_of_spans(hidden, encoded, self.head, top_k, self.softcap)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def topk_of_spans(hidden: torch.Tensor, encoded, head_weight: torch.Tensor, top_k: int,
                  softcap: float | None) -> list[ScoredSequence]:
    """The LM head over each sequence's cached positions only (chunked: no positions x vocab logits)."""
    from budget_reasoner.kernels import linear_topk_logprobs

    scored = []
    for row, (ids, mask) in enumerate(encoded):
        start, stop = cached_span(mask)
        logprobs, token_ids = linear_topk_logprobs(hidden[row, start:stop], head_weight, top_k, softcap=softcap)
        chosen = next_token_logprobs(hidden[row, start:stop], next_tokens(ids, start, stop, hidden.device), token_ids,
                                     logprobs, lambda rows: head_weight[rows.to(head_weight.device)], softcap)
        scored.append(ScoredSequence(list(ids), start, token_ids.cpu(), logprobs.cpu(), chosen.cpu()))
    return scored


def next_tokens(ids: list[int], start: int, stop: int, device) -> torch.Tensor:
    """The tokens positions [start, stop) predict: position p's is ids[p + 1]."""
    return torch.tensor(ids[start + 1 : stop + 1], dtype=torch.long, device=device)


def next_token_logprobs(hidden: torch.Tensor, next_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                        head_rows, softcap: float | None, block: int = 1024) -> torch.Tensor:
    """The log-prob of each position's actual next token, from the top-1 already scored: log p(t) = z_t - z_1 +
    log p(1), the log-sum-exp cancelling, so only those two tokens' LM-head rows are read again (`head_rows(ids)`),
    a block of positions at a time."""
    values = []
    for first in range(0, hidden.shape[0], block):
        states = hidden[first : first + block].float()
        wanted = torch.cat([next_ids[first : first + block], topk_ids[first : first + block, 0].to(next_ids.device)])
        present, where = wanted.unique(return_inverse=True)
        rows = head_rows(present).float().to(states.device)[where.to(states.device)]
        logits = (torch.cat([states, states]) * rows).sum(-1)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token, top = logits.chunk(2)
        values.append(token - top + topk_logprobs[first : first + block, 0].float().to(token.device))
    return torch.cat(values) if values else hidden.new_zeros((0,), dtype=torch.float32)


# ---- the layer-streamed source: a teacher bigger than the memory ------------------------------------------
# Prefill reads each weight once for every token of the batch, so streaming the layers from disk costs a read of
# the checkpoint per batch, not per token: hopeless for generation, fine for scoring. The model is built on the
# meta device (no memory), so its own modules (rotary embeddings, masks, decoder layers) compute exactly what the
# ordinary forward computes; each layer gets real weights just before it runs and gives them back right after.
#
# Peak memory (the bound: one layer + the batch's hidden states + one LM-head chunk, +10%). Measured on
# Qwen2.5-0.5B cut to 4 layers (benchmarks/layer_streaming.py), the first version peaked 310 MB above its start
# against a 53 MB bound, for two reasons, both fixed below:
# - glibc kept freed memory: a freed tensor of a few MB raises malloc's mmap threshold (up to 32 MB), so the next
#   layer's weights and activations came from the heap, and the heap's freed blocks were kept and fragmented, so
#   RSS grew by ~30 MB a layer with under 30 MB live (malloc_trim after scoring gave back 175 MB). The scorer fixes
#   the threshold (`_return_freed_memory`), so large tensors are mmapped and unmapped when freed.
# - the layer ran over the whole batch at once: its MLP's intermediates (3 x tokens x intermediate_size) and
#   attention took ~80 MB beside 30 MB of weights. The layer now runs over a block of sequences at a time, its
#   output written back into the batch's hidden states in place, and the LM head over a block of positions.
#   Both blocks are sized to `work_bytes` (default: one LM-head chunk's bytes). That is paid out of the bound's
#   LM-head term: the head's rows and a layer's weights are never in memory together.

STREAM_HEAD_ROWS = 8192  # LM-head rows read at a time
STREAM_WORK_BYTES = 2 * 2**30  # on CUDA, a block's activations (and logits): blocks of thousands of tokens keep it busy


class LayerStreamedScorer:
    """Score with a checkpoint holding at most one decoder layer's weights (plus the batch's hidden states and one
    block of LM-head rows) in memory at a time. Decoder-only models laid out as Qwen2/Llama are
    (model.embed_tokens, model.layers.N, model.norm, lm_head or tied embeddings)."""

    def __init__(self, checkpoint: str | Path, pad_token_id: int, attention: str = "sdpa", head_rows: int = STREAM_HEAD_ROWS,
                 work_bytes: int | None = None, device: str | torch.device = "cpu", prefetch: bool | None = None):
        """`device`: where each layer computes. The batch's hidden states stay in host memory (pinned on CUDA) and
        go to the device a block of sequences at a time, so the card holds one layer, one block's activations and
        one LM-head block: a 72B's 80 layers of 1.7 GB (bf16) and a shard's hidden states need no more than that.
        `prefetch` (default: on CUDA): read the next layer from disk on a thread while the device computes the
        current one. On the CPU it would hold two layers and compete with the compute for the same cores."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from budget_reasoner.models import attn_implementation

        _return_freed_memory()
        self.checkpoint, self.pad_token_id, self.head_rows = Path(checkpoint), pad_token_id, head_rows
        self.compute_device = torch.device(device)
        self.prefetch = self.compute_device.type == "cuda" if prefetch is None else prefetch
        self.weights = CheckpointTensors(self.checkpoint)
        config = AutoConfig.from_pretrained(self.checkpoint)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(attention)).eval()
        decoder = self.model.model
        decoder.rotary_emb = type(decoder.rotary_emb)(config=decoder.config)  # its inv_freq buffer, computed for real
        self.config, self.device = decoder.config, torch.device("cpu")  # where scores come back (host memory)
        self.softcap = getattr(config, "final_logit_softcapping", None) or None
        self.head_name = "lm_head.weight" if "lm_head.weight" in self.weights else "model.embed_tokens.weight"
        head = self.weights.entries[self.head_name][2]
        self.itemsize = _TORCH_DTYPES[head["dtype"]].itemsize
        # on the CPU the activations are paid out of the memory bound's LM-head term (see the note above); a card
        # has room to spare beside one layer, and small blocks would leave it idle
        self.work_bytes = work_bytes or (STREAM_WORK_BYTES if self.compute_device.type == "cuda"
                                         else head_rows * head["shape"][1] * self.itemsize)

    def rows_per_block(self, length: int) -> int:
        """Sequences of `length` tokens a layer runs over at once, so its activations fit `work_bytes`: per token,
        the MLP's gate, up and product (intermediate_size each) and a few hidden-size temporaries (the attention's
        q, k, v, output and the residual), in the compute dtype."""
        config = self.config
        per_token = (3 * config.intermediate_size + 6 * config.hidden_size) * self.itemsize
        return max(1, self.work_bytes // (per_token * length))

    @torch.no_grad()
    def score(self, encoded: list[tuple[list[int], list[int]]], top_k: int) -> list[ScoredSequence]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        decoder = self.model.model
        input_ids, attention_mask = right_pad([ids for ids, _ in encoded], self.pad_token_id)
        # only the embedding rows of the batch's tokens: the whole table (vocab x hidden) can outweigh a layer
        present, where = input_ids.unique(return_inverse=True)
        hidden = self.weights.rows_at("model.embed_tokens.weight", present.tolist())[where]
        position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        arguments = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask, "cache": None,
                     "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**arguments)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**arguments)
        device = self.compute_device
        if device.type == "cuda":
            hidden = hidden.pin_memory()  # host-to-device copies of its blocks run asynchronously
        position_embeddings = tuple(part.to(device) for part in decoder.rotary_emb(hidden, position_ids))
        position_ids = position_ids.to(device)
        rows = self.rows_per_block(hidden.shape[1])
        layers = list(decoder.layers)
        with contextlib.ExitStack() as stack:
            reader = stack.enter_context(ThreadPoolExecutor(1)) if self.prefetch else None

            def read(index: int):
                return self.weights.read_state(layers[index], f"model.layers.{index}.", device.type == "cuda")

            pending = reader.submit(read, 0) if reader else None
            for index, layer in enumerate(layers):
                state = pending.result() if reader else read(index)
                if reader and index + 1 < len(layers):
                    pending = reader.submit(read, index + 1)  # from disk while this layer computes
                mask = masks[self.config.layer_types[index]]
                with self.weights.attached(layer, state, device):
                    del state
                    # a block of sequences at a time (each attends only to itself, so the result is the batch's),
                    # written back in place: one copy of the hidden states, one block's activations
                    for first in range(0, hidden.shape[0], rows):
                        block = slice(first, first + rows)
                        block_mask = None if mask is None else mask[block].to(device)
                        output = layer(hidden[block].to(device, non_blocking=True), attention_mask=block_mask,
                                       position_embeddings=position_embeddings, position_ids=position_ids)
                        hidden[block] = output.to(hidden.device)
        with self.weights.attached(decoder.norm, self.weights.read_state(decoder.norm, "model.norm."), "cpu"):
            hidden = decoder.norm(hidden)
        scored = []
        for row, (ids, mask) in enumerate(encoded):
            start, stop = cached_span(mask)
            scored.append((list(ids), start, hidden[row, start:stop]))
        positions = torch.cat([states for _, _, states in scored])
        logprobs, token_ids = self.head_topk(positions, top_k)
        next_ids = torch.cat([next_tokens(ids, start, start + states.shape[0], positions.device) for ids, start, states in scored])
        chosen = next_token_logprobs(positions, next_ids, token_ids, logprobs,
                                     lambda rows: self.weights.rows_at(self.head_name, rows.tolist()), self.softcap)
        result, offset = [], 0
        for ids, start, states in scored:
            rows, part = states.shape[0], slice(offset, offset + states.shape[0])
            result.append(ScoredSequence(ids, start, token_ids[part], logprobs[part], chosen[part]))
            offset += rows
        return result

    def memory_bound(self, batch: int, length: int) -> dict:
        """The issue's bound on scoring's peak memory for `batch` sequences of up to `length` tokens: the largest
        decoder layer's weights + the batch's hidden states + one block of LM-head rows (as stored), +10%."""
        layers = {}
        for name, (_, _, entry) in self.weights.entries.items():
            if name.startswith("model.layers."):
                index = name.split(".")[2]
                layers[index] = layers.get(index, 0) + (entry["data_offsets"][1] - entry["data_offsets"][0])
        itemsize = _TORCH_DTYPES[self.weights.entries[self.head_name][2]["dtype"]].itemsize
        hidden_size = self.weights.shape(self.head_name)[1]
        parts = {"layer_bytes": max(layers.values()), "hidden_states_bytes": batch * length * hidden_size * itemsize,
                 "head_chunk_bytes": self.head_rows * hidden_size * itemsize}
        return {**parts, "bound_bytes": int(sum(parts.values()) * 1.1)}

    def head_topk(self, hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k log-probs over the whole vocabulary, reading `head_rows` rows of the LM head at a time: a running
        top-k of logits and a running log-sum-exp, so neither the head nor positions x vocab logits are ever whole."""
        vocab = self.weights.shape(self.head_name)[0]
        # positions a block, so a block's fp32 logits (and their softcap / log-sum-exp temporaries, ~2 copies)
        # stay within work_bytes
        block = max(1, self.work_bytes // (self.head_rows * 4 * 2))
        if hidden.shape[0] > block:
            parts = [self.head_topk(hidden[first : first + block], top_k) for first in range(0, hidden.shape[0], block)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        device = self.compute_device
        hidden = hidden.to(device)
        best = torch.full((hidden.shape[0], top_k), -torch.inf, device=device)
        best_ids = torch.zeros((hidden.shape[0], top_k), dtype=torch.long, device=device)
        log_z = torch.full((hidden.shape[0],), -torch.inf, device=device)
        for first in range(0, vocab, self.head_rows):
            rows = self.weights.rows(self.head_name, first, min(first + self.head_rows, vocab)).to(device)
            logits = (hidden @ rows.t()).float()
            del rows
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            log_z = torch.logaddexp(log_z, logits.logsumexp(-1))
            block = logits.topk(min(top_k, logits.shape[1]), dim=1)
            merged, order = torch.cat([best, block.values], dim=1).topk(top_k, dim=1)
            best_ids = torch.cat([best_ids, block.indices + first], dim=1).gather(1, order)
            best = merged
        return (best - log_z[:, None]).cpu(), best_ids.cpu()


class CheckpointTensors:
    """A checkpoint's safetensors files, read a tensor (or a block of its rows) at a time with plain reads.

    Not through safetensors' safe_open: it memory-maps the file, and the pages a read touches stay resident beside
    the copy until the file is closed, which would hold a layer twice at the peak. A listed file that is missing, cut
    short (a download that stopped) or without a tensor the index places in it is one line naming it, when the
    folder is opened: before anything is scored, not at the layer that needs it."""

    def __init__(self, checkpoint: Path):
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            files = {name: checkpoint / file for name, file in read_json(index)["weight_map"].items()}
        elif (checkpoint / "model.safetensors").is_file():
            files = None
        else:
            raise BudgetReasonerError(f"{checkpoint}: no model.safetensors or model.safetensors.index.json; layer "
                                      f"streaming reads a safetensors checkpoint")
        self.entries = {}
        for path in sorted(set(files.values())) if files else [checkpoint / "model.safetensors"]:
            if not path.is_file():
                raise BudgetReasonerError(f"{path}: missing (listed in {index}); download the checkpoint's missing "
                                          f"shards, then rerun")
            header, start = _safetensors_header(path)
            size = path.stat().st_size
            needed = start + max((entry["data_offsets"][1] for entry in header.values()), default=0)
            if needed > size:
                raise BudgetReasonerError(f"{path}: cut short ({size:,} bytes, its tensors need {needed:,}); download "
                                          f"it again, then rerun")
            for name, entry in header.items():
                self.entries[name] = (path, start, entry)
        for name, path in (files or {}).items():
            if name not in self.entries or self.entries[name][0] != path:
                raise BudgetReasonerError(f"{path}: has no tensor {name} (listed there in {index}); the index and the "
                                          f"shards are from different downloads: download the checkpoint again")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        return self.entries[name][2]["shape"]

    def rows(self, name: str, first: int, stop: int) -> torch.Tensor:
        path, start, entry = self.entries[name]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        tensor = torch.empty((stop - first, *shape[1:]), dtype=dtype)
        with path.open("rb") as handle:
            handle.seek(start + entry["data_offsets"][0] + first * row_bytes)
            handle.readinto(tensor.view(torch.uint8).numpy().reshape(-1))
        return tensor

    def rows_at(self, name: str, indices: list[int]) -> torch.Tensor:
        path, start, entry = self.entries[name]
        dtype, shape = _TORCH_DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        table = torch.empty((len(indices), *shape[1:]), dtype=dtype)
        with path.open("rb") as handle:
            for row, index in enumerate(indices):
                handle.seek(start + entry["data_offsets"][0] + index * row_bytes)
                handle.readinto(table[row].view(torch.uint8).numpy().reshape(-1))
        return table

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]).reshape(shape) if shape else self.rows(name, 0, 1).reshape(())

    def read_state(self, module: torch.nn.Module, prefix: str, pin: bool = False) -> dict[str, torch.Tensor]:
        """`module`'s weights from disk into host memory (page-locked with `pin`, for an asynchronous copy)."""
        state = {name: self.tensor(prefix + name) for name in module.state_dict()}
        return {name: tensor.pin_memory() for name, tensor in state.items()} if pin else state

    @contextlib.contextmanager
    def attached(self, module: torch.nn.Module, state: dict[str, torch.Tensor], device: str | torch.device):
        """`module` with the weights `state` holds, on `device`, for the block; back on the meta device (freed)
        after it. The caller drops its own reference to `state`, so the module holds the only copy."""
        module.load_state_dict({name: tensor.to(device, non_blocking=True) for name, tensor in state.items()},
                               assign=True, strict=True)
        state.clear()
        try:
            yield module
        finally:
            module.to("meta")


def _return_freed_memory() -> None:
    """Have glibc's malloc give large freed blocks back to the system at once (see the streaming note above).

    By default malloc raises its mmap threshold to the size of each mmapped block freed (up to 32 MB on 64-bit), so
    after the first layer's tensors are freed every later tensor up to that size comes from the heap, whose freed
    blocks stay resident. Setting the threshold (M_MMAP_THRESHOLD, 128 KiB: glibc's own default) turns the dynamic
    adjustment off for the process. It costs a page-zeroing per large allocation, small beside a layer read from
    disk; without glibc (macOS, musl) this is skipped."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """A checkpoint file's tensor entries and where its data starts; one line naming it when it is no safetensors."""
    with path.open("rb") as handle:
        try:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > path.stat().st_size - 8:
                raise ValueError("a header longer than the file")
            header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            if not all(isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2 for entry in header.values()):
                raise ValueError("an entry without data_offsets")
        except (struct.error, ValueError, AttributeError, MemoryError, OverflowError):
            raise BudgetReasonerError(f"{path}: not a safetensors file (its header does not read); download it "
                                      f"again, then rerun") from None
    return header, 8 + size


# ---- the server source: a teacher served by vLLM, its prompt log-probs ------------------------------------
# What vLLM answers, read from its source (vllm-project/vllm, 2025-26):
# - the request, vllm/entrypoints/openai/completion/protocol.py `CompletionRequest`: `prompt` may be a list of token
#   ids (used as they are, no tokenizing: the ids we cache are the ids it scores); `prompt_logprobs: int` asks for
#   the top-k at every prompt position. `max_tokens` must be >= 1 unless `echo` is set (`to_sampling_params`
#   turns echo + max_tokens 0 into 1 anyway), so we ask for 1 generated token and ignore it.
#   `return_tokens_as_token_ids` only changes the *generated* tokens' `logprobs` ("token_id:123" strings); the
#   prompt log-probs are keyed by token id either way. Both key forms are read below.
# - the answer, `CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] | None]`, returned as the engine
#   made it (completion/serving.py `request_output_to_completion_response`, -inf clamped to -9999.0 by
#   `clamp_prompt_logprobs`); JSON turns the int keys into strings. One entry per prompt token: the first is None
#   (nothing predicts the first token), entry p is the distribution of token p given tokens < p.
# - each position's dict, vllm/v1/engine/logprobs.py `LogprobsProcessor._make_logprob_dict`: the prompt token
#   itself first, with its true rank, then the top-k with ranks 1..k. So a dict holds k entries when the prompt
#   token is in the top-k and k + 1 when it is not: the top-k are the entries of rank <= k.
# - the values are log-softmax of the raw logits (vllm/config/model.py `logprobs_mode`, default "raw_logprobs"),
#   before temperature or penalties: temperature 1, as the other sources score.
# - the cap: prompt_logprobs above `--max-logprobs` (default 20) is refused with a 400 "Requested prompt logprobs
#   of K, which is greater than max allowed: 20" (SamplingParams / the input processor's `_validate_logprobs`).
# - prefix caching: vllm/sampling_params.py `SamplingParams.__post_init__` sets skip_reading_prefix_cache when
#   prompt_logprobs is asked for ("the output of prompt logprobs may [be] less than n_prompt_tokens"); an older
#   vLLM without that returns too few entries, refused below with the flag that turns prefix caching off.

class ServerScorer(OpenAIClient):
    """A teacher on an OpenAI-compatible server that returns prompt log-probs (vLLM's /v1/completions): one request
    per sequence, `concurrency` in flight, retried like the chains teacher (sampling/server.py: 429, 5xx, timeouts).

    The server tokenizes nothing (we send ids), so its tokenizer must be the one the ids were made with: `tokenizer`
    (the student's, or the one named) is compared with the server's on the first sequence through vLLM's /tokenize,
    and the cache records its hash, which distill checks against the student's."""

    def __init__(self, model: str, base_url: str, tokenizer=None, api_key: str = "EMPTY", timeout: float = 600,
                 concurrency: int = 64, max_retries: int = 5, **retry):
        super().__init__(model, base_url, api_key, timeout, concurrency, max_retries, **retry)
        self.tokenizer, self.top_k, self.tokenizer_checked = tokenizer, 0, tokenizer is None
        self.device = torch.device("cpu")  # where scores come back (the cache's peak memory is this process's)

    def max_model_len(self) -> int | None:
        """The served model's context length, from GET /models (vLLM's cards carry `max_model_len`)."""
        lengths = [card.get("max_model_len") for card in self._models() if card["id"] == self.model]
        return lengths[0] if lengths and isinstance(lengths[0], int) else None

    def score(self, encoded: list[tuple[list[int], list[int]]], top_k: int) -> list[ScoredSequence]:
        self.top_k = top_k
        if not self.tokenizer_checked and encoded:
            self.check_tokenizer(encoded[0][0])
        scored: list[ScoredSequence | None] = [None] * len(encoded)
        for index, result in _concurrently(list(range(len(encoded))), lambda i: self._score_one(*encoded[i], top_k),
                                           self.concurrency):
            scored[index] = result
        return scored

    def _score_one(self, ids: list[int], mask: list[int], top_k: int) -> ScoredSequence:
        start, stop = cached_span(mask)
        body = {"model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": top_k, "return_tokens_as_token_ids": True}
        entries = self._request("completions", body, lambda raw: self._prompt_logprobs(raw, len(ids)))
        topk_ids = torch.empty((stop - start, top_k), dtype=torch.long)
        topk_logprobs = torch.empty((stop - start, top_k), dtype=torch.float32)
        token_logprobs = torch.empty((stop - start,), dtype=torch.float32)
        for row, position in enumerate(range(start, stop)):
            # cache position p predicts token p + 1: the server's entry p + 1, which holds that token too
            topk_ids[row], topk_logprobs[row], token_logprobs[row] = self._top_k(entries[position + 1], ids[position + 1],
                                                                                top_k)
        return ScoredSequence(list(ids), start, topk_ids, topk_logprobs, token_logprobs)

    def _prompt_logprobs(self, raw: bytes, length: int) -> list:
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, IndexError):
            excerpt = self._scrub(raw[:80].decode("utf-8", "replace")).replace("\n", " ")
            raise _Retry(f"a malformed answer, not a completion ({excerpt!r})") from None
        entries = choice.get("prompt_logprobs")
        if not entries:
            raise BudgetReasonerError(self._no_prompt_logprobs("its answer has no prompt_logprobs"))
        if len(entries) != length:
            raise BudgetReasonerError(
                f"{self._where()}: returned prompt log-probs for {len(entries)} of the {length} tokens sent: an older "
                f"vLLM returns none for tokens its prefix cache holds; start it with --no-enable-prefix-caching")
        return entries

    def _top_k(self, entry, next_id: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A position's top-k (ids, log-probs) and the log-prob of the token that comes next (in the top-k or
        not: vLLM adds it), from vLLM's dict of {token id: {logprob, rank, decoded_token}}."""
        try:
            parsed = [(int(str(key).removeprefix("token_id:")), float(value["logprob"]), value.get("rank"))
                      for key, value in entry.items()]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BudgetReasonerError(f"{self._where()}: its prompt_logprobs are not vLLM's shape (a dict of "
                                      f"{{token id: {{logprob, rank, decoded_token}}}} a position): {str(entry)[:80]!r}") from None
        chosen = [value for token, value, _ in parsed if token == next_id]
        if not chosen:
            raise BudgetReasonerError(f"{self._where()}: its prompt log-probs do not include the token sent (id "
                                      f"{next_id}): it scored something else than the token ids sent")
        # the prompt token rides along at its own rank when it is not in the top-k: keep ranks 1..k
        top = sorted((entry for entry in parsed if entry[2] is None or entry[2] <= top_k), key=lambda e: (-e[1], e[2] or 0))
        if len(top) < top_k:
            raise BudgetReasonerError(self._too_few(len(top)))
        return (torch.tensor([token for token, _, _ in top[:top_k]]), torch.tensor([value for _, value, _ in top[:top_k]]),
                chosen[0])

    def check_tokenizer(self, ids: list[int]) -> None:
        """The server's tokenizer against ours, on the first sequence's text: vLLM's POST /tokenize at the server's
        root, beside /v1 (vllm/entrypoints/serve/tokenize/api_router.py `tokenize`: {"model", "prompt",
        "add_special_tokens"} -> {"tokens", "count", "max_model_len"}). A server without it is said once and
        trusted: the cache's tokenizer hash is then ours alone."""
        self.tokenizer_checked = True
        text = self.tokenizer.decode(ids)
        ours = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        source = getattr(self.tokenizer, "name_or_path", "") or "the local tokenizer"

        def tokens(raw: bytes) -> list[int]:
            try:
                return [int(token) for token in json.loads(raw)["tokens"]]
            except (ValueError, KeyError, TypeError):
                raise _Retry("a malformed /tokenize answer") from None

        try:
            theirs = self._request("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, tokens)
        except BudgetReasonerError as error:
            say(f"{self._where()}: cannot compare its tokenizer with {source} ({str(error).rsplit(': ', 1)[-1]}); "
                f"the served model must share it, or the cache's ids are read as other tokens")
            return
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise BudgetReasonerError(
                f"{self._where()}: tokenizes differently from {source} (the first sequence: {len(theirs)} tokens there, "
                f"{len(ours)} here, the first difference at token {first}); logit-level KD needs the served model to "
                f"share the student's tokenizer: serve one of its family, or pass --tokenizer with the served one's")

    def _refusal(self, said: str) -> str:
        if "max allowed" in said or "max_logprobs" in said:  # vLLM's cap on log-probs per position
            return self._flag_hint()
        if "prompt_logprobs" in said or "prompt must be a string" in said:  # transformers serve: unknown field, text only
            return "it takes no prompt_logprobs or no token-id prompt; " + self._flag_hint()
        return "the server refused the request"

    def _no_prompt_logprobs(self, what: str) -> str:
        return f"{self._where()}: {what}; {self._flag_hint()}"

    def _too_few(self, returned: int) -> str:
        return f"{self._where()}: returned {returned} log-probs at a position, {self.top_k} asked for; {self._flag_hint()}"

    def _flag_hint(self) -> str:
        return (f"scoring needs {self.top_k} prompt log-probs a position: serve the teacher with vLLM, `vllm serve MODEL "
                f"--max-logprobs {max(self.top_k, 20)}` (it caps them at 20 unless told), or lower --top-k")


# ---- writing shards -----------------------------------------------------------------------------------------

def write_shard(path: Path, scored: list[ScoredSequence], vocab_size: int) -> dict:
    """Write one shard atomically; returns its counts (also kept in its header, so a resumed cache adds them up
    without reading the rows again)."""
    from safetensors.numpy import save_file

    top_k = scored[0].topk_ids.shape[1]
    lengths = [len(s.input_ids) for s in scored]
    rows = [s.topk_ids.shape[0] for s in scored]
    if sum(lengths) >= 2**31:
        raise ValueError("a shard holds at most 2**31 tokens; use a smaller generate.shard_size")
    ids_dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    tensors = {
        "input_ids": np.concatenate([np.asarray(s.input_ids, dtype=ids_dtype) for s in scored]),
        "sequence_starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        "first_positions": np.asarray([s.first_position for s in scored], dtype=np.int32),
        "row_starts": np.concatenate([[0], np.cumsum(rows)]).astype(np.int32),
        "topk_ids": np.concatenate([s.topk_ids.numpy() for s in scored]).astype(np.int32).reshape(-1, top_k),
        "topk_logprobs": np.concatenate([s.topk_logprobs.float().clamp_min(LOGPROB_FLOOR).numpy() for s in scored])
                           .astype(np.float16).reshape(-1, top_k),
    }
    counts = {"sequences": len(scored), "tokens": int(sum(lengths)), "positions": int(sum(rows)),
              "max_topk_id": int(tensors["topk_ids"].max(initial=-1)), "max_input_id": int(tensors["input_ids"].max())}
    with _atomic(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": CACHE_FORMAT, "top_k": str(top_k),
                                                    **{key: str(value) for key, value in counts.items()}})
    return counts


def shard_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


# ---- reading shards: memory-mapped, one sequence at a time ------------------------------------------------

class CacheShard:
    """One shard, its header checked on open (a truncated or foreign file is one line naming it) and its data
    memory-mapped on first read.

    Pages a read touches count in this process's resident memory until they are unmapped, so after copying a
    sequence out the reader drops them again (madvise DONTNEED: they stay in the page cache, so rereading is a
    memory copy, not a disk read). Without that, one epoch over a 10 GB cache would show 10 GB resident."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = _read_header(self.path)
        self.top_k = int(self.metadata["top_k"])
        self.sequences = int(self.metadata["sequences"])
        self._map: mmap.mmap | None = None

    def __getstate__(self):  # a DataLoader worker (or another rank) maps the file itself
        return {**self.__dict__, "_map": None}

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, copied out of the mapping."""
        dtype, shape, offset = self.tensors[name]
        row_elements = int(np.prod(shape[1:], dtype=np.int64))
        itemsize = np.dtype(dtype).itemsize
        if self._map is None:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        first_byte = self.data_start + offset + start * row_elements * itemsize
        count = (stop - start) * row_elements
        view = np.frombuffer(self._map, dtype=dtype, count=count, offset=first_byte)
        rows = view.reshape(stop - start, *shape[1:]).copy()
        del view  # the mapping cannot be advised (or closed) while a view exports it
        page_start = first_byte - first_byte % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, page_start, first_byte + count * itemsize - page_start)
        return rows

    def sequence(self, index: int) -> dict:
        """A sequence as `read_cache` yields it: input_ids (int64), positions (the cached ones, int64),
        topk_ids (positions x k, int32), topk_logprobs (positions x k, float16)."""
        token_start, token_stop = self._read("sequence_starts", index, index + 2)
        row_start, row_stop = self._read("row_starts", index, index + 2)
        first = int(self._read("first_positions", index, index + 1)[0])
        return {"input_ids": self._read("input_ids", int(token_start), int(token_stop)).astype(np.int64),
                "positions": np.arange(first, first + int(row_stop - row_start), dtype=np.int64),
                "topk_ids": self._read("topk_ids", int(row_start), int(row_stop)),
                "topk_logprobs": self._read("topk_logprobs", int(row_start), int(row_stop))}

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """A shard's tensors (dtype, shape, byte offset) and metadata, every tensor checked to lie inside the file."""
    def damaged(why: str) -> DamagedShard:
        return DamagedShard(path, why)

    size = path.stat().st_size
    with path.open("rb") as handle:
        if size < 8:
            raise damaged(f"{size} bytes")
        header_bytes = struct.unpack("<Q", handle.read(8))[0]
        if header_bytes > size - 8:
            raise damaged(f"cut short: its header needs {header_bytes:,} bytes, the file has {size - 8:,} after it")
        try:
            header = json.loads(handle.read(header_bytes))
        except ValueError:
            raise damaged("its header is not valid JSON") from None
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != CACHE_FORMAT:
        raise damaged(f"format {metadata.get('format')!r}, expected {CACHE_FORMAT!r}")
    data_start, tensors = 8 + header_bytes, {}
    for name in _CACHE_TENSORS:
        if name not in header or header[name].get("dtype") not in _DTYPES:
            raise damaged(f"no {name} tensor")
        entry = header[name]
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
        if end - begin != expected or data_start + end > size:
            raise damaged(f"cut short at {size:,} bytes: {name} ends at byte {data_start + end:,}")
        tensors[name] = (_DTYPES[entry["dtype"]], entry["shape"], begin)
    return tensors, metadata, data_start


class DamagedShard(BudgetReasonerError):
    """A shard whose header or size is wrong: the cache command writes it again, a reader stops on it."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: not a readable top-k cache shard ({why}); rerun the cache command to write it "
                         f"again (finished shards are kept)")
        self.why = why


class TopKCache(torch.utils.data.Dataset):
    """A complete cache folder as a map-style dataset of sequences (the dicts `CacheShard.sequence` returns),
    read from the memory-mapped shards on demand: indexable, so the trainer can shuffle across the whole cache."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.info = read_cache_manifest(self.folder)
        names = sorted(name for name in self.info["files"] if name.startswith("shard-"))
        self.shards = [CacheShard(self.folder / name) for name in names]
        self.starts = np.cumsum([0] + [shard.sequences for shard in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard].sequence(index - int(self.starts[shard]))


def read_cache_manifest(folder: Path) -> dict:
    """The cache's COMPLETE.json, refused in one line when the folder is no complete compact cache."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise BudgetReasonerError(f"{folder}: not a complete teacher cache (no {COMPLETE}); run the cache first")
    info = read_json(folder / COMPLETE)
    if info.get("format") != CACHE_FORMAT:
        raise BudgetReasonerError(f"{folder}: a teacher cache in an older format ({info.get('format') or 'JSONL'}); "
                                  f"rerun the cache command with --overwrite to write it as {CACHE_FORMAT}")
    return info


def read_cache(folder: Path) -> Iterator[dict]:
    """Every sequence of a complete cache, in order: dicts with input_ids, positions, topk_ids and topk_logprobs
    (positions x k). The shards are checked against the manifest first, so a damaged one is an error, not less data."""
    verify_complete(folder)
    cache = TopKCache(folder)
    for shard in cache.shards:
        for index in range(shard.sequences):
            yield shard.sequence(index)
        shard.close()


def shard_counts(path: Path) -> dict:
    """A finished shard's counts from its header alone (checked, so a damaged shard is found before it is used)."""
    _, metadata, _ = _read_header(Path(path))
    return {key: int(metadata[key]) for key in ("sequences", "tokens", "positions", "max_topk_id", "max_input_id")}
