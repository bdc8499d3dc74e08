"""The generate stage: problems -> k teacher chains each -> verified SFT set and preference pairs.

Folder written (`out`):
    problems/train.jsonl, problems/held_out.jsonl   id, domain, question, answer, source
    chains/shard-00000.jsonl ...                    every sampled chain with the verifier's verdict and its tokens
    sft/train.jsonl                                 prompt / completion (TRL conversational)
    pairs/train.jsonl                               prompt / chosen / rejected (TRL conversational)
Chains are written a shard of problems at a time, each shard only once all its chains are in; a rerun skips
finished shards, so Ctrl-C, a kill, a full disk or a server that stops answering loses at most the shard in flight.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from budget_reasoner import tools
from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, get_domain, recorded, with_instruction
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.generate.decontaminate import decontaminate, deduplicate
from budget_reasoner.hardware import PeakMemory
from budget_reasoner.io import (COMPLETE, add_session, claim_stage, mark_complete, read_json, read_jsonl, read_shards,
                                settings_of, shard_path, write_json, write_jsonl, writes_folder)
from budget_reasoner.problems import (PROBLEM_COLUMNS, PROBLEM_KINDS, benchmark_domain, load_benchmark,
                                      parse_problem_source)
from budget_reasoner.progress import say
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.verify import check

CHAIN_COLUMNS = ("id", "question", "answer", "completion", "correct", "teacher", "sample_index")
CHAIN_KINDS = {"question": "text", "completion": "text", "correct": "bool"}
MAX_SFT_CHAINS_PER_PROBLEM = 2
MAX_PAIRS_PER_PROBLEM = 2
# how a server teacher's chains are fetched, not which chains: a resumed run may change them (config.py)
TRANSPORT_SETTINGS = ("concurrency", "max_retries", "request_timeout")


def problem_settings(preset: Preset, domain: Domain | str) -> dict:
    gen = preset.generate
    # a built-in by name (as before), a user's module or problems file with its content's digest
    return {"domain": recorded(get_domain(domain)), "num_train": gen.num_train_problems, "num_eval": gen.num_eval_problems,
            "min_steps": gen.min_steps, "max_steps": gen.max_steps, "seed": gen.seed,
            "seed_sets": list(gen.seed_sets), "num_seed_problems": gen.num_seed_problems,
            "decontaminate": list(gen.decontaminate)}


def write_problems(folder: Path, preset: Preset, domain: Domain | str = "math", overwrite: bool = False) -> tuple[list[dict], list[dict]]:
    """Draw (or reread) the train and held-out problems. A folder drawn with other settings is an error, not a mix.

    Train = the domain's problems (procedural, or its file, or --problems) + the seed sets' training problems,
    without repeats and without any that overlap the held-out split or a `generate.decontaminate` set (13-gram,
    see decontaminate.py)."""
    folder = Path(folder)
    settings = problem_settings(preset, domain)
    if claim_stage(folder, "problems", {}, {"problems": settings}, overwrite, record=COMPLETE) is not None:
        return (read_jsonl(folder / "train.jsonl", PROBLEM_COLUMNS, PROBLEM_KINDS),
                read_jsonl(folder / "held_out.jsonl", PROBLEM_COLUMNS, PROBLEM_KINDS))
    gen, domain = preset.generate, get_domain(domain)
    train_rows, held_rows = domain.splits(gen.num_train_problems, gen.num_eval_problems, gen.seed, gen.min_steps,
                                          gen.max_steps)
    seed_sets = [spec for spec in gen.seed_sets if graded_alike(spec, domain)]
    if left_out := [spec for spec in gen.seed_sets if spec not in seed_sets]:
        say(f"problems: seed set(s) {', '.join(left_out)} left out: graded otherwise than domain {domain.name}'s "
            f"answers, none of their chains could be verified")
    seeds = [{key: row[key] for key in PROBLEM_COLUMNS}
             for spec in seed_sets for row in load_benchmark(*parse_problem_source(spec), train=True)]
    if 0 < gen.num_seed_problems < len(seeds):
        seeds = random.Random(gen.seed).sample(seeds, gen.num_seed_problems)
    train_rows, duplicates = deduplicate(train_rows + seeds)
    drawn = len(train_rows)
    references = {"held-out": [row["question"] for row in held_rows]}
    for spec in dict.fromkeys([*gen.decontaminate, *domain.decontaminate]):  # the preset's sets and the domain's own
        references[spec] = [row["question"] for row in load_benchmark(*parse_problem_source(spec))]
    train_rows, removed = decontaminate(train_rows, references)
    if drawn and not train_rows:  # nothing left to train on: say why before a teacher is asked for nothing
        raise BudgetReasonerError(f"problems: all {drawn} training problems overlap (13-gram) "
                                  f"{', '.join(f'{name} ({count})' for name, count in removed.items() if count)}; "
                                  f"train on problems that are not these sets'")
    write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / "held_out.jsonl", held_rows)
    mark_complete(folder, {"settings": settings, "train": len(train_rows), "duplicates_dropped": duplicates,
                           "contaminated_dropped": removed})
    if duplicates or any(removed.values()):
        say(f"problems: {len(train_rows)} for training; dropped {duplicates} repeats and "
            f"{', '.join(f'{count} overlapping {name}' for name, count in removed.items())}")
    return train_rows, held_rows


STRUCTURED_VERIFIERS = ("code", "choice", "logic")  # answers of one form: test code, a letter, an assignment


def graded_alike(seed_set: str, domain: Domain) -> bool:
    """Whether a seed set's problems (graded by their benchmark's verifier: GSM8K's by math, MBPP's by code) can be
    verified by the domain's: the same verifier, or two that both read a plain final answer (math, numeric, exact,
    regex). A domain module's own check() is trusted with any."""
    theirs, ours = benchmark_domain(parse_problem_source(seed_set)[0]), domain.verifier
    if not isinstance(ours, str) or theirs == ours:
        return True
    return theirs not in STRUCTURED_VERIFIERS and ours not in STRUCTURED_VERIFIERS


