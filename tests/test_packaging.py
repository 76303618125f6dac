"""Packaging, built here and checked (SPEC section 5):

* the linux-x64 wheel: ``auditwheel show`` gives a manylinux tag, ``abi3audit``
  is clean, and installed into a fresh venv with no Rust on PATH it serves a request;
* the sdist carries the Rust sources and Cargo.lock; installed into a fresh venv
  it builds from source and serves a request;
* a library staged in ``prebuilt/linux-x64/`` (or the project cache, or
  ``SERVER_NATIVE_PREBUILT``) goes into the wheel with no compile step, and one
  with the wrong ABI is skipped.

The first two compile the crate (marked ``slow``; ``.ci/run`` runs them, ``-m "not
slow"`` leaves them out). Builds use ``CARGO_TARGET_DIR`` when it is set, else the
checkout's ``target/`` (warm after ``pip install -e .``), so the dependencies are
not compiled again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_native import _loader, _platforms

from distribution_helpers import (
    HOST_LABEL,
    REAL_LIBRARY,
    ROOT,
    TAG,
    build_wrong_abi_library,
    clean_env,
    serve_one_request,
    without_cargo,
)

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux") or HOST_LABEL != "linux-x64", reason="the linux-x64 packaging checks"),
    pytest.mark.skipif(not REAL_LIBRARY.is_file(), reason="no native library built"),
]

SDIST_FILES = ["Cargo.toml", "Cargo.lock", "src/lib.rs", "hatch_build.py", "pyproject.toml", "server_native/_loader.py",
               "server_native/_platforms.py", "server_native/_prebuilt_release.py", "server_native/prebuilt.py"]
LOG = Path(os.environ.get("SERVER_NATIVE_PACKAGING_LOG", "")) if os.environ.get("SERVER_NATIVE_PACKAGING_LOG") else None


def _timed(what: str, started: float) -> None:
    """Print how long a step took (shown with -s; collected in the log file when
    SERVER_NATIVE_PACKAGING_LOG names one)."""
    line = f"[packaging] {what}: {time.monotonic() - started:.0f}s"
    print(line)
    if LOG is not None:
        with open(LOG, "a") as out:
            out.write(line + "\n")


def cargo_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target"))
    env.pop("SERVER_NATIVE_PREBUILT", None)
    env.update(extra)
    return env


def run(command: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done


def fresh_venv(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    return folder / "bin" / "python"


def no_rust_env(venv_python: Path, home: Path) -> dict[str, str]:
    env = clean_env(home, None, cargo=False)
    env["PATH"] = f"{venv_python.parent}{os.pathsep}{without_cargo(os.environ.get('PATH', ''))}"
    assert shutil.which("cargo", path=env["PATH"]) is None and shutil.which("rustc", path=env["PATH"]) is None
    return env


@dataclass
class Artifacts:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Artifacts]:
    """``python -m build``: the sdist, then the wheel built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=1800, env=cargo_env())
    _timed("python -m build (sdist, then the wheel from it; compiles the crate)", started)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    yield Artifacts(sdist, wheel)


