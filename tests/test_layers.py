"""The project's floors, read from the code: no import runs back up (docs/design.md, "Layout").

    common.core  <  common.data, common.merging  <  common.model  <  common.protocol  <  common.api
                 <  clients, server  <  benchmarks, deployment

A module may import its own package and any lower floor; common.data and common.merging (pure data handling
and pure tensor math) do not import each other; clients and server do not import each other (they meet only
through the message contracts). Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"common.core": 0, "common.data": 1, "common.merging": 1, "common.model": 2, "common.protocol": 3,
          "common.api": 4, "clients": 5, "server": 5, "benchmarks": 6, "deployment": 6}


def room(module: str) -> str | None:
    """The floor key a dotted module name belongs to (None: not the project's)."""
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return key
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if room(f"{base}.{a.name}") and not node.module else base)
                    for a in node.names]
    return out


def project_modules() -> list[Path]:
    return sorted(p for pkg in ("common", "clients", "server", "benchmarks", "deployment")
                  for p in (ROOT / pkg).rglob("*.py"))


def violations() -> list[str]:
    bad = []
    for path in project_modules():
        me = room(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, target in imports(path):
            other = room(target)
            if other is None or other == me:
                continue
            sideways = FLOORS[other] == FLOORS[me] and {me, other} in ({"common.data", "common.merging"},
                                                                       {"clients", "server"})
            if FLOORS[other] > FLOORS[me] or sideways:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target} ({other})")
    return bad


def test_no_import_runs_back_up():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """Inject the fault it guards against: a function-level import of the message contracts from the model."""
    fake = tmp_path / "common" / "model" / "leak.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from common.protocol.messages import HANDSHAKE\n    return HANDSHAKE\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations() == ["common/model/leak.py:2: common.model imports common.protocol.messages (common.protocol)"]


@pytest.mark.parametrize("module", ["merge_store", "mixins"])
def test_no_pipeline_mixin_left(module):
    assert not (ROOT / "server" / f"{module}.py").exists()


def test_no_server_module_takes_the_pipeline():
    """Stage collaborators get what they need (run directory, state, silo caller, base), never the Pipeline."""
    for path in sorted((ROOT / "server").glob("*.py")):
        if path.name in ("pipeline.py", "server_app.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "server.pipeline":
                raise AssertionError(f"{path.name} imports server.pipeline")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                assert "p" not in names and "pipeline" not in names, f"{path.name}:{node.lineno} takes the pipeline"
