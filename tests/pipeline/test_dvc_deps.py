"""dvc.yaml deps are right by construction: every Python file a stage runs - the transitive import closure of
the stage's ``python -m`` module (grimp), plus the packages' __init__ files - is covered by one of the stage's
deps (the file itself or a folder above it). Editing any of them reruns the stage."""
from __future__ import annotations

import re
from pathlib import Path

import grimp
import pytest
import yaml
from testkit import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(cmd: str, graph: grimp.ImportGraph) -> str:
    """``... -m pipeline.X ...`` -> the module that runs (a package runs its ``__main__``)."""
    name = re.search(r"-m\s+(pipeline[\w.]*)", cmd).group(1)
    return f"{name}.__main__" if f"{name}.__main__" in graph.modules else name


def module_file(name: str) -> Path:
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def closure_files(module: str, graph: grimp.ImportGraph) -> set[Path]:
    """The files of ``module``, of everything it imports (transitively) and of their parent packages."""
    modules = {module} | graph.find_upstream_modules(module)
    for name in list(modules):
        parts = name.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {module_file(m).relative_to(REPO) for m in modules}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("pipeline", cache_dir=None)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_file_the_stage_imports(stage, graph):
    spec = STAGES[stage]
    deps = [Path(d) for d in spec.get("deps", [])]
    files = closure_files(stage_module(spec["cmd"], graph), graph)
    missing = sorted(str(f) for f in files if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage '{stage}' runs these files but does not list them (or a folder above " \
                        f"them) in deps: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_exist(stage):
    code = [d for d in STAGES[stage].get("deps", []) if d.startswith("pipeline")]
    assert code and all((REPO / d).exists() for d in code), code
