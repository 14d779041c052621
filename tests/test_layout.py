"""The package layout: imports point only down the floors of README's "Package layout", and the
model code imports only torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent
FLOORS = {  # unit -> floor; a unit is a subpackage or a top-level module
    "pipeline": -1, "__init__": -1, "errors": -1, "config": 0, "atomic": 0, "provenance": 0, "hashing": 0, "devices": 0,
    "slides": 1, "store": 1,
    "tiling": 2, "features": 2, "mil": 2,
    "report": 3, "verify": 3,
    "deploy": 4,
    "synthetic": 5,
    "cli": 6, "__main__": 7,
}


def unit(module: str) -> str:
    parts = module.split(".")
    return "pipeline" if len(parts) == 1 else parts[1]


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_imports_point_down():
    wrong = []
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        me = rel.parts[0].removesuffix(".py")
        assert me in FLOORS, f"{rel}: not in the layout's floors"
        for mod in imports(f):
            if mod.split(".")[0] != "pipeline":
                continue
            other = unit(mod)
            if other != me and FLOORS[other] >= FLOORS[me]:
                wrong.append(f"{rel} imports {mod} ({other}: floor {FLOORS[other]} >= {me}: {FLOORS[me]})")
    assert not wrong, "\n".join(wrong)


def test_model_code_imports_only_torch():
    for f in (ROOT / "mil" / "models").glob("*.py"):
        third = {m.split(".")[0] for m in imports(f)} - {"__future__", "math", "dataclasses", "typing",
                                                          "collections", "functools"}
        assert third <= {"torch"}, f"{f.name} imports {sorted(third - {'torch'})}"


def test_the_cli_lists_every_command_in_help_order():
    """The command line's modules register their commands; `--help` lists them in HELP_ORDER."""
    from pipeline.cli import COMMANDS, HELP_ORDER

    assert list(COMMANDS) == list(HELP_ORDER)
