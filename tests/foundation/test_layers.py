"""The package's layers point down (import-linter contracts in pyproject.toml), and the dependency graph is
visible at module level: no module imports the package's own modules inside a function, and every
function-level import of a third-party package says why on its line (optional heavy dependencies only)."""
from __future__ import annotations

import ast
from pathlib import Path

from importlinter.application.use_cases import lint_imports
from importlinter.configuration import configure
from testkit import REPO

PIPELINE = REPO / "pipeline"


def test_import_contracts_are_kept(capsys):
    configure()  # what the lint-imports command does first
    kept = lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out[-4000:]


def _function_level_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    yield node, [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    yield node, [node.module or ""]


def test_no_function_level_imports_of_the_package():
    found = [f"{p.relative_to(REPO)}:{node.lineno} {names}" for p in sorted(PIPELINE.rglob("*.py"))
             for node, names in _function_level_imports(p) if any(n.split(".")[0] == "pipeline" for n in names)]
    assert not found, "import these at module level (the dependency graph must be visible):\n" + "\n".join(found)


def test_function_level_imports_give_a_reason():
    missing = []
    for path in sorted(PIPELINE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node, names in _function_level_imports(path):
            if "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {names}")
    assert not missing, "a function-level import needs a one-line reason (a comment):\n" + "\n".join(missing)
