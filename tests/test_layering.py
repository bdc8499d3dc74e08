"""The layering ARCHITECTURE.md states: a stage never imports another stage to borrow its helpers; what two stages
share (sampling, problems, stage folders) lives below them. Read from the source, so a new import is caught."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "budget_reasoner"
STAGES = ("eval", "generate", "train")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_no_stage_imports_another_stage():
    crossings = [f"{path.relative_to(PACKAGE)} imports {module}"
                 for stage in STAGES for path in sorted((PACKAGE / stage).glob("*.py"))
                 for module in sorted(imported_modules(path))
                 for other in STAGES if other != stage and module.startswith(f"budget_reasoner.{other}")]
    assert crossings == []


def test_the_shared_services_import_no_stage():
    shared = [PACKAGE / "problems.py", PACKAGE / "stages.py", PACKAGE / "scoring.py", *sorted((PACKAGE / "sampling").glob("*.py"))]
    crossings = [f"{path.relative_to(PACKAGE)} imports {module}" for path in shared
                 for module in sorted(imported_modules(path))
                 if any(module.startswith(f"budget_reasoner.{stage}") for stage in STAGES)]
    assert crossings == []
