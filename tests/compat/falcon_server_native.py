"""A pytest plugin for Falcon's own ASGI-server tests
(``tests/asgi/test_asgi_servers.py`` in its sdist): the server those tests
start as "uvicorn" becomes server_native, through the command line, or with
``SERVER_NATIVE_TRANSPORT=bridge`` through ``run()`` over the socket bridge."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType
from typing import Any


def _servers_module() -> ModuleType:
    return next(module for name, module in sys.modules.items() if name.endswith("test_asgi_servers"))


def _server_native(host: str, port: int) -> subprocess.Popen[Any]:
    app_dir = os.path.dirname(_servers_module().__file__ or "")
    if os.environ.get("SERVER_NATIVE_TRANSPORT") == "bridge":
        code = (
            "import _asgi_test_app\nfrom server_native import run\n"
            f"run(_asgi_test_app.application, host={host!r}, port={port}, native_callback=False, http3=False)"
        )
        return subprocess.Popen((sys.executable, "-c", code), cwd=app_dir)
    command = (
        "-m",
        "server_native",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--access-log",
        "_asgi_test_app:application",
    )
    return subprocess.Popen((sys.executable, *command), cwd=app_dir)


def pytest_collection_modifyitems(session: Any, config: Any, items: Any) -> None:
    _servers_module()._uvicorn_factory = _server_native  # type: ignore[attr-defined]
