"""The rooms' imports point one way (docs/architecture.md): client → ipc; daemon →
ipc, modes, supervisor; supervisor → ipc; ipc and modes → nothing of ours but the
root vocabulary (`genvisor/*.py`). A new import against that direction fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("client", "daemon", "ipc", "modes", "supervisor")
ALLOWED = {
    "client": {"ipc"},
    "daemon": {"ipc", "modes", "supervisor"},
    "supervisor": {"ipc"},
    "ipc": set(),
    "modes": set(),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """The genvisor modules `path` imports, at any depth of the file (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found.extend((node.lineno, name) for name in names if name.startswith("genvisor."))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names if alias.name.startswith("genvisor."))
    return found


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def test_every_import_between_rooms_points_the_allowed_way():
    wrong = []
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            for line, module in _imports(path):
                target = _room_of(module)
                if target is not None and target != room and target not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({room} → {target})")
    assert not wrong, "imports against the rooms' direction:\n" + "\n".join(wrong)


def test_the_root_vocabulary_imports_no_room():
    wrong = [f"genvisor/{path.name}:{line} imports {module}"
             for path in sorted((ROOT / "genvisor").glob("*.py")) if path.name != "__main__.py"
             for line, module in _imports(path) if _room_of(module) is not None]
    assert not wrong, "the root vocabulary must stand alone:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from genvisor.daemon.front import Front\n")
    assert _room_of(_imports(bad)[0][1]) == "daemon"