@writes_folder("out")
def generate(out: Path, preset: Preset, teacher, domain: Domain | str = "math", overwrite: bool = False,
             token_price: tuple[float, float] | None = None, allow_none_verified: bool = False) -> dict:
    """Sample `samples_per_problem` chains per training problem from `teacher`, verify, build SFT set and pairs.

    `teacher` is a backend from `budget_reasoner.generate.teachers` (anything with `.name` and `.sample`; a
    `.source`, the model's path or name, makes its content part of the folder's fingerprint, else its name is);
    a trained student stage samples for self-play the same way (recipe.make_sampler).
    `out` resumes only what the same teacher and settings started (io.claim_stage); `overwrite` starts over.
    `token_price` (USD per million prompt tokens, per million completion tokens) prices an API teacher's tokens
    in the stage record. No verified chain at all is an error (a wrong teacher or preset) unless
    `allow_none_verified`: a weak student's self-play samples may truly have none.
    """
    out = Path(out)
    preset = with_instruction(preset, get_domain(domain))  # the domain's instruction (code: its own), as quickstart's
    generate_settings = {key: value for key, value in settings_of(preset, "generate")["generate"].items()
                         if key not in TRANSPORT_SETTINGS and not (key == "tools" and not value)}  # as before tools
    domain = get_domain(domain)
    settings = {"generate": generate_settings, "domain": recorded(domain)}
    if preset.generate.tools:  # how the calls ran changes the chains
        settings |= settings_of(preset, "tools")
        if not hasattr(teacher, "sample_with_tools"):
            raise BudgetReasonerError(f"generate.tools: teacher {teacher.name} cannot run tool calls; they run on a local "
                                      f"model (a path or hub id), not on an openai: server")
    elif getattr(domain, "tools", False):
        say(f"generate: domain {domain.name}'s chains call tools, which run only with generate.tools (--tools)")
    if (record := claim_stage(out, "generate", {"teacher": getattr(teacher, "source", None) or f"teacher:{teacher.name}"},
                              settings, overwrite, record=COMPLETE)) is not None:
        return record
    gen = preset.generate
    problems, _ = write_problems(out / "problems", preset, domain, overwrite)
    started = time.time()
    chains_dir = out / "chains"
    device = getattr(teacher, "device", None)  # a local teacher's device; a server's memory is not ours to measure
    peak = PeakMemory(device or "cpu")
    try:
        with peak:
            _sample_shards(problems, chains_dir, gen, teacher, domain,
                           tools.settings_of(preset.tools) if gen.tools else None)
    finally:  # an interrupted session's compute counts too
        compute = add_session(out, time.time() - started, peak.bytes if device else None)
    chains = read_shards(chains_dir, CHAIN_COLUMNS, CHAIN_KINDS)
    sft_rows = build_sft_rows(chains, gen.instruction)
    pair_rows = build_pairs(chains, gen.instruction, domain.rejected_prefix)
    write_jsonl(out / "sft" / "train.jsonl", sft_rows)
    write_jsonl(out / "pairs" / "train.jsonl", pair_rows)
    drawn = read_json(out / "problems" / "COMPLETE.json")
    summary = {
        "teacher": teacher.name,
        "problems": len(problems),
        "problems_dropped": {"repeats": drawn.get("duplicates_dropped", 0), **drawn.get("contaminated_dropped", {})},
        "chains": len(chains),
        "verified_chains": sum(row["correct"] for row in chains),
        "teacher_pass_rate": sum(row["correct"] for row in chains) / max(1, len(chains)),
        "sft_examples": len(sft_rows),
        "pairs": len(pair_rows),
        "tokens": sum(row.get("tokens") or 0 for row in chains),  # generated (a server's: from its `usage`)
        **(tool_counts(chains) if gen.tools else {}),
        "prompt_tokens": sum(row.get("prompt_tokens") or 0 for row in chains),  # a server's, as it billed them
        "device": device or "server",
        **compute,  # seconds summed over sessions, peak the highest
    }
    if token_price is not None:
        summary["token_price_usd_per_million"] = {"prompt": token_price[0], "completion": token_price[1]}
        summary["cost_usd"] = (summary["prompt_tokens"] * token_price[0] + summary["tokens"] * token_price[1]) / 1e6
    if not sft_rows and not allow_none_verified:
        raise BudgetReasonerError(f"generate: the verifier accepted none of {len(chains)} teacher chains; check the teacher and --preset")
    write_json(out / "summary.json", summary)
    mark_complete(out, summary)
    return summary


