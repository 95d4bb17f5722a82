"""The scripts under examples/ run as their docstrings say (in fast mode)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEARDOWN_ABORT = "terminate called without an active exception"


def test_ddp_curvature_example_with_torchrun():
    env = dict(os.environ, HESSKIT_FAST="1", PYTHONPATH=str(ROOT))
    # gloo can abort a process at teardown ("terminate called without an active exception") on a
    # loaded machine, even with the example's barrier before destroy_process_group: 1 in about 20
    # CI runs so far (12 of 12 and 6 of 6 passed on a quiet machine). Only that abort, once, is
    # retried; any other failure, or the abort twice, fails the test.
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(ROOT / "examples" / "ddp_curvature.py")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if done.returncode == 0 or TEARDOWN_ABORT not in done.stderr or attempt == 1:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # the two processes' lines may interleave (print writes the text and the newline separately)
    estimates = r"\[process (\d)/2\] (top eigenvalues \[[^\]]*\] \(\d+ products\), trace \S+ ± \S+, largest SLQ node [\d.]+)"
    found = {int(r): line for r, line in re.findall(estimates, out)}
    assert set(found) == {0, 1} and found[0] == found[1], out  # every process printed the same estimates
    assert out.count("replicas identical: True") == 2, out
    assert "processes=2" in out
