"""Narrow domains: one module each, behind one interface. `--domain NAME` takes a built-in (math, logic, choice, bignum);
`--domain PATH.py` loads a user's module from that file. A domain module defines:

  How a completion is graded (required, one of the two):
    VERIFIER = "math"          a verifier budget_reasoner.verify knows by name: math, logic, choice, numeric,
                               exact, regex:PATTERN (the answer is the pattern's last match), code
    def check(completion, reference) -> bool     or the module's own verdict on a whole completion, with
    def extract(completion) -> str | None        optional: the answer a completion gives, what majority vote
                                                 counts (default: the last \\boxed{...} content)
    def equivalent(answer, reference) -> bool    optional: when two extracted answers agree (default: equal)

  Where problems come from (required, one of the two; `--problems FILE` replaces either):
    def make_problems(count, seed, min_steps, max_steps, exclude) -> list
                               `count` distinct problems (dicts or objects with text `question` and `answer`),
                               none whose question is in `exclude`; the same seed gives the same list
    PROBLEMS = "file.jsonl"    or a file of problems (.jsonl, .csv or .parquet with `question` and `answer`
                               columns), relative to the module
    def read_problems(path, columns) -> list[dict]
                               optional: how the domain reads a problems file (PROBLEMS, `--problems`) when its
                               layout is its own (choice: GPQA's CSV columns), as problem rows; its docstring's
                               first line names the file it wants when none is given. Default: question/answer
                               columns (problems.load_problem_file)

  Optional:
    NAME = "capitals"          written in every problem row and run record (default: the file's stem)
    INSTRUCTION = "..."        put before the preset's generate.instruction when the preset has one: a real
                               model's prompt (the offline tiny models read bare questions)
    OWN_INSTRUCTION = True     INSTRUCTION replaces the preset's generate.instruction (which asks for a \\boxed{}
                               answer), empty or not: for a domain that answers otherwise (code: a ```python block)
    DECONTAMINATE = ("mbpp",)  benchmarks no training problem may overlap (13-gram), beside the preset's
                               generate.decontaminate: the domain's own eval sets
    def make_splits(num_train, num_eval, seed, min_steps, max_steps) -> (train, held_out)
                               default: the held-out problems are drawn first (seed + 1_000_003), then the
                               training ones with the held-out questions excluded
    def rejected_prefix(completion) -> str
                               the step checker: a rejected chain cut just after its first wrong step, so DPO
                               lowers only the error (math checks each `a op b = c` line)
    TOOLS = True               its chains call tools (tools.py): quickstart turns generate.tools and eval.tools
                               on for it, and the offline teacher's check runs its calls (default False)

  The offline world (preset cpu-tiny: teacher and student base trained from scratch) needs two more pieces,
  or NO_OFFLINE_WORLD = "why not" (one line: what the domain needs instead) to refuse it before anything runs:
  make_problems' problems carry `steps`, the lines of their worked chain (chain.format_chain writes it), and
    def single_steps(problems) -> list    each step as a one-step problem (with its one-line `steps`); it
                                          gets Problems (attributes question, answer, steps)
  From these train/pretrain.py builds the offline tokenizer (problems of 1..max_steps steps with chains), the
  tiny teacher (the same, with chains) and the student base (single steps with chains; problems of
  min..max_steps steps answered directly): SFT on the teacher's verified chains then teaches the student to
  compose what it knows.

`get_domain(spec)` loads a domain, checks it (one line per missing piece, naming the file) and returns a
`Domain`, which every stage takes; budget_reasoner.verify grades with its `verifier`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from budget_reasoner.errors import BudgetReasonerError

BUILT_IN = {"math": "budget_reasoner.domains.math", "logic": "budget_reasoner.domains.logic",
            "code": "budget_reasoner.domains.code",
            "choice": "budget_reasoner.domains.choice", "bignum": "budget_reasoner.domains.bignum"}
HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out split's own seed: never the training split's


@dataclass(frozen=True)
class Problem:
    """A domain's problem as the stages see it: text question and answer, and the worked chain's lines (offline)."""

    question: str
    answer: str
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProblemFile:
    """`--problems FILE` (with `--columns`): a user's problems instead of the domain's own."""

    path: Path
    columns: dict[str, str] = field(default_factory=dict)  # our column -> the file's


@dataclass(frozen=True)
class UserVerifier:
    """A domain module's own check (and extract, equivalent) behind budget_reasoner.verify's interface."""

    origin: str
    check_answer: Callable
    extract_answer: Callable | None = None
    equivalent_answers: Callable | None = None

    def extract(self, completion) -> str | None:
        if self.extract_answer is not None:
            return self.extract_answer(completion)
        from budget_reasoner.verify.plain import final_answer

        return final_answer(completion)

    def grade(self, completion, reference):
        from budget_reasoner.verify.math import Verdict

        return Verdict(bool(self.check_answer(completion, reference)))

    def ballot(self, completion) -> str | None:
        return self.extract(completion) if isinstance(completion, str) else None

    def equivalent(self, first: str, second: str) -> bool:
        if self.equivalent_answers is not None:
            return bool(self.equivalent_answers(first, second))
        return first.strip() == second.strip()


@dataclass(frozen=True)
class Domain:
    name: str
    verifier: object  # a verifier's name (str) budget_reasoner.verify knows, or a UserVerifier
    origin: str  # "built-in", or the module's file
    digest: str  # the module file's content (and a problems file's): part of every stage's fingerprint
    make_problems: Callable | None = None
    make_splits: Callable | None = None
    problems: ProblemFile | None = None
    instruction: str = ""
    own_instruction: bool = False  # the instruction replaces the preset's (OWN_INSTRUCTION)
    decontaminate: tuple[str, ...] = ()  # the domain's own benchmarks (DECONTAMINATE)
    rejected_prefix: Callable | None = None
    single_steps: Callable | None = None
    tools: bool = False  # its chains call tools (the module's TOOLS)
    read_problems: Callable | None = None  # the domain's reader of a problems file (default: question/answer columns)
    no_offline_world: str = ""  # why the domain has no offline world (refused in one line), or nothing

    def settings(self) -> dict:
        """What a stage's fingerprint records of the domain (built-ins by name: their code is the package's)."""
        verifier = self.verifier if isinstance(self.verifier, str) else self.origin  # the module grades: its file
        record = {"name": self.name, "verifier": verifier}
        if self.origin != "built-in" or self.problems is not None:
            record["digest"] = self.digest
        return record

    def splits(self, num_train: int, num_eval: int, seed: int, min_steps: int, max_steps: int) -> tuple[list[dict], list[dict]]:
        """Training and held-out problems as problem rows (`id, domain, question, answer, source`)."""
        if self.problems is not None:
            return self._file_splits(num_train, num_eval, seed)
        if self.make_splits is not None:
            train, held_out = self.make_splits(num_train, num_eval, seed, min_steps, max_steps)
        else:
            held_out = self.draw(num_eval, seed + HELD_OUT_SEED_OFFSET, min_steps, max_steps)
            train = self.draw(num_train, seed, min_steps, max_steps, exclude={p.question for p in held_out})
        return ([self.row(p, "procedural") for p in map(self._problem, train)],
                [self.row(p, "procedural-held-out") for p in map(self._problem, held_out)])

    def _file_splits(self, num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """A seeded shuffle of the file: the first `num_eval` problems held out, up to `num_train` of the rest trained on."""
        import random

        rows = self.read_problem_file(self.problems.path, self.problems.columns)
        if len(rows) <= num_eval:
            raise BudgetReasonerError(f"{self.problems.path}: {len(rows)} problems leave none to train on beside a "
                                      f"held-out split of generate.num_eval_problems={num_eval}; lower it with "
                                      f"--set generate.num_eval_problems=N")
        random.Random(seed).shuffle(rows)
        held_out = [{**row, "source": f"{row['source']}:held-out"} for row in rows[:num_eval]]
        return rows[num_eval : num_eval + num_train], held_out

    def read_problem_file(self, path, columns: dict[str, str] | None = None) -> list[dict]:
        """A problems file as problem rows, read the domain's way (its read_problems) or by question/answer columns."""
        if self.read_problems is not None:
            return self.read_problems(Path(path), dict(columns or {}))
        from budget_reasoner.problems import load_problem_file

        return load_problem_file(path, columns, self.name)

    def draw(self, count: int, seed: int, min_steps: int, max_steps: int, exclude=frozenset()) -> list[Problem]:
        """`count` problems from the domain's generator, as Problems."""
        if self.make_problems is None:
            raise BudgetReasonerError(f"{self.origin}: domain {self.name} draws no problems (no make_problems)")
        return [self._problem(p) for p in self.make_problems(count, seed, min_steps, max_steps, set(exclude))]

    def skills(self, problems: list[Problem]) -> list[Problem]:
        """Each step of `problems` as a one-step problem (the offline student base's skills)."""
        return [self._problem(p) for p in self.single_steps(problems)]

    def require_offline(self) -> None:
        """The offline world's pieces are there, or one line says what is missing."""
        if self.no_offline_world:
            raise BudgetReasonerError(f"domain {self.name} has no offline world (preset cpu-tiny): {self.no_offline_world}")
        missing = [piece for piece, ok in (("make_problems(...) whose problems carry `steps`", self.make_problems),
                                           ("single_steps(problems)", self.single_steps)) if ok is None]
        if not missing and not self.draw(1, 0, 1, 1)[0].steps:
            missing = ["make_problems(...) whose problems carry `steps`"]
        if missing:
            raise BudgetReasonerError(f"{self.origin}: the offline world (a preset with tiny-teacher/tiny-student) "
                                      f"needs {' and '.join(missing)}; use a preset with real models, or add them")

    def row(self, problem: Problem, source: str) -> dict:
        return {"id": problem_id(self.name, problem.question), "domain": self.name, "question": problem.question,
                "answer": problem.answer, "source": source}

    def _problem(self, problem) -> Problem:
        """A problem as the domain returned it (dict or object) checked and made a Problem."""
        def get(key, default=None):
            return problem.get(key, default) if isinstance(problem, dict) else getattr(problem, key, default)

        question, answer, steps = get("question"), get("answer"), get("steps", ())
        if not isinstance(question, str) or not question.strip() or answer is None or isinstance(answer, (dict, list)):
            raise BudgetReasonerError(f"{self.origin}: domain {self.name} made a problem without a text question and "
                                      f"answer: {str(problem)[:80]}")
        return Problem(question, answer if isinstance(answer, str) else str(answer), tuple(steps or ()))


