"""Hatchling build hook: puts the native module ``server_native._native`` in the wheel.

hatchling packages the Python sources; this hook supplies the compiled Rust library.
``_locate_or_build_library()`` finds it with the loader's resolution (SPEC section 5),
at build time, for the target platform label (the host's, or the one of
``CARGO_BUILD_TARGET`` when cross-compiling):

1. ``SERVER_NATIVE_PREBUILT``: an absolute path to a library file;
2. the project cache ``<root>/.server_native/prebuilt/<tag>/<platform>/`` (what
   ``python -m server_native setup`` downloads);
3. ``prebuilt/<platform>/`` in the tree (where the prebuilt workflow stages libraries);
4. otherwise a source build through maturin (``maturin build --release``), whose
   wheel we open only to take the library and its wheel tag out of it.

A prebuilt library that this machine can load is checked first (its ``ABI_VERSION``
must be the package's, read from ``server_native/_loader.py``); one that does not
fit is skipped with a message. Its wheel tag is ``cp310-abi3-<platform tag>``, the
platform tag coming from the library (glibc symbol versions on Linux) and the label.

* normal wheel:   the library goes in through ``force_include`` and the wheel gets
                  the ``cp310-abi3-<platform>`` tag.
* editable wheel: the library is copied into the source tree's ``server_native/``
                  (gitignored), which the editable install imports from. Editable
                  builds compile the checkout's Rust (rungs 2 and 3 are skipped: a
                  developer wants their changes built); rung 1 still applies.
* ``SERVER_NATIVE_BUILD_FROM_SOURCE=1`` skips the prebuilt rungs.
* ``SERVER_NATIVE_SKIP_BUILD=1`` skips all of this (a pure wheel without the library).

The sdist carries src/, Cargo.toml, Cargo.lock and this file, so ``pip install
<sdist>`` compiles from source wherever a Rust toolchain is installed.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = "server_native"
SKIP_ENV = "SERVER_NATIVE_SKIP_BUILD"
PREBUILT_ENV = "SERVER_NATIVE_PREBUILT"
FROM_SOURCE_ENV = "SERVER_NATIVE_BUILD_FROM_SOURCE"
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


def _load_by_path(root: Path, relative: str) -> ModuleType:
    """Load a standard-library-only module of the package by path (importing the
    package itself would load the native library)."""
    path = root / relative
    name = "_server_native_build_" + path.stem.lstrip("_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_abi_version(root: Path) -> int:
    text = (root / PACKAGE / "_loader.py").read_text(encoding="utf-8")
    match = re.search(r"^ABI_VERSION\s*=\s*(\d+)", text, re.M)
    if not match:
        raise RuntimeError(f"no ABI_VERSION in {PACKAGE}/_loader.py")
    return int(match.group(1))


_ABI_PROBE = """
import importlib.machinery, importlib.util, sys
loader = importlib.machinery.ExtensionFileLoader("server_native._native", sys.argv[1])
spec = importlib.util.spec_from_file_location("server_native._native", sys.argv[1], loader=loader)
module = importlib.util.module_from_spec(spec)
loader.exec_module(module)
print(getattr(module, "ABI_VERSION", None))
"""


def _library_abi_version(library: Path) -> str:
    """``ABI_VERSION`` of a library this interpreter can load (in a child process:
    a build must not keep a foreign library loaded)."""
    done = subprocess.run([sys.executable, "-c", _ABI_PROBE, str(library)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"it does not load here: {last}")
    return done.stdout.strip()


def _target_label(platforms: ModuleType) -> tuple[str | None, bool]:
    """The platform label this build is for, and whether this machine runs it."""
    triple = os.environ.get("CARGO_BUILD_TARGET")
    host = None if platforms.is_musl() else platforms.host_label()
    if triple:
        label = platforms.label_for_target(triple)
        return label, label is not None and label == host
    return host, host is not None


def _prebuilt_candidates(root: Path, label: str | None, release: ModuleType, platforms: ModuleType, editable: bool) -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    explicit = os.environ.get(PREBUILT_ENV)
    if explicit:
        candidates.append((PREBUILT_ENV, Path(explicit)))
    if label is not None and not editable:
        name = platforms.library_name(label)
        candidates.append(("project cache", root / ".server_native" / "prebuilt" / release.TAG / label / name))
        candidates.append((f"prebuilt/{label}", root / "prebuilt" / label / name))
    return candidates


def _locate_prebuilt(root: Path, work_dir: Path, *, editable: bool) -> NativeLibrary | None:
    platforms = _load_by_path(root, f"{PACKAGE}/_platforms.py")
    release = _load_by_path(root, f"{PACKAGE}/_prebuilt_release.py")
    label, runs_here = _target_label(platforms)
    if label is None:
        _log("no prebuilt platform label for this target (musl, or an unlisted architecture)")
    expected_abi = _package_abi_version(root)
    for origin, path in _prebuilt_candidates(root, label, release, platforms, editable):
        if not path.is_absolute():
            _log(f"{origin}: {path} is not an absolute path: skipped")
            continue
        if not path.is_file():
            if origin == PREBUILT_ENV:
                _log(f"{origin}: {path} does not exist: skipped")
            continue
        if label is None:
            _log(f"{origin}: {path}: skipped (no platform label to tag the wheel with)")
            continue
        if runs_here:
            try:
                abi = _library_abi_version(path)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _log(f"{origin}: {path}: {exc}: skipped")
                continue
            if abi != str(expected_abi):
                _log(f"{origin}: {path} has ABI version {abi}, the package needs {expected_abi}: skipped")
                continue
        else:
            _log(f"{origin}: {path}: built for {label}, which this machine cannot load: ABI not checked")
        target = work_dir / platforms.library_name(label)
        shutil.copyfile(path, target)
        tag = f"cp310-abi3-{platforms.wheel_platform_tag(label, target)}"
        return NativeLibrary(target, tag, f"{origin} ({path}; no compile step)")
    return None


def _locate_or_build_library(root: Path, work_dir: Path, *, editable: bool = False) -> NativeLibrary:
    """Find the native library for this build, in order; the first that fits wins.

    1. ``SERVER_NATIVE_PREBUILT``; 2. the project cache; 3. ``prebuilt/<platform>/``
    (2 and 3 not for editable builds); 4. a source build through maturin.
    """
    if os.environ.get(FROM_SOURCE_ENV) == "1":
        _log(f"{FROM_SOURCE_ENV}=1: building from source")
    else:
        found = _locate_prebuilt(root, work_dir, editable=editable)
        if found is not None:
            return found
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
        library = _locate_or_build_library(root, self._work_dir, editable=version == "editable")
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
