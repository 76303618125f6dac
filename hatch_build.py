"""Hatchling build hook: puts the native module ``server_native._native`` in the wheel.

hatchling packages the Python sources; this hook supplies the compiled Rust library.
``_locate_or_build_library()`` finds it with the loader's resolution (``server_native/_dist/loader.py``),
at build time, for the target platform label (the host's, or the one of
``CARGO_BUILD_TARGET`` when cross-compiling):

1. ``SERVER_NATIVE_PREBUILT``: an absolute path to a library file;
2. the project cache ``<root>/.server_native/prebuilt/<tag>/<platform>/`` (what
   ``python -m server_native setup`` downloads);
3. ``prebuilt/<platform>/`` in the tree (where the prebuilt workflow stages libraries);
4. otherwise a source build through maturin (``maturin build --release``), whose
   wheel we open only to take the library and its wheel tag out of it.

A prebuilt library's headers are read first (``platforms.check_binary``: ELF,
Mach-O or PE; CPU; glibc, musl, Android, macOS, iOS or simulator): one built for
another target than the build's stops the build with one line, since its wheel
tag would be a lie. One that this machine can load must then have the package's
``ABI_VERSION`` (read from ``server_native/_dist/loader.py``); one that does not is
skipped with a message. Its wheel tag is ``cp310-abi3-<platform tag>``, the
platform tag coming from the library (glibc symbol versions on Linux) and the label.

A source build streams maturin's output to stderr. pip hides that behind its
spinner ("Preparing metadata (pyproject.toml) ..."), so :class:`BuildProgress`
also writes a short line every 10 seconds (time so far, n of m units from
cargo's progress bar, the crate compiling) to the terminal itself
(``/dev/tty``), or to stderr when there is no terminal.

* normal wheel:   the library goes in through ``force_include`` and the wheel gets
                  the ``cp310-abi3-<platform>`` tag.
* editable wheel: the library is copied into the source tree's ``server_native/``
                  (gitignored), which the editable install imports from. Editable
                  builds compile the checkout's Rust (rungs 2 and 3 are skipped: a
                  developer wants their changes built); rung 1 still applies.
* ``SERVER_NATIVE_BUILD_FROM_SOURCE=1`` skips the prebuilt rungs.
* ``SERVER_NATIVE_SKIP_BUILD=1`` skips all of this (a pure wheel without the library).

The sdist carries src/, third_party/, Cargo.toml, Cargo.lock and this file, so
``pip install <sdist>`` compiles from source wherever a Rust toolchain is installed.
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
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TextIO

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = "server_native"
SKIP_ENV = "SERVER_NATIVE_SKIP_BUILD"
PREBUILT_ENV = "SERVER_NATIVE_PREBUILT"
FROM_SOURCE_ENV = "SERVER_NATIVE_BUILD_FROM_SOURCE"
RUST_HINT = (
    "Building server_native from source needs a Rust toolchain (cargo, rustc >= 1.88).\n"
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


#: What a first build of the crate took here (the README says the same).
FIRST_BUILD = "a first build takes about 8 minutes on 2 busy cores, 3-4 on idle ones"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CARGO_BAR = re.compile(r"^Building \[[ =>]*\]\s+(\d+)/(\d+)(?::\s*(.*))?$")
_CARGO_COMPILING = re.compile(r"^Compiling (\S+) v\S+")


class BuildProgress:
    """Short progress lines from a cargo build's output (cargo's own, or through
    maturin): the crate being compiled and, when cargo draws its progress bar,
    how many of all the units are done. At most one line per ``interval``."""

    def __init__(
        self,
        out: TextIO,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool = False,
    ) -> None:
        self.out = out
        self.terminal = terminal
        self.lock = threading.RLock()
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.reported = float("-inf")
        self.done = 0
        self.total = 0
        self.compiled = 0
        self.crate = ""

    def feed(self, piece: str) -> bool:
        """Take one piece of output (a line, or one redraw of cargo's bar);
        True when it belongs in the build log (a bar redraw does not)."""
        text = _ANSI.sub("", piece).strip()
        bar = _CARGO_BAR.match(text)
        if bar:
            self.done, self.total = int(bar.group(1)), int(bar.group(2))
            if bar.group(3):  # "tokio, hyper(build), ..." (cut short to the bar's width)
                self.crate = bar.group(3).split(",")[0].split("(")[0].strip()
            self._report()
            return False
        compiling = _CARGO_COMPILING.match(text)
        if compiling:
            self.compiled += 1
            self.crate = compiling.group(1)
            self._report()
        return True

    def elapsed(self) -> str:
        seconds = int(self.clock() - self.started)
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def line(self) -> str:
        if self.total:
            return f"[server_native build] {self.elapsed()}: {self.done} of {self.total} compiled, now {self.crate}"
        return f"[server_native build] {self.elapsed()}: compiling {self.crate} (crate {self.compiled})"

    def say(self, text: str) -> None:
        # On a terminal, each line starts at column 0, over the spinner pip draws there.
        with self.lock:
            self.out.write(("\r" if self.terminal else "") + text + "\n")
            self.out.flush()

    def _report(self) -> None:
        with self.lock:
            now = self.clock()
            if not self.crate or now - self.reported < self.interval:
                return
            self.reported = now
        self.say(self.line())

    def heartbeat(self, stop: threading.Event) -> None:
        """Report every ``interval`` even while cargo says nothing (one crate,
        the last one above all, compiles for minutes); until ``stop`` is set."""
        while not stop.wait(self.interval):
            self._report()


def _progress_output() -> TextIO | None:
    """Where progress lines go. pip captures a build hook's output (it shows
    only a spinner), so: the terminal itself when one can be opened,
    else stderr. None when stderr is a terminal: the build's output shows as is."""
    if sys.stderr.isatty():
        return None
    if os.name != "nt":
        try:
            return open("/dev/tty", "w", encoding="utf-8", errors="replace")
        except OSError:
            pass
    return sys.stderr


