"""`python tools/typecheck.py [mypy args]`: mypy over the import package as it installs.

The rooms are top-level folders mapped onto `genvisor.*` by setuptools' package-dir,
which mypy cannot follow: this lays the package out as Python sees it (symlinks in
`build/typecheck/`) and runs mypy there, with the settings of pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"daemon": "daemon", "supervisor": "supervisor", "ipc": "ipc", "modes": "modes", "client": "client"}


def lay_out() -> Path:
    tree = ROOT / "build" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "genvisor"
    package.mkdir(parents=True)
    for path in (ROOT / "genvisor").glob("*.py"):
        (package / path.name).symlink_to(path)
    for name, folder in ROOMS.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return tree


def main(argv: list[str]) -> int:
    tree = lay_out()
    # The cache lives beside the tree, which is laid anew each run; the paths it keys on stay the same.
    cache = ROOT / "build" / "mypy_cache"
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *argv, "genvisor"]
    return subprocess.run(command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
