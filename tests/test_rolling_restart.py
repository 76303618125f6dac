"""Rolling restart behind a real HAProxy with zero failed requests: a bounded
run of benchmark/rolling_restart.py (its figures are in benchmark/README.md),
restarting three CLI instances one after another under keep-alive load, and
reloading instances of two workers with SIGHUP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from proxies import haproxy_or_skip

SCRIPT = Path(__file__).resolve().parents[1] / "benchmark" / "rolling_restart.py"


@pytest.mark.parametrize("mode", ["instances", "sighup"])
def test_no_request_fails_while_every_instance_is_restarted(mode: str) -> None:
    haproxy_or_skip()
    command = [
        sys.executable,
        str(SCRIPT),
        "--mode",
        mode,
        "--requests",
        "2000",
        "--connections",
        "32",
        "--json",
        "--logs",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout)
    assert report["restarts"] == 3
    assert report["failed"] == 0, (report, result.stderr[-6000:])
    assert report["statuses"] == {"200": report["requests"]}
    assert report["requests"] >= 2000
    # Answers came from the new processes: 3 first, 3 more after the restarts
    # (with two workers each, twice as many).
    assert report["pids_seen"] >= (6 if mode == "instances" else 12)
    if mode == "instances":
        assert report["exit_codes"] == [0, 0, 0]
