"""The code base stays lint-clean and layered: kernform (CLI) over reconciler over compiler."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "compiler", "reconciler", "kernform", "tests"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["compiler"])
def test_compiler_never_imports_the_reconciler_or_kernel_libraries(package: str) -> None:
    forbidden = ("reconciler", "kernform", "pyroute2", "nftables", "bcc", "subprocess", "socket")
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {name}"


def test_reconciler_never_imports_the_cli() -> None:
    for path in (ROOT / "reconciler").rglob("*.py"):
        assert "from kernform" not in path.read_text() and "import kernform" not in path.read_text(), path


def test_mypy_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "compiler", "reconciler", "kernform"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