def _sample_shards(problems: list[dict], chains_dir: Path, gen, teacher, domain: str, tool_settings=None) -> None:
    """Sample and verify the chains of each shard of problems not yet on disk (`tool_settings`: tools.ToolSettings
    when generate.tools)."""
    for index, start in enumerate(range(0, len(problems), gen.shard_size)):
        path = shard_path(chains_dir, index)
        if path.exists():
            continue  # finished before an interruption
        shard = problems[start : start + gen.shard_size]
        prompts = [chat_prompt(p["question"], gen.instruction) for p in shard]
        try:
            if gen.tools:  # the chains' python blocks run in the sandbox as they are written (tools.py)
                samples = teacher.sample_with_tools(prompts, gen.samples_per_problem, gen.temperature,
                                                    gen.max_new_tokens, seed=gen.seed + index, tools=tool_settings)
            else:
                samples = teacher.sample(prompts, gen.samples_per_problem, gen.temperature, gen.max_new_tokens,
                                         seed=gen.seed + index)
        except BudgetReasonerError as error:  # a server that stopped answering: say what is safe on disk
            raise BudgetReasonerError(f"{error}; {index} finished shard(s) of chains kept in {chains_dir}, the same "
                                      f"command resumes after them") from None
        rows = [chain_row(p, sample, k, teacher.name, domain) for p, per_problem in zip(shard, samples)
                for k, sample in enumerate(per_problem)]
        write_jsonl(path, rows)
        say(f"generate: shard {index} written ({sum(r['correct'] for r in rows)}/{len(rows)} chains verified)")


