"""The architecture as imports: lower layers never import higher ones (issue 18).

Every import in the package sources, at module level or inside a function, is checked against the rooms each
room may use. models/ and fitting/ stand alone; sweeps/ builds on models/; runners/ rooms follow the data flow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "fitting", "sweeps", "runners")
BELOW_FRONT = ("models", "fitting", "sweeps", "runners.data", "runners.tracking", "runners.training", "runners.scheduling")
# room -> the rooms its modules may import (itself included); the longest room that contains a module is its room
MAY_IMPORT = {
    "models": ("models",),
    "fitting": ("fitting",),
    "sweeps": ("sweeps", "models"),
    "runners.data": ("runners.data", "sweeps", "models"),
    "runners.tracking": ("runners.tracking", "sweeps", "models", "fitting"),
    "runners.training": ("runners.training", "runners.data", "runners.tracking", "sweeps", "models"),
    "runners.scheduling": ("runners.scheduling", "runners.training", "runners.data", "runners.tracking", "sweeps",
                           "models", "fitting"),
    "runners": ("runners",) + BELOW_FRONT,  # the front door: cli.py, pipeline.py
    "runners.bench": ("runners.bench", "runners") + BELOW_FRONT,
}


def room_of(module: str) -> str:
    return max((room for room in MAY_IMPORT if module == room or module.startswith(room + ".")), key=len)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, name) of every import from one of the project's packages, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from runners import pipeline` imports runners.pipeline, not the runners package
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def arrows_up(root: Path = ROOT) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            room = room_of(module)
            for line, name in imported(ast.parse(path.read_text(), str(path)), module):
                if room_of(name) not in MAY_IMPORT[room]:
                    bad.append(f"{path.relative_to(root)}:{line}: {room} imports {name}")
    return bad


def test_no_import_runs_back_up_the_layers():
    assert arrows_up() == []


def test_the_check_sees_an_arrow_up(tmp_path):
    """The walker must be able to fail: a model importing the trainer, or training importing the scheduler."""
    for package, source in {"models": "from runners.training.train import run_trial\n",
                            "runners/training": "def f():\n    from runners.scheduling import sweep\n",
                            "runners/data": "from . import store\n"}.items():
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "probe.py").write_text(source)
    assert arrows_up(tmp_path) == [
        "models/probe.py:1: models imports runners.training.train.run_trial",
        "runners/training/probe.py:2: runners.training imports runners.scheduling.sweep",
    ]