def stream_build(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run a build command: its output goes to stderr (the build log), short
    progress lines to the terminal. Returns the exit code and the end of the output."""
    out = _progress_output()
    progress = None if out is None else BuildProgress(out, terminal=out is not sys.stderr)
    env = dict(env)
    if progress is not None:  # cargo draws its bar only on a terminal: ask for it, to read n of m
        env.setdefault("CARGO_TERM_PROGRESS_WHEN", "always")
        env.setdefault("CARGO_TERM_PROGRESS_WIDTH", "100")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    try:
        if progress is not None and progress.terminal:
            progress.out.write("\n")  # off pip's "Preparing metadata ..." line
            progress.say(f"[server_native build] compiling the Rust extension ({FIRST_BUILD}); progress every 10 s")
        try:
            # text mode reads cargo's "\r" bar redraws as lines of their own
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            )
        except OSError as exc:
            raise RuntimeError(f"could not start {cmd[0]}: {exc}\n\n{RUST_HINT}") from exc
        assert proc.stdout is not None
        stop = threading.Event()
        if progress is not None:
            threading.Thread(target=progress.heartbeat, args=(stop,), name="build-progress", daemon=True).start()
        try:
            for line in proc.stdout:
                if progress is None or progress.feed(line):
                    sys.stderr.write(line)
                    tail.append(line)
            code = proc.wait()
        finally:
            stop.set()
        if progress is not None and progress.terminal:
            progress.say(
                f"[server_native build] {progress.elapsed()}: {'done' if code == 0 else f'failed (exit code {code})'}"
            )
    finally:
        if out is not None and out is not sys.stderr:
            out.close()
    return code, "".join(tail)


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
    _log(FIRST_BUILD)
    started = time.monotonic()
    code, output = stream_build(cmd, root, env)
    if code != 0:
        raise RuntimeError(
            f"maturin failed (exit code {code}); its output ends with:\n"
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
        members = [
            n for n in zf.namelist() if n.startswith(f"{PACKAGE}/") and n.count("/") == 1 and _is_native_library(n)
        ]
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
    text = (root / PACKAGE / "_dist" / "loader.py").read_text(encoding="utf-8")
    match = re.search(r"^ABI_VERSION\s*=\s*(\d+)", text, re.M)
    if not match:
        raise RuntimeError(f"no ABI_VERSION in {PACKAGE}/_dist/loader.py")
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


def _target(platforms: ModuleType) -> tuple[str | None, str | None, bool]:
    """The platform label and Rust target triple this build is for, and whether
    this machine runs it."""
    triple = os.environ.get("CARGO_BUILD_TARGET")
    host = None if platforms.is_musl() else platforms.host_label()
    if triple:
        label = platforms.label_for_target(triple)
        return label, triple, label is not None and label == host
    return host, platforms.RUST_TARGETS.get(host) if host else None, host is not None


def _prebuilt_candidates(
    root: Path, label: str | None, release: ModuleType, platforms: ModuleType, editable: bool
) -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    explicit = os.environ.get(PREBUILT_ENV)
    if explicit:
        candidates.append((PREBUILT_ENV, Path(explicit)))
    if label is not None and not editable:
        name = platforms.library_name(label)
        candidates.append(("project cache", root / ".server_native" / "prebuilt" / release.TAG / label / name))
        candidates.append((f"prebuilt/{label}", root / "prebuilt" / label / name))
    return candidates


def _check_format(platforms: ModuleType, origin: str, path: Path, triple: str | None) -> None:
    """Refuse, in one line, a library whose headers say another platform than
    the target's: its wheel tag would be a lie."""
    assert triple is not None  # a label was found, so was its triple
    try:
        found = platforms.check_binary(path, triple)
    except platforms.BinaryMismatch as exc:
        raise RuntimeError(f"{origin}: refusing to package it: {exc}") from None
    _log(f"{origin}: {path} is {found.describe()}, as {triple} needs")


def _locate_prebuilt(root: Path, work_dir: Path, *, editable: bool) -> NativeLibrary | None:
    platforms = _load_by_path(root, f"{PACKAGE}/_dist/platforms.py")
    release = _load_by_path(root, f"{PACKAGE}/_dist/release.py")
    label, triple, runs_here = _target(platforms)
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
        _check_format(platforms, origin, path, triple)
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
