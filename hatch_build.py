"""Hatchling build hook: puts the native module ``server_native._native`` in the wheel.

hatchling packages the Python sources; this hook supplies the compiled Rust library.
``_locate_or_build_library()`` returns it. For now its only rung is a source build
through maturin (``maturin build --release``), whose wheel we open only to take the
library and its wheel tag out of it.

* normal wheel:   the library goes in through ``force_include`` and the wheel gets
                  maturin's tag (``cp310-abi3-<platform>``).
* editable wheel: the library is copied into the source tree's ``server_native/``
                  (gitignored), which the editable install imports from.
* ``SERVER_NATIVE_SKIP_BUILD=1`` skips all of this (a pure wheel without the library).

The sdist carries src/, Cargo.toml, Cargo.lock and this file, so ``pip install
<sdist>`` compiles from source wherever a Rust toolchain is installed.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = "server_native"
SKIP_ENV = "SERVER_NATIVE_SKIP_BUILD"
RUST_HINT = (
    "Building server_native from source needs a Rust toolchain (cargo, rustc >= 1.80).\n"
    "Install it with rustup (https://rustup.rs):\n"
    "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh\n"
    "then open a new shell (or `source ~/.cargo/env`) and retry."
)


def _log(message: str) -> None:
    print(f"[server_native build] {message}", file=sys.stderr, flush=True)


class NativeLibrary(NamedTuple):
    path: Path  # the extension module file, e.g. _native.abi3.so
    tag: str  # wheel tag it fits, e.g. cp310-abi3-manylinux_2_34_x86_64
    origin: str  # where it came from, for the log


def _is_native_library(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("_native") and base.endswith((".so", ".pyd"))


def _wheel_tag(wheel: Path) -> str:
    # {dist}-{version}(-{build})?-{python tag}-{abi tag}-{platform tag}.whl
    return "-".join(wheel.name[: -len(".whl")].split("-")[-3:])


def _run_maturin(root: Path, out_dir: Path) -> None:
    # pip's isolated build env puts maturin's script on PATH but `python -m maturin`
    # does not find it there, so prefer the script.
    maturin = shutil.which("maturin")
    cmd = [maturin] if maturin else [sys.executable, "-m", "maturin"]
    cmd += ["build", "--release", "--out", str(out_dir), "-i", sys.executable]
    env = dict(os.environ)
    cargo_bin = Path.home() / ".cargo" / "bin"
    if shutil.which("cargo", path=env.get("PATH")) is None and (cargo_bin / "cargo").exists():
        env["PATH"] = f"{cargo_bin}{os.pathsep}{env.get('PATH', '')}"
    _log(f"compiling the Rust extension: {' '.join(cmd)}  (in {root})")
    _log("a first (cold) build takes a few minutes")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        raise RuntimeError(f"could not start maturin: {exc}\n\n{RUST_HINT}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:  # stream the progress, keep the end for the error
        sys.stderr.write(line)
        tail.append(line)
    if proc.wait() != 0:
        output = "".join(tail)
        raise RuntimeError(
            f"maturin failed (exit code {proc.returncode}); its output ends with:\n"
            f"{output}\n{RUST_HINT}\n"
            "(If maturin itself is missing: pip install 'maturin>=1.5,<2'.)"
        )
    _log(f"maturin finished in {time.monotonic() - started:.0f}s")


def _build_from_source(root: Path, work_dir: Path) -> NativeLibrary:
    out_dir = work_dir / "maturin-wheel"
    _run_maturin(root, out_dir)
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from maturin in {out_dir}, found {wheels}")
    wheel = wheels[0]
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist()
                   if n.startswith(f"{PACKAGE}/") and n.count("/") == 1 and _is_native_library(n)]
        if len(members) != 1:
            raise RuntimeError(f"expected one {PACKAGE}/_native library in {wheel.name}, found {members}")
        target = work_dir / members[0].rsplit("/", 1)[-1]
        target.write_bytes(zf.read(members[0]))
    return NativeLibrary(target, _wheel_tag(wheel), f"source build ({wheel.name})")


def _locate_or_build_library(root: Path, work_dir: Path) -> NativeLibrary:
    """Find the native library for this build, in order; the first that fits wins.

    1. a source build through maturin (the only rung so far).
    """
    return _build_from_source(root, work_dir)


def _install_into_source_tree(library: Path, root: Path) -> Path:
    package_dir = root / PACKAGE
    dest = package_dir / library.name
    # Drop other builds first: CPython prefers _native.cpython-3XX-*.so over .abi3.so.
    for old in package_dir.iterdir():
        if _is_native_library(old.name) and old.name != library.name:
            old.unlink()
    # Copy then rename: replacing the file in place could crash a process that has
    # the old library loaded.
    tmp = package_dir / f".{library.name}.{os.getpid()}.tmp"
    shutil.copyfile(library, tmp)
    os.replace(tmp, dest)
    return dest


class NativeBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get(SKIP_ENV) == "1":
            _log(f"{SKIP_ENV}=1: not building the native library (pure wheel)")
            return
        root = Path(self.root)
        self._work_dir = Path(tempfile.mkdtemp(prefix="server-native-build-"))
        library = _locate_or_build_library(root, self._work_dir)
        _log(f"native library: {library.path.name} from {library.origin}")
        if version == "editable":
            dest = _install_into_source_tree(library.path, root)
            _log(f"editable install: copied the library to {dest}")
            return
        build_data["force_include"][str(library.path)] = f"{PACKAGE}/{library.path.name}"
        build_data["pure_python"] = False
        build_data["tag"] = library.tag
        _log(f"wheel tag: {library.tag}")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work_dir = getattr(self, "_work_dir", None)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