def recorded(domain) -> str | dict:
    """What a stage's fingerprint and records hold of `domain`: a built-in's name as it is (or a verifier's name,
    passed as a string), else its settings with the content digest of the user's module or problems file."""
    if not isinstance(domain, Domain):
        return str(domain)
    settings = domain.settings()
    return domain.name if settings == {"name": domain.name, "verifier": domain.name} else settings


def problem_id(domain: str, question: str) -> str:
    return f"{domain}-" + hashlib.sha1(question.encode()).hexdigest()[:12]


def get_domain(spec, problems: ProblemFile | None = None, verifier: str | None = None,
               grading_only: bool = False) -> Domain:
    """A built-in domain by name, a user's module by path (`.py`), or a Domain as it is; with `problems` (a
    ProblemFile) its problem source and with `verifier` (a verifier's name) its grader replaced. `grading_only`
    (eval, grpo: the problems come from a file) does not ask the module for a problem source."""
    domain = spec if isinstance(spec, Domain) else _load(str(spec), needs_source=problems is None and not grading_only)
    if problems is not None:
        from budget_reasoner.io import file_sha256

        if not Path(problems.path).is_file():
            raise BudgetReasonerError(f"--problems {problems.path}: file not found")
        digest = hashlib.sha256(f"{domain.digest}:{file_sha256(problems.path)}:{sorted(problems.columns.items())}"
                                .encode()).hexdigest()[:16]
        domain = replace(domain, problems=problems, digest=digest)
    if verifier is not None:
        from budget_reasoner.verify import resolve_verifier

        resolve_verifier(verifier)  # an unknown name or a bad pattern: one line now, not at the first chain
        domain = replace(domain, verifier=verifier)
    return domain


