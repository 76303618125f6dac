"""Helpers for the distribution tests (loader rungs, setup, packaging): the tools
the test extra installs, copies of the package and of the real native library,
clean child-process environments, a wrong-ABI extension module compiled here,
and a child that serves one request."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import server_native._dist.loader as loader
from server_native._dist import platforms as _platforms
from server_native._dist.setup import make_folders

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "server_native"
HOST_LABEL = _platforms.host_label()
TAG = loader.TAG

#: The native library this test process loaded: a real build of the crate.
REAL_LIBRARY = Path(loader.resolution().path or "")


def venv_tool(name: str) -> str | None:
    """A command the test extra installs (actionlint, maturin, auditwheel...):
    from this interpreter's scripts folder first, since a venv's bin/ need not
    be on PATH (`.venv/bin/python -m pytest` does not put it there), then PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent), None):
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


def library_name() -> str:
    assert HOST_LABEL is not None
    return _platforms.library_name(HOST_LABEL)


def copy_package(site: Path, *, with_library: bool = True) -> Path:
    """A copy of the Python package in ``site/server_native`` (an "installed"
    package: no Cargo.toml beside it), with or without the real library."""
    target = copy_sources(site / "server_native")
    if with_library:
        shutil.copyfile(REAL_LIBRARY, target / REAL_LIBRARY.name)
    return target


def copy_sources(target: Path) -> Path:
    """The package's sources (.py, .pyi, py.typed, in their folders) copied
    to ``target``; no library."""
    shutil.copytree(PACKAGE, target, ignore=lambda _, names: [n for n in names if not _is_source(n)])
    return target


def _is_source(name: str) -> bool:
    return name.endswith((".py", ".pyi")) or name == "py.typed" or "." not in name and name != "__pycache__"


def place_library(folder: Path, source: Path | None = None, name: str | None = None) -> Path:
    make_folders(folder)
    target = folder / (name or library_name())
    shutil.copyfile(source or REAL_LIBRARY, target)
    return target


def tool_module(name: str) -> ModuleType:
    """A script of tool/ as a module."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tool" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ship_hashes(package: Path, hashes: dict[str, str], repository: str = "") -> None:
    """Make a package copy ship release hashes (and a repository), as a
    released build's ``_dist/release.py`` does."""
    metadata = package / "_dist" / "release.py"
    text = metadata.read_text()
    entries = "".join(f"    {label!r}: {digest!r},\n" for label, digest in hashes.items())
    text = re.sub(
        r"SHA256: dict\[str, str\] = \{.*?\}",
        lambda _: "SHA256: dict[str, str] = {\n" + entries + "}",
        text,
        flags=re.S,
    )
    text = re.sub(r'^REPOSITORY = ".*"$', f"REPOSITORY = {repository!r}", text, flags=re.M)
    metadata.write_text(text)


def without_cargo(path: str) -> str:
    """PATH minus every folder that has cargo or rustc in it."""
    kept = []
    for folder in path.split(os.pathsep):
        if folder and not any(Path(folder, tool).exists() for tool in ("cargo", "rustc", "cargo.exe")):
            kept.append(folder)
    return os.pathsep.join(kept)


def clean_env(home: Path, pythonpath: Path | None = None, *, cargo: bool = True, **extra: str) -> dict[str, str]:
    """A child environment with nothing of ours in it: its own HOME and caches,
    no SERVER_NATIVE_* variables."""
    path = os.environ.get("PATH", "")
    env = {
        "PATH": path if cargo else without_cargo(path),
        "HOME": str(home),
        "USERPROFILE": str(home),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "LOCALAPPDATA": str(home / "AppData" / "Local"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUTF8": "1",
    }
    for name in ("SYSTEMROOT", "TMPDIR", "TEMP", "TMP"):
        if name in os.environ:
            env[name] = os.environ[name]
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(extra)
    return env


def run_python(code: str, *, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_native", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


PROBE = """
import json, warnings
warnings.simplefilter("always")
import server_native
from server_native._dist import loader as _loader
print(json.dumps(_loader.resolution().as_dict()))
"""


def probe(*, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Import the package in a child; what the loader did."""
    done = run_python(PROBE, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["stderr"] = done.stderr
    return info


def user_cache_of(env: dict[str, str], cwd: Path) -> Path:
    """The platformdirs user cache a child with ``env`` uses."""
    done = run_python(
        "import platformdirs; print(platformdirs.user_cache_dir('server_native', appauthor=False))", cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


# ---------------------------------------------------------------- a wrong-ABI library

WRONG_ABI = 999

_STUB = r"""
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_native", "a wrong-ABI stand-in", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *module = PyModule_Create(&definition);
    if (module == NULL) return NULL;
    PyModule_AddIntConstant(module, "ABI_VERSION", %d);
    PyModule_AddStringConstant(module, "__version__", "0.0.0-wrong-abi");
    return module;
}
"""


def build_wrong_abi_library(folder: Path) -> Path | None:
    """Compile a real extension module named ``_native`` whose ABI_VERSION is
    999 (None when there is no C compiler or no Python headers)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    include = sysconfig.get_paths()["include"]
    if compiler is None or not Path(include, "Python.h").exists() or sys.platform == "win32":
        return None
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stub.c"
    source.write_text(_STUB % WRONG_ABI)
    target = folder / library_name()
    flags = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    subprocess.run([compiler, "-shared", "-fPIC", f"-I{include}", *flags, str(source), "-o", str(target)], check=True)
    return target


# ---------------------------------------------------------------- serving one request

SERVE_ONE = """
import asyncio, json
import server_native
from server_native import NativeHttpServer
from server_native._dist import loader as _loader

async def main():
    server = await NativeHttpServer.bind("127.0.0.1", 0, http3=False)
    print(server.port, flush=True)
    info = _loader.resolution()
    async for request in server:
        request.response.write(json.dumps({"rung": info.rung, "source": info.source, "path": info.path}))
        await request.response.close()
        break
    await server.close()

asyncio.run(main())
"""


def serve_one_request(
    *, cwd: Path, env: dict[str, str], python: str = sys.executable, timeout: float = 60
) -> dict[str, Any]:
    """Start a server in a child (``python``), GET / from it with http.client;
    the child answers with the loader's rung and library path."""
    # stderr to a file: a long build's output must never fill a pipe nobody reads
    errors = tempfile.TemporaryFile(mode="w+")
    child = subprocess.Popen(
        [python, "-c", SERVE_ONE], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.strip():
            child.wait(timeout)
            errors.seek(0)
            raise AssertionError(f"the server did not start: {errors.read()[-8000:]}")
        port = int(line)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body)
        finally:
            connection.close()
        child.wait(timeout)
        return dict(json.loads(body))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        errors.close()
