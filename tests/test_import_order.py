"""Unsloth comes first: the CLI settles the backend before it imports a stage module, so `import unsloth` runs
before transformers, TRL and peft (as Unsloth's docs require), and every trainer class is built after it, from
the classes Unsloth patched. Checked in child processes: importing Unsloth patches the whole process."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

from budget_reasoner import hardware

PATCHED = ("transformers", "trl", "peft")


def _child(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNSLOTH_DISABLE_CPU_FALLBACK": "0", "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_cli_module_imports_no_model_library():
    """Importing the CLI (what the `budget-reasoner` entry point does first) loads none of them: a stage's
    imports wait until its command has settled the backend."""
    child = _child("import sys, budget_reasoner.cli; print([m for m in ('transformers', 'trl', 'peft', 'unsloth') "
                   "if m in sys.modules])")
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "[]"


def test_a_late_unsloth_import_is_reported_not_silenced(monkeypatch):
    """Imported after transformers (a script that imported a stage module first), Unsloth still loads, but the
    warning says so and names the fix; nothing filters Unsloth's own warning away."""
    imported = []
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    real_import = hardware.importlib.import_module  # the one importlib module: only Unsloth's import is recorded
    monkeypatch.setattr(hardware.importlib, "import_module",
                        lambda name, *args: imported.append(name) if name == "unsloth" else real_import(name, *args))
    import transformers  # noqa: F401  (already loaded in this process; the point is that it is)

    with pytest.warns(UserWarning, match=r"unsloth is imported after transformers.*prepare_backend\(preset\)"):
        hardware.import_unsloth()
    assert imported == ["unsloth"]
    with warnings.catch_warnings(record=True) as caught:  # no filter of ours stands between Unsloth and the user
        warnings.simplefilter("default")
        hardware.import_unsloth()
    assert [str(w.message) for w in caught if "unsloth" in str(w.message)] and imported == ["unsloth", "unsloth"]


# The child runs `budget-reasoner sft` (fused loss) then `budget-reasoner distill` on the Unsloth backend (its CPU
# fallback), recording the order in which top-level packages start importing (a finder first on sys.meta_path
# sees each; sys.modules' own order will not do, as CPython moves a module to its end when its import finishes)
# and every Trainer subclass budget_reasoner builds, with whether Unsloth was loaded by then.
CLI_CHILD = r"""
import builtins, json, sys
started = []

class RecordImports:
    def find_spec(self, name, path=None, target=None):
        if "." not in name and name not in started:
            started.append(name)
        return None

sys.meta_path.insert(0, RecordImports())
built, original_build_class = [], builtins.__build_class__

def build_class(func, name, *bases, **kwargs):
    cls = original_build_class(func, name, *bases, **kwargs)
    if name.endswith("Trainer") and cls.__module__.startswith("budget_reasoner"):
        built.append((cls, "unsloth" in sys.modules))
    return cls

builtins.__build_class__ = build_class
from budget_reasoner.cli import app

model, data, out = sys.argv[1:4]
common = ["--preset", "cpu-tiny", "--set", "model.backend=unsloth", "--set", "lora.r=4", "--set", "lora.alpha=8"]
for command in (["sft", "--data", data, "--student", model, "--out", f"{out}/sft", "--set", "sft.fused_loss=true",
                 "--set", "sft.max_steps=2", "--set", "sft.batch_size=2"],
                ["distill", "--teacher", model, "--data", data, "--student", model, "--out", f"{out}/distill",
                 "--set", "distill.max_steps=2", "--set", "distill.batch_size=2", "--set", "distill.top_k=4"]):
    try:
        app(command + common, standalone_mode=False)
    except SystemExit as exit:
        assert exit.code in (0, None), exit.code
import transformers, trl
print("REPORT", json.dumps({
    "first": {name: started.index(name) for name in ("unsloth", "transformers", "trl", "peft")},
    "classes": [{"name": cls.__name__, "unsloth_loaded": loaded, "base": cls.__bases__[0].__qualname__,
                 "base_is_current": cls.__bases__[0] is {"KDTrainer": transformers.Trainer}.get(cls.__name__, trl.SFTTrainer)}
                for cls, loaded in built],
}))
"""


@pytest.fixture(scope="module")
def tiny_model_and_data(tmp_path_factory):
    """A 2-layer Qwen2 of a few thousand parameters and six prompt-completion rows, on disk."""
    from budget_reasoner.config import TinyModelConfig
    from budget_reasoner.io import write_jsonl
    from budget_reasoner.models import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("order")
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}"}],
             "completion": [{"role": "assistant", "content": f"<think>\n{a}+{b}={a + b}\n</think>\n\\boxed{{{a + b}}}"}]}
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 3))]
    tokenizer = build_tokenizer([row["prompt"][0]["content"] + row["completion"][0]["content"] for row in rows] * 4)
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                        intermediate_size=64), max_positions=96, seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "sft.jsonl", rows)
    return root


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")
def test_cli_imports_unsloth_first_and_builds_trainers_after_it(tiny_model_and_data):
    root = tiny_model_and_data
    child = _child(CLI_CHILD, str(root / "model"), str(root / "sft.jsonl"), str(root / "out"))
    log = child.stdout + child.stderr
    assert child.returncode == 0, log[-4000:]
    report = json.loads(log.split("REPORT ", 1)[1].splitlines()[0])
    first = report["first"]
    assert all(first["unsloth"] < first[name] for name in PATCHED), first  # Unsloth's docs: before all three
    assert "Unsloth should be imported before" not in log and "unsloth is imported after" not in log
    classes = {entry["name"]: entry for entry in report["classes"]}
    assert set(classes) == {"FusedLossSFTTrainer", "KDTrainer"}, report["classes"]  # both stages built theirs
    for entry in classes.values():
        assert entry["unsloth_loaded"] and entry["base_is_current"], entry
    # the fused SFT trainer derives from the SFTTrainer Unsloth's CPU fallback put in trl, not TRL's own
    assert "<locals>" in classes["FusedLossSFTTrainer"]["base"], classes
    for stage in ("sft", "distill"):
        record = json.loads((root / "out" / stage / "stage.json").read_text())
        assert record["backend"] == "unsloth"
