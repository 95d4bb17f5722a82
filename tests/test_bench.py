"""The benchmark script runs (tiny models), so the README's table can always be regenerated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))  # _*.py: shared helpers


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_runs_in_quick_mode(script):
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| hesskit" in done.stdout or "hesskit" in done.stdout