def chain_row(problem: dict, sample, index: int, teacher: str, domain: str) -> dict:
    """One sampled chain with the verifier's verdict; `tokens` (generated) and `prompt_tokens` (a server's billed
    prompt tokens, this chain's share of its request's) when the teacher counted them."""
    completion = getattr(sample, "text", sample)
    row = {"id": problem["id"], "question": problem["question"], "answer": problem["answer"], "completion": completion,
           "correct": check(domain, completion, problem["answer"]), "teacher": teacher, "sample_index": index,
           "tokens": getattr(sample, "tokens", None), "prompt_tokens": getattr(sample, "prompt_tokens", None)}
    if hasattr(sample, "tool_calls"):  # generate.tools: the calls it ran, and how many of them failed
        row |= {"tool_calls": sample.tool_calls, "tool_failures": sample.tool_failures}
    return row


def tool_counts(chains: list[dict]) -> dict:
    """The summary's tool-call counts: per chain on average, and the share of calls that failed."""
    calls = sum(row.get("tool_calls") or 0 for row in chains)
    return {"tool_calls_per_chain": calls / max(1, len(chains)),
            "tool_calls_failed": sum(row.get("tool_failures") or 0 for row in chains) / max(1, calls)}


def _by_problem(chains: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in chains:
        grouped.setdefault(row["id"], []).append(row)
    return grouped


def build_sft_rows(chains: list[dict], instruction: str = "") -> list[dict]:
    """Verified chains as TRL prompt-completion rows: distinct correct chains, at most a few per problem."""
    rows = []
    for samples in _by_problem(chains).values():
        kept = list(dict.fromkeys(row["completion"] for row in samples if row["correct"]))
        for completion in kept[:MAX_SFT_CHAINS_PER_PROBLEM]:
            rows.append({"id": samples[0]["id"], "prompt": chat_prompt(samples[0]["question"], instruction),
                         "completion": [{"role": "assistant", "content": completion}]})
    return rows


def merge_chains(out: Path, sources: list[Path], instruction: str = "", overwrite: bool = False) -> dict:
    """One SFT set from the verified chains of several generate folders (self-play: the teacher's, then a student's).

    The rule, build_sft_rows' over the sources' chains in the order given: per problem, the distinct verified
    chains (exact text), the first source's before the next one's, at most MAX_SFT_CHAINS_PER_PROBLEM. A student's
    chain thus adds to a problem only what the teacher's chains lack: a problem the teacher never solved, or a
    second, different solution. Writes `out/train.jsonl`; `out` is a stage folder of its own (fingerprinted on its
    sources), so a rerun skips it and changed sources are refused, never mixed."""
    out = Path(out)
    settings = {"instruction": instruction, "max_per_problem": MAX_SFT_CHAINS_PER_PROBLEM}
    if (record := claim_stage(out, "merge-chains", {f"chains-{i}": source for i, source in enumerate(sources)},
                              settings, overwrite, record=COMPLETE)) is not None:
        return record
    chains = [read_shards(Path(source) / "chains", CHAIN_COLUMNS, CHAIN_KINDS) for source in sources]
    rows = build_sft_rows([row for rows in chains for row in rows], instruction)
    write_jsonl(out / "train.jsonl", rows)
    alone = [len(build_sft_rows(rows, instruction)) for rows in chains]  # what each source gives on its own
    summary = {"sources": [str(source) for source in sources], "sft_examples": len(rows), "examples_alone": alone,
               "problems": len({row["id"] for row in rows})}
    mark_complete(out, summary)
    return summary


def build_pairs(chains: list[dict], instruction: str = "", cut_rejected=None) -> list[dict]:
    """Preference pairs: a verified chain against a rejected one for the same problem.

    `cut_rejected` (a domain's `rejected_prefix`) shortens a rejected chain to end at its first wrong step.
    """
    cut_rejected = cut_rejected or (lambda completion: completion)
    rows = []
    for samples in _by_problem(chains).values():
        chosen = list(dict.fromkeys(row["completion"] for row in samples if row["correct"]))
        rejected = list(dict.fromkeys(cut_rejected(row["completion"]) for row in samples if not row["correct"]))
        for good, bad in list(zip(chosen, rejected))[:MAX_PAIRS_PER_PROBLEM]:
            rows.append({"id": samples[0]["id"], "prompt": chat_prompt(samples[0]["question"], instruction),
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows
