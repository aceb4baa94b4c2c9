"""Runs a script under Triton's interpreter (TRITON_INTERPRET=1) in a fresh process: the flag is read
when Triton is imported, so it cannot be switched on inside the test process. The script prints "ok"
last when its checks passed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_passes_in_triton_interpreter(script: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