_LOADED: dict[tuple, Domain] = {}  # (resolved path, mtime, needs_source) -> its Domain: a file is executed once


def _load(spec: str, needs_source: bool = True) -> Domain:
    if spec in BUILT_IN:
        return from_module(importlib.import_module(BUILT_IN[spec]), "built-in", spec, needs_source)
    path = Path(spec)
    if path.suffix != ".py":
        raise BudgetReasonerError(f"unknown domain {spec!r}; use one of {', '.join(BUILT_IN)}, or the path of a .py "
                                  f"file that defines one (see budget_reasoner/domains/__init__.py)")
    if not path.is_file():
        raise BudgetReasonerError(f"domain file {path} not found")
    key = (str(path.resolve()), path.stat().st_mtime_ns, needs_source)
    if key not in _LOADED:
        module_name = "budget_reasoner_domain_" + hashlib.sha1(key[0].encode()).hexdigest()[:12]
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            loader.loader.exec_module(module)
        except Exception as error:  # the user's file: say where it broke, in one line
            sys.modules.pop(module_name, None)
            raise BudgetReasonerError(f"{path}{_line_in(path, error)}: the domain module failed to import "
                                      f"({type(error).__name__}: {error})") from None
        _LOADED[key] = from_module(module, str(path), path.stem, needs_source)
    return _LOADED[key]