# ---------------------------------------------------------------- the wheel


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_tag_auditwheel_and_abi3audit(artifacts: Artifacts) -> None:
    wheel = artifacts.wheel
    assert wheel.name.startswith("server_native-") and "-cp310-abi3-manylinux_" in wheel.name and wheel.name.endswith("_x86_64.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "server_native/_native.abi3.so" in names and "server_native/_loader.py" in names
    assert not [n for n in names if n.startswith("server_native/") and n.endswith(".so") and n != "server_native/_native.abi3.so"]
    shown = run([sys.executable, "-m", "auditwheel", "show", str(wheel)], timeout=300).stdout
    platform_tag = wheel.name[: -len(".whl")].split("-")[-1]
    assert f'consistent with the following platform tag: "{platform_tag}"' in " ".join(shown.split()), shown
    audit = run([sys.executable, "-m", "abi3audit", "--strict", "--report", str(wheel)], timeout=300).stdout
    report = json.loads(audit)
    (spec,) = report["specs"].values()
    assert spec["wheel"], report
    for entry in spec["wheel"]:
        assert entry["result"]["is_abi3"] and entry["result"]["non_abi3_symbols"] == [], entry
        assert entry["result"]["computed"] <= "3.10" if isinstance(entry["result"]["computed"], str) else True


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_in_a_fresh_venv_without_rust_serves(artifacts: Artifacts, tmp_path: Path) -> None:
    started = time.monotonic()
    python = fresh_venv(tmp_path / "venv")
    run([str(python), "-m", "pip", "install", "--quiet", str(artifacts.wheel)], timeout=600)
    env = no_rust_env(python, tmp_path / "home")
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    answer = serve_one_request(cwd=work, env=env, python=str(python))
    assert answer["rung"] == 3 and answer["source"] == "package"
    assert Path(answer["path"]).is_relative_to(tmp_path / "venv")
    info = json.loads(run([str(python.parent / "server-native"), "info", "--json"], timeout=60, cwd=work, env=env).stdout)
    assert info["rung"] == 3 and info["abi_version"] == _loader.ABI_VERSION and "http3" in info["features"]
    _timed("fresh venv + wheel install + one request", started)


# ---------------------------------------------------------------- the sdist


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sdist_carries_the_rust_sources(artifacts: Artifacts) -> None:
    with tarfile.open(artifacts.sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in SDIST_FILES:
        assert needed in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    assert not [n for n in names if n.startswith(("prebuilt/", "target/", ".server_native/"))]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sdist_in_a_fresh_venv_builds_from_source_and_serves(artifacts: Artifacts, tmp_path: Path) -> None:
    """A cold build: its own empty CARGO_TARGET_DIR (with a shared one, cargo
    would find the unpacked sources fresh and compile nothing)."""
    started = time.monotonic()
    python = fresh_venv(tmp_path / "venv")
    target = tmp_path / "cargo-target"
    try:
        done = run([str(python), "-m", "pip", "install", "-v", str(artifacts.sdist)], timeout=2400,
                   env=cargo_env(CARGO_TARGET_DIR=str(target)))
    finally:
        shutil.rmtree(target, ignore_errors=True)
    log = done.stdout + done.stderr
    assert "[server_native build] compiling the Rust extension" in log
    assert "Compiling tokio" in log and "Compiling server_native" in log
    _timed("fresh venv + sdist install (a cold compile of the crate and its dependencies)", started)
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    answer = serve_one_request(cwd=work, env=no_rust_env(python, tmp_path / "home"), python=str(python))
    assert answer["rung"] == 3 and Path(answer["path"]).is_relative_to(tmp_path / "venv")


# ---------------------------------------------------------------- the loader's source build (rung 4)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_loader_builds_from_source_in_a_checkout_without_a_library(tmp_path: Path) -> None:
    """Rung 4 for real: a checkout (copied with its mtimes, so a warm
    CARGO_TARGET_DIR is reused) with no library anywhere; importing the package
    runs maturin, puts the library in the checkout's server_native/, loads it,
    and it serves a request."""
    if shutil.which("maturin") is None and not _has_module("maturin"):
        pytest.skip("maturin is not installed")
    started = time.monotonic()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "src", checkout / "src")
    (checkout / "server_native").mkdir()
    for source in (ROOT / "server_native").glob("*.py"):
        shutil.copy2(source, checkout / "server_native" / source.name)
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = cargo_env(PYTHONPATH=str(checkout), XDG_CACHE_HOME=str(home / "cache"))
    answer = serve_one_request(cwd=work, env=env, timeout=1500)
    built = checkout / "server_native" / "_native.abi3.so"
    assert answer == {"rung": 4, "source": "source build", "path": str(built)}
    # the next import finds it in the package (rung 3), with no build
    info = json.loads(run([sys.executable, "-m", "server_native", "info", "--json"], timeout=120, cwd=work, env=env).stdout)
    assert (info["rung"], info["path"]) == (3, str(built))
    _timed("loader rung 4 (maturin build in a copied checkout, shared target dir)", started)


# ---------------------------------------------------------------- prebuilt libraries at build time (no compile)


def source_tree(target: Path) -> Path:
    """A copy of what the sdist carries (no library anywhere in it)."""
    target.mkdir()
    for name in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "hatch_build.py", "README.md"):
        shutil.copyfile(ROOT / name, target / name)
    shutil.copytree(ROOT / "src", target / "src")
    (target / "server_native").mkdir()
    for source in (ROOT / "server_native").iterdir():
        if source.suffix in (".py", ".pyi") or source.name == "py.typed":
            shutil.copyfile(source, target / "server_native" / source.name)
    return target


