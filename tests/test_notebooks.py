"""The notebooks in notebooks/ must keep working as the CLI and presets change: every `!budget-reasoner`
line parses against the real CLI (commands, option names, required options), names real presets and
preset keys, every pip extra exists, and every `budget_reasoner` import resolves."""

import json
import re
import shlex
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
    for line in commands:
        args = shlex.split(re.sub(r"\{(\w+)\}", r"/tmp/\1", line))[1:]  # {RUN} -> /tmp/RUN
        try:
            name, params = parse_cli(args)
        except Exception as error:  # click's UsageError: unknown command or option, missing required option
            pytest.fail(f"{path.name}: {line!r}: {getattr(error, 'format_message', error.__str__)()}")
        if "preset" in params and params["preset"] != "auto":
            _preset(params["preset"], params.get("set_"))  # unknown preset or preset key: BudgetReasonerError


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
