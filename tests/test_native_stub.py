"""The `_native.pyi` stub matches the compiled module (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_stub_matches_native_module() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "server_native._native"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
