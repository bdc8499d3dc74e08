"""The notebooks in notebooks/ must keep working as the CLI and presets change. The CPU notebook is
executed, cell by cell in IPython, on cpu-tiny at toy size; the Colab T4 one needs a GPU and the hub, so
every `!budget-reasoner` line of every notebook is also parsed against the real CLI (commands, option
names, required options) with its presets and preset keys loaded, its pip extras checked against
pyproject.toml, and its `budget_reasoner` imports resolved."""

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import typer

from budget_reasoner.cli import _preset, app

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_lines(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    return [line.rstrip("\n") for cell in notebook["cells"] if cell["cell_type"] == "code" for line in cell["source"]]


def parse_cli(args: list[str]) -> tuple[str, dict]:
    """Parse a command line the way the CLI would, without running it: (command name, its parameters)."""
    command = typer.main.get_command(app)
    context = command.make_context("budget-reasoner", list(args))
    name = "budget-reasoner"
    while hasattr(command, "resolve_command"):  # a group (typer ships its own click: duck-typed)
        rest = [*context._protected_args, *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)
    return name, context.params


def test_there_are_notebooks_for_the_gpu_and_the_cpu():
    assert {path.name for path in NOTEBOOKS} >= {"colab_t4.ipynb", "cpu_offline.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_every_cli_line_parses_and_names_real_presets(path):
    commands = [line[1:] for line in code_lines(path) if line.startswith("!budget-reasoner ")]
    assert commands
    parameters = {}  # a papermill-style parameters cell gives {PRESET}, {SET}...; other names become /tmp paths
    for cell in json.loads(path.read_text())["cells"]:
        if "parameters" in cell["metadata"].get("tags", []):
            exec("".join(cell["source"]), parameters)
    for line in commands:
        expanded = re.sub(r"\{(\w+)\}", lambda match: str(parameters.get(match[1], f"/tmp/{match[1]}")), line)
        args = shlex.split(expanded)[1:]
        try:
            name, params = parse_cli(args)
        except Exception as error:  # click's UsageError: unknown command or option, missing required option
            pytest.fail(f"{path.name}: {line!r}: {getattr(error, 'format_message', error.__str__)()}")
        if "preset" in params and params["preset"] != "auto":
            _preset(params["preset"], params.get("set_"), runs_models=False)  # unknown preset or key: BudgetReasonerError


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_pip_extras_and_imports_exist(path):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    lines = code_lines(path)
    for line in lines:
        for named in re.findall(r'-e "\.\[([\w,-]+)\]"', line):
            assert set(named.split(",")) <= extras, line
    imports = [line for line in lines if line.startswith("from budget_reasoner")]
    for line in imports:
        exec(line, {})  # an ImportError names the line


def test_the_cpu_notebook_runs_on_cpu_tiny(tiny_run, tmp_path, monkeypatch):
    """Executed as Colab would (IPython expands `!` lines and {VARS}); its parameters cell is overridden with the
    toy settings and a copy of the toy run, so `quickstart` resumes a finished run and the other cells (a new
    distillation, its eval, vram, the Python API) run for real. Any failing shell command fails the test."""
    pytest.importorskip("IPython")  # a dev dependency; CI has it
    from IPython.core.interactiveshell import InteractiveShell

    from tests.conftest import TINY

    out, _, _ = tiny_run
    shutil.copytree(out, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    commands = []

    def system(command):  # IPython's own `!` ignores failures; a notebook cell that fails must fail here
        command = shell.var_expand(command, depth=1)  # {RUN} and friends, from the notebook's namespace
        commands.append(command)
        finished = subprocess.run(command, shell=True, capture_output=True, text=True)
        assert finished.returncode == 0, f"{command}\n{finished.stdout[-2000:]}{finished.stderr[-2000:]}"

    monkeypatch.setattr(shell, "system", system)
    notebook = json.loads((ROOT / "notebooks" / "cpu_offline.ipynb").read_text())
    toy = " ".join(f"--set {key}={value}" for key, value in TINY.items())
    for cell in notebook["cells"]:
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or "install" in tags:
            continue
        source = "".join(cell["source"])
        if "parameters" in tags:
            source += f"\nRUN = {str(tmp_path / 'run')!r}\nSET = {toy!r}\n"
        result = shell.run_cell(source)
        assert result.success, f"{source}\n{result.error_in_exec or result.error_before_exec}"
    assert any("quickstart" in command and str(tmp_path / "run") in command for command in commands)
    summary = json.loads((tmp_path / "run" / "eval-alpha09" / "summary.json").read_text())
    assert summary["problems"] == TINY["generate.num_eval_problems"]
    assert json.loads((tmp_path / "run" / "distill-alpha09" / "stage.json").read_text())["stage"] == "distill"
    assert (tmp_path / "run" / "eval-maj8" / "test_time_compute.png").is_file()
    InteractiveShell.clear_instance()