def _line_in(path: Path, error: Exception) -> str:
    """`:LINE` of the deepest frame of `error` in the file at `path` (a SyntaxError's own line), or nothing."""
    import traceback

    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else (lines[-1] if lines else None)
    return f":{line}" if line else ""


def from_module(module, origin: str, default_name: str, needs_source: bool = True) -> Domain:
    """Read a domain module's interface, checking it: every missing or malformed piece is one line naming `origin`."""
    problems: list[str] = []
    get = lambda name: getattr(module, name, None)  # noqa: E731

    def callable_or_none(name: str) -> Callable | None:
        value = get(name)
        if value is not None and not callable(value):
            problems.append(f"{origin}: {name} must be a function, got {type(value).__name__}")
            return None
        return value

    name = get("NAME") or default_name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problems.append(f"{origin}: NAME must be a short name (letters, digits, _ . -), got {name!r}")
    instruction = get("INSTRUCTION") or ""
    if not isinstance(instruction, str):
        problems.append(f"{origin}: INSTRUCTION must be text, got {type(instruction).__name__}")
    own_instruction, decontaminate = get("OWN_INSTRUCTION") or False, get("DECONTAMINATE") or ()
    if not isinstance(own_instruction, bool):
        problems.append(f"{origin}: OWN_INSTRUCTION must be True or False, got {own_instruction!r}")
    if isinstance(decontaminate, str) or not all(isinstance(spec, str) for spec in decontaminate):
        problems.append(f"{origin}: DECONTAMINATE must be a list of benchmark names, got {decontaminate!r}")
    check, named = callable_or_none("check"), get("VERIFIER")
    verifier = named
    if named is not None and check is not None:
        problems.append(f"{origin}: defines both VERIFIER and check(); keep one")
    elif check is not None:
        verifier = UserVerifier(origin, check, callable_or_none("extract"), callable_or_none("equivalent"))
    elif named is None:
        problems.append(f"{origin}: no verifier: set VERIFIER to a verifier's name (math, logic, choice, numeric, "
                        f"exact, regex:PATTERN, code) or define check(completion, reference) -> bool")
    elif not isinstance(named, str):
        problems.append(f"{origin}: VERIFIER must be a verifier's name, got {type(named).__name__}")
    else:
        from budget_reasoner.verify import resolve_verifier

        try:
            resolve_verifier(named)
        except BudgetReasonerError as error:
            problems.append(f"{origin}: VERIFIER: {error}")
    make_problems, make_splits = callable_or_none("make_problems"), callable_or_none("make_splits")
    file = get("PROBLEMS")
    problem_file = None
    if file is not None:
        if not isinstance(file, (str, Path)):
            problems.append(f"{origin}: PROBLEMS must be a file name, got {type(file).__name__}")
        else:
            problem_file = ProblemFile(Path(module.__file__).parent / file)
            if not problem_file.path.is_file():
                problems.append(f"{origin}: PROBLEMS file {problem_file.path} not found")
    read_problems = callable_or_none("read_problems")
    if needs_source and make_problems is None and make_splits is None and file is None:
        wanted = ((read_problems.__doc__ or "").strip().splitlines() or [""])[0] if read_problems else ""
        where = "" if origin == "built-in" else f"{origin}: "
        problems.append(f"{where}domain {name} has no problems of its own; pass --problems FILE ({wanted})"
                        if wanted else
                        f"{origin}: no problem source: define make_problems(count, seed, min_steps, max_steps, "
                        f"exclude) or set PROBLEMS = 'problems.jsonl' (or pass --problems FILE)")
    rejected_prefix, single_steps = callable_or_none("rejected_prefix"), callable_or_none("single_steps")
    tools = get("TOOLS") or False
    if not isinstance(tools, bool):
        problems.append(f"{origin}: TOOLS must be True or False, got {tools!r}")
    no_offline_world = get("NO_OFFLINE_WORLD") or ""
    if not isinstance(no_offline_world, str):
        problems.append(f"{origin}: NO_OFFLINE_WORLD must be text (why the domain has none), got "
                        f"{type(no_offline_world).__name__}")
    if problems:
        raise BudgetReasonerError("\n".join(problems))
    digest = "built-in"
    if origin != "built-in":
        from budget_reasoner.io import file_sha256

        files = [Path(origin)] + ([problem_file.path] if problem_file else [])
        digest = hashlib.sha256(":".join(file_sha256(path) for path in files).encode()).hexdigest()[:16]
    return Domain(name=name, verifier=verifier, origin=origin, digest=digest, make_problems=make_problems,
                  own_instruction=own_instruction is True, decontaminate=tuple(decontaminate),
                  make_splits=make_splits, problems=problem_file, instruction=instruction,
                  rejected_prefix=rejected_prefix, single_steps=single_steps, read_problems=read_problems,
                  tools=tools is True,
                  no_offline_world=no_offline_world if isinstance(no_offline_world, str) else "")


