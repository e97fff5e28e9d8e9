"""Ruff over the package, tests and benchmarks, with pyproject.toml's rules: CI's `make test` runs it."""

import os
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff_command() -> list[str]:
    """Ruff from this interpreter's environment (the test extra installs it), else from PATH."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "ruff")
    if os.path.exists(beside_python):
        return [beside_python]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.skip("ruff is not installed: pip install -e '.[test]'")


def test_ruff_finds_nothing():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", "lutlm", "tests", "benchmarks"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