def build_wheel_without_rust(tree: Path, out: Path, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m build --wheel`` with no Rust anywhere on PATH (nor in HOME)."""
    home.mkdir(exist_ok=True)
    env = clean_env(home, None, cargo=False, **extra)
    assert shutil.which("cargo", path=env["PATH"]) is None
    return subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(out), str(tree)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tree,
    )


@pytest.mark.parametrize("where", ["prebuilt dir", "project cache", "env var"])
def test_a_staged_library_is_used_with_no_compile_step(tmp_path: Path, where: str) -> None:
    assert HOST_LABEL is not None
    tree = source_tree(tmp_path / "tree")
    extra: dict[str, str] = {}
    if where == "prebuilt dir":
        staged = tree / "prebuilt" / HOST_LABEL / "_native.abi3.so"
        origin = f"prebuilt/{HOST_LABEL}"
    elif where == "project cache":
        staged = tree / ".server_native" / "prebuilt" / TAG / HOST_LABEL / "_native.abi3.so"
        origin = "project cache"
    else:
        staged = tmp_path / "elsewhere" / "lib.so"
        extra["SERVER_NATIVE_PREBUILT"] = str(staged)
        origin = "SERVER_NATIVE_PREBUILT"
    staged.parent.mkdir(parents=True)
    shutil.copyfile(REAL_LIBRARY, staged)
    done = build_wheel_without_rust(tree, tmp_path / "dist", tmp_path / "home", **extra)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert f"native library: _native.abi3.so from {origin} ({staged}; no compile step)" in log
    assert "compiling the Rust extension" not in log
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    expected_tag = f"cp310-abi3-{_platforms.wheel_platform_tag(HOST_LABEL, REAL_LIBRARY)}"
    assert wheel.name == f"server_native-{_loader_version()}-{expected_tag}.whl"
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("server_native/_native.abi3.so") == REAL_LIBRARY.read_bytes()
        assert f"Tag: {expected_tag}" in archive.read(f"server_native-{_loader_version()}.dist-info/WHEEL").decode()
    if shutil.which("auditwheel") or _has_module("auditwheel"):
        shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True, timeout=300)
        assert f'platform tag: "{expected_tag.split("-")[-1]}"' in " ".join(shown.stdout.split()), shown.stdout + shown.stderr


def test_a_staged_library_with_the_wrong_abi_is_skipped(tmp_path: Path) -> None:
    assert HOST_LABEL is not None
    wrong = build_wrong_abi_library(tmp_path / "stub")
    if wrong is None:
        pytest.skip("no C compiler to build a wrong-ABI library")
    tree = source_tree(tmp_path / "tree")
    staged = tree / "prebuilt" / HOST_LABEL / "_native.abi3.so"
    staged.parent.mkdir(parents=True)
    shutil.copyfile(wrong, staged)
    done = build_wheel_without_rust(tree, tmp_path / "dist", tmp_path / "home")
    log = done.stdout + done.stderr
    assert f"prebuilt/{HOST_LABEL}: {staged} has ABI version 999, the package needs {_loader.ABI_VERSION}: skipped" in log
    # then the source build, which needs the Rust toolchain this environment hides
    assert done.returncode != 0 and "compiling the Rust extension" in log and "rustup" in log
    assert not list((tmp_path / "dist").glob("*.whl")) if (tmp_path / "dist").exists() else True


def _loader_version() -> str:
    from server_native import _prebuilt_release

    return _prebuilt_release.VERSION


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
