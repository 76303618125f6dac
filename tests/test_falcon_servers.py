"""Falcon's own ASGI-server integration tests, from its sdist, pass against
server_native as they pass against uvicorn: over the command line and
through ``run()`` with the socket bridge. 45 tests each: HTTP verbs and
bodies, streaming and SSE, WebSocket (echo, close codes, media, rejections),
lifespan and shutdown on SIGTERM.

``.ci/run`` fetches the sdist (``FALCON_SDIST``) into ``.venv/compat``;
where it is missing the test is skipped, saying so."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FALCON = "4.4.0"
FALCON_SDIST = ROOT / ".venv" / "compat" / f"falcon-{FALCON}.tar.gz"


@pytest.mark.parametrize("transport", ["cli", "bridge"])
def test_falcons_asgi_server_suite_passes(transport: str, tmp_path: Path) -> None:
    if not FALCON_SDIST.exists():
        pytest.skip(
            f"{FALCON_SDIST} is missing: .ci/run downloads it (pip download --no-binary :all: falcon=={FALCON})"
        )
    import falcon

    assert falcon.__version__ == FALCON, "the installed Falcon must be the one whose tests run"
    with tarfile.open(FALCON_SDIST) as sdist:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            sdist.extractall(tmp_path, filter="data")
        else:
            sdist.extractall(tmp_path)
    source = tmp_path / f"falcon-{FALCON}"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "compat"), str(ROOT)]),
        SERVER_NATIVE_TRANSPORT=transport,
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "falcon_server_native", "-p", "no:cacheprovider"]
    command += ["tests/asgi/test_asgi_servers.py", "-k", "uvicorn"]
    done = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert summary.startswith("45 passed"), summary