def with_tools(preset, domain: Domain):
    """`preset` with generate.tools and eval.tools on when the domain's chains call tools (quickstart)."""
    if not domain.tools or (preset.generate.tools and preset.eval.tools):
        return preset
    return replace(preset, generate=replace(preset.generate, tools=True), eval=replace(preset.eval, tools=True))


def with_instruction(preset, domain: Domain | str):
    """`preset` with the domain's INSTRUCTION put before generate.instruction, when the preset has one (a real
    model's prompt); the offline presets' empty instruction stays empty: the tiny models read bare questions.
    A domain with OWN_INSTRUCTION (code) has its instruction in place of the preset's, whatever that was.

    Applying it twice changes nothing: quickstart applies it to the whole run, and generate and evaluate to what they
    prompt with, so a stage run alone prompts as it does in a run. `domain` may be a built-in's name (eval grades a
    benchmark by name: mbpp is code's); a verifier's name (numeric, regex:...) has no instruction of its own."""
    if isinstance(domain, str):
        if domain not in BUILT_IN:
            return preset
        domain = get_domain(domain, grading_only=True)
    if domain.own_instruction and domain.instruction:
        return replace(preset, generate=replace(preset.generate, instruction=domain.instruction))
    if not domain.instruction or not preset.generate.instruction or preset.generate.instruction.startswith(domain.instruction):
        return preset  # nothing to add, or added already
    generate = replace(preset.generate, instruction=f"{domain.instruction}\n{preset.generate.instruction}")
    return replace(preset, generate=generate)
