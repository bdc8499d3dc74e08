"""Tool-using student against the same student without tools, on the offline big-number set (domains/bignum.py).

    OMP_NUM_THREADS=1 python benchmarks/tools_offline.py --out /tmp/tools-offline --seeds 0 1 2 --write tools_offline

Per seed, everything from scratch on cpu-tiny, sized down (SIZES; `--set` changes any of it):
1. bootstrap the bignum world: the tiny teacher learns chains that call the calculator (a python block per operation,
   its output read back), the student base learns every single operation in both notations (with a call, and as head
   arithmetic), and multi-step problems answered directly. The student has the teacher's shape (1.8M parameters):
   cpu-tiny's 0.8M student did not learn to copy 4-digit numbers in time (copying a problem's first operation into
   its call: 15% of 60 after 800 base steps, 37% after 2400; the 1.8M shape: 43% after 400, all the one-step ones),
   and every tool chain is copying (the question's numbers into the call, the output into the next call). Teacher and
   student base are trained once each (models/ROLE.json records how), so a change to one keeps the other;
2. generate with tools: the teacher samples chains on the training problems, its calls run in the sandbox, the
   verified chains are the tool student's SFT set;
3. SFT two students from the same base, on the same problems, as many chains each: the tool student on the
   teacher's verified tool chains (output blocks masked out of the loss), the plain student on the gold head
   arithmetic chains of those problems (`a op b=c` per operation: every one right, the best a plain teacher could do);
4. held-out accuracy, greedy: the tool student with tools (eval.tools), the plain student without, plus the student
   base and the teacher for reference; McNemar's exact test between the two students on the same problems, per seed
   and pooled.
Stage folders resume (a rerun of the same command continues where it stopped).
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import seeded_parser, write_result  # noqa: E402
from reproduce import mcnemar, verdicts  # noqa: E402

SIZES = {
    "model.max_length": 192, "generate.min_steps": 1, "generate.max_steps": 2,
    "generate.num_train_problems": 600, "generate.num_eval_problems": 200, "generate.samples_per_problem": 2,
    "generate.max_new_tokens": 96, "generate.shard_size": 300,
    "eval.maj_k": 1, "eval.max_new_tokens": 96,
    "pretrain.num_problems": 12000, "pretrain.check_problems": 100, "pretrain.teacher_steps": 2000,
    "pretrain.student_steps": 800, "sft.max_steps": 1000,
    "model.tiny_student.hidden_size": 192, "model.tiny_student.num_heads": 6, "model.tiny_student.intermediate_size": 576,
}
# what each offline model's training depends on (models/ROLE.json): a rerun with other values is refused
ROLE_SETTINGS = {
    "teacher": ("seed", "model.tiny_teacher", "model.max_length", "generate.max_new_tokens", "generate.max_steps",
                "pretrain.teacher_steps", "pretrain.teacher_target_accuracy", "pretrain.cooldown_at_accuracy",
                "pretrain.cooldown_steps", "pretrain.check_every", "pretrain.check_problems", "pretrain.batch_size",
                "pretrain.learning_rate", "pretrain.num_problems", "tools"),
    "student-base": ("seed", "model.tiny_student", "model.max_length", "generate.max_new_tokens", "generate.min_steps",
                     "generate.max_steps", "pretrain.student_steps", "pretrain.batch_size", "pretrain.learning_rate",
                     "pretrain.num_problems"),
}


def bootstrap_role(out: Path, preset, domain, role: str) -> dict:
    """Train one offline model (train/pretrain.bootstrap, its held-out problems kept out) unless models/ROLE.json
    says it was trained with these settings; returns its record."""
    from budget_reasoner.generate.pipeline import write_problems
    from budget_reasoner.io import read_json, settings_of, write_json
    from budget_reasoner.train.pretrain import bootstrap

    marker = out / "models" / f"{role}.json"
    settings = json.loads(json.dumps(settings_of(preset, *ROLE_SETTINGS[role])))
    if marker.exists():
        record = read_json(marker)
        if record["settings"] != settings:
            raise SystemExit(f"{marker}: trained with other settings; delete {out / 'models' / role} and it to retrain")
        return record
    _, held_out = write_problems(out / "data" / "problems", preset, domain)
    log = bootstrap(preset, out / "models", {row["question"] for row in held_out}, roles=(role,), domain=domain)[role]
    record = {"settings": settings, **{key: log[key] for key in ("parameters", "seconds", "steps", "check_accuracy")
                                       if key in log}}
    write_json(marker, record)
    return record


def main():
    parser = seeded_parser(__doc__.splitlines()[0])
    parser.add_argument("--note", default="", help="the conditions: other jobs beside it, seeds run at the same time")
    args = parser.parse_args()

    from budget_reasoner.config import load_preset, parse_overrides
    from budget_reasoner.domains import bignum, get_domain, problem_id
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.generate import generate
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.io import read_jsonl, write_jsonl
    from budget_reasoner.recipe import make_teacher
    from budget_reasoner.train.sft import sft

    domain = get_domain("bignum")
    rows, pooled_plain, pooled_tools = [], [], []
    for seed in args.seeds:
        started = time.time()
        out = args.out / f"seed{seed}"
        preset = load_preset("cpu-tiny", {**SIZES, **parse_overrides(args.overrides), "seed": seed, "generate.seed": seed})
        with_tools = replace(preset, generate=replace(preset.generate, tools=True), eval=replace(preset.eval, tools=True))
        hardware = hardware_for(preset)
        boot = {role: bootstrap_role(out, preset, domain, role) for role in ("teacher", "student-base")}
        data = generate(out / "data", with_tools, make_teacher(str(out / "models" / "teacher"), preset, hardware), domain)

        # the plain student's set: the same problems, as many chains, each its gold head-arithmetic chain
        tool_rows = read_jsonl(out / "data" / "sft" / "train.jsonl")
        gen = preset.generate  # the training problems drawn again as the domain drew them, with their steps
        held = {row["question"] for row in read_jsonl(out / "data" / "problems" / "held_out.jsonl")}
        gold = {problem_id(domain.name, problem.question): problem for problem in
                domain.draw(gen.num_train_problems, gen.seed, gen.min_steps, gen.max_steps, exclude=held)}
        plain_rows = [{"id": row["id"], "prompt": row["prompt"],
                       "completion": [{"role": "assistant", "content": bignum.plain_chain(gold[row["id"]])}]}
                      for row in tool_rows]
        write_jsonl(out / "plain" / "train.jsonl", plain_rows)

        sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", out / "sft-tools", preset)
        sft(out / "plain" / "train.jsonl", out / "models" / "student-base", out / "sft-plain", preset)
        held_out = out / "data" / "problems" / "held_out.jsonl"
        summaries = {
            "tool_student": evaluate(out / "sft-tools", held_out, out / "eval" / "sft-tools", with_tools, domain),
            "plain_student": evaluate(out / "sft-plain", held_out, out / "eval" / "sft-plain", preset, domain),
            "student_base": evaluate(out / "models" / "student-base", held_out, out / "eval" / "base", preset, domain),
            "teacher_with_tools": evaluate(out / "models" / "teacher", held_out, out / "eval" / "teacher", with_tools,
                                           domain),
        }
        answers = {name: verdicts(out / "eval" / folder)
                   for name, folder in (("tool_student", "sft-tools"), ("plain_student", "sft-plain"))}
        ids = sorted(answers["plain_student"])
        plain = [answers["plain_student"][i] for i in ids]
        tools = [answers["tool_student"][i] for i in ids]
        pooled_plain += plain
        pooled_tools += tools
        rows.append({
            "seed": seed, "held_out_problems": len(ids),
            "accuracy": {name: summary["accuracy"] for name, summary in summaries.items()},
            "tool_calls_per_problem": {name: summaries[name]["tool_calls_per_problem"]
                                       for name in ("tool_student", "teacher_with_tools")},
            "tool_student_vs_plain": mcnemar(plain, tools),
            "teacher_check_accuracy": boot.get("teacher", {}).get("check_accuracy"),
            "teacher_steps": boot.get("teacher", {}).get("steps"),
            "generate": {key: data[key] for key in ("chains", "verified_chains", "teacher_pass_rate", "sft_examples",
                                                    "tool_calls_per_chain", "tool_calls_failed")},
            "sft_examples_each": len(plain_rows),
            "seconds": time.time() - started,
        })
        print(json.dumps(rows[-1]), flush=True)
    accuracies = {name: [row["accuracy"][name] for row in rows] for name in rows[0]["accuracy"]}
    result = {"sizes": SIZES, "overrides": args.overrides, "note": args.note, "seeds": rows,
              "mean_accuracy": {name: sum(values) / len(values) for name, values in accuracies.items()},
              "pooled_tool_student_vs_plain": mcnemar(pooled_plain, pooled_tools)}
    print(json.dumps({key: result[key] for key in ("mean_accuracy", "pooled_tool_student_vs_plain")}))
    if args.write:
        print("wrote", write_result(args.write, result))


if __name__ == "__main__":
    main()
