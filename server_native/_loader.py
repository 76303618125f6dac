"""Finds and loads the native library ``server_native._native`` (SPEC section 5).

The rest of the package imports the native module only from here
(``from ._loader import native``). :func:`load` walks these rungs once, in
order, and takes the first library that loads and whose ``ABI_VERSION`` is
this package's :data:`ABI_VERSION`:

1. ``SERVER_NATIVE_PREBUILT``: an absolute path to a library file;
2. the project cache ``<project root>/.server_native/prebuilt/<tag>/<platform>/``,
   then the user cache ``<platformdirs user cache>/prebuilt/<tag>/<platform>/``
   (the package's own tag first, then any other tag there, newest first);
3. the library inside the installed package (what the wheel ships);
4. a source build through maturin, when running from a source checkout
   (``Cargo.toml`` next to the package) with cargo on PATH. The built library
   goes into the checkout's ``server_native/`` (as an editable install would
   put it), so the next import finds it at rung 3.
   ``SERVER_NATIVE_SOURCE_BUILD=0`` turns this rung off.

A library with another ABI version, or one that fails to load (another
platform, a missing system library), is skipped with a warning and the walk
goes on. When nothing fits, the ImportError lists every place tried and the
ways to fix it. On iOS and Android only rung 3 is used: their platform rules
allow only native code that ships inside the app.

The project root is the nearest folder, from the working directory up, that
has a ``.server_native`` folder, a ``pyproject.toml``, ``setup.py``,
``setup.cfg`` or ``.git``; without one, the working directory.

:func:`resolution` says which rung won and what was tried (``python -m
server_native info`` prints it).

``python -m server_native setup`` and ``info`` must work when no library
loads (setup is how one gets a library), yet the package's ``__init__`` needs
the native module. For those two commands only, a failed load leaves an inert
stand-in module (``info`` then reports the failure), and rung 4 (a source build,
minutes long) is not tried.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _platforms
from ._prebuilt_release import TAG, TAG_PREFIX

#: The native ABI this Python package speaks (``ABI_VERSION`` in src/lib.rs).
ABI_VERSION = 2

MODULE_NAME = "server_native._native"
PACKAGE_NAME = "server_native"
ENV_PREBUILT = "SERVER_NATIVE_PREBUILT"
ENV_SOURCE_BUILD = "SERVER_NATIVE_SOURCE_BUILD"
PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_DIR_NAME = ".server_native"
PROJECT_MARKERS = (CACHE_DIR_NAME, "pyproject.toml", "setup.py", "setup.cfg", ".git")
USER_CACHE_APP = "server_native"

RUNG_NAMES = {1: ENV_PREBUILT, 2: "cache", 3: "package", 4: "source build"}


class NativeLibraryWarning(RuntimeWarning):
    """A native library candidate was skipped (wrong ABI, failed to load...)."""


@dataclass
class Attempt:
    """One place the loader looked."""

    rung: int
    source: str  # SERVER_NATIVE_PREBUILT, project cache, user cache, package, source build
    place: str  # a path, or what was looked for
    outcome: str  # "loaded", "not found", "ABI 2, expected 1: skipped", ...

    def __str__(self) -> str:
        return f"{self.rung}. {self.source}: {self.place}: {self.outcome}"


@dataclass
class Resolution:
    module: ModuleType | None = None
    rung: int | None = None
    source: str | None = None
    path: str | None = None
    platform: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        module = self.module
        return {
            "loaded": module is not None,
            "path": self.path,
            "rung": self.rung,
            "source": self.source,
            "abi_version": getattr(module, "ABI_VERSION", None) if module is not None else None,
            "package_abi_version": ABI_VERSION,
            "version": getattr(module, "__version__", None) if module is not None else None,
            "features": list(getattr(module, "FEATURES", ())) if module is not None else [],
            "platform": self.platform,
            "tag": TAG,
            "tried": [
                {"rung": a.rung, "source": a.source, "place": a.place, "outcome": a.outcome} for a in self.attempts
            ],
            "error": self.error,
        }


class _Skip(Exception):
    """A candidate that does not fit; the message is the outcome."""


# ---------------------------------------------------------------- places


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The project root: the nearest folder from ``start`` (the working
    directory) up with one of :data:`PROJECT_MARKERS`; else ``start``."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return here


def project_cache(start: str | os.PathLike[str] | None = None) -> Path:
    return project_root(start) / CACHE_DIR_NAME


def user_cache() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(USER_CACHE_APP, appauthor=False))


def cache_dir(cache: Path, tag: str, label: str) -> Path:
    """Where a prebuilt library of ``tag`` for ``label`` lives in a cache."""
    return cache / "prebuilt" / tag / label


def _version_key(tag: str) -> tuple[Any, ...]:
    version = tag[len(TAG_PREFIX) :]
    match = re.match(r"(\d+(?:\.\d+)*)(.*)", version)
    if not match:
        return ((), 0, version)
    numbers = tuple(int(part) for part in match.group(1).split("."))
    return (numbers, 1 if not match.group(2) else 0, match.group(2))


def cached_tags(cache: Path, label: str) -> list[str]:
    """Tags with a ``label`` folder in ``cache``: :data:`TAG` first, then the
    others, newest first."""
    root = cache / "prebuilt"
    others = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TAG_PREFIX) and entry.name != TAG and (entry / label).is_dir():
                others.append(entry.name)
    others.sort(key=_version_key, reverse=True)
    return [TAG, *others]


# ---------------------------------------------------------------- loading


def _load_file(path: Path) -> ModuleType:
    """Load the extension module in ``path`` as ``server_native._native``."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    if spec is None:  # pragma: no cover - with an explicit loader there is always a spec
        raise _Skip("cannot make an import spec")
    return _exec(spec)


def _exec(spec: importlib.machinery.ModuleSpec) -> ModuleType:
    try:
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        sys.modules.pop(MODULE_NAME, None)
        raise _Skip(f"failed to load: {_one_line(exc)}") from exc
    return module


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_abi(module: ModuleType) -> None:
    abi = getattr(module, "ABI_VERSION", None)
    if abi != ABI_VERSION:
        raise _Skip(f"ABI version {abi}, this package needs {ABI_VERSION}: skipped")


def _accept(module: ModuleType) -> ModuleType:
    sys.modules[MODULE_NAME] = module
    package = sys.modules.get(PACKAGE_NAME)
    if package is not None:
        setattr(package, "_native", module)
    return module


class _Walk:
    def __init__(self, label: str | None, cli_mode: bool) -> None:
        self.label = label
        self.cli_mode = cli_mode
        self.result = Resolution(platform=label)

    def note(self, rung: int, source: str, place: str, outcome: str, warn: bool = False) -> None:
        self.result.attempts.append(Attempt(rung, source, place, outcome))
        if warn:
            warnings.warn(
                f"server_native: skipping native library candidate {place} ({source}): {outcome}",
                NativeLibraryWarning,
                stacklevel=4,
            )

    def try_file(self, rung: int, source: str, path: Path, *, explicit: bool = False) -> bool:
        if not path.is_file():
            self.note(rung, source, str(path), "not found" if not path.exists() else "not a file", warn=explicit)
            return False
        try:
            module = _load_file(path)
            _check_abi(module)
        except _Skip as skip:
            self.note(rung, source, str(path), str(skip), warn=True)
            return False
        return self.win(rung, source, str(path), module)

    def win(self, rung: int, source: str, place: str, module: ModuleType) -> bool:
        self.note(rung, source, place, "loaded")
        self.result.module = _accept(module)
        self.result.rung = rung
        self.result.source = source
        self.result.path = getattr(module, "__file__", None) or place
        return True

    # -- the rungs

    def env_var(self) -> bool:
        value = os.environ.get(ENV_PREBUILT)
        if not value:
            self.note(1, ENV_PREBUILT, "(environment variable)", "not set")
            return False
        path = Path(value)
        if not path.is_absolute():
            self.note(1, ENV_PREBUILT, value, "not an absolute path: skipped", warn=True)
            return False
        return self.try_file(1, ENV_PREBUILT, path, explicit=True)

    def caches(self) -> bool:
        if self.label is None:
            self.note(2, "caches", "(prebuilt caches)", "this platform has no prebuilt label")
            return False
        name = _platforms.library_name(self.label)
        for source, cache in (("project cache", project_cache()), ("user cache", None)):
            if cache is None:
                try:
                    cache = user_cache()
                except Exception as exc:  # noqa: BLE001 - platformdirs missing or failing: say so, go on
                    self.note(2, source, "(platformdirs)", f"unavailable: {_one_line(exc)}")
                    continue
            for tag in cached_tags(cache, self.label):
                if self.try_file(2, source, cache_dir(cache, tag, self.label) / name):
                    return True
        return False

    def package(self) -> bool:
        spec = importlib.machinery.PathFinder.find_spec(MODULE_NAME, [str(PACKAGE_DIR)])
        if spec is None or spec.origin is None:
            self.note(3, "package", str(PACKAGE_DIR), "no _native library in the package")
            return False
        try:
            module = _exec(spec)
            _check_abi(module)
        except _Skip as skip:
            self.note(3, "package", spec.origin, str(skip), warn=True)
            return False
        return self.win(3, "package", spec.origin, module)

    def source_build(self) -> bool:
        checkout = PACKAGE_DIR.parent
        place = str(checkout)
        if not (checkout / "Cargo.toml").is_file() or not (checkout / "src").is_dir():
            self.note(4, "source build", place, "not a source checkout (no Cargo.toml next to the package)")
            return False
        if os.environ.get(ENV_SOURCE_BUILD) == "0":
            self.note(4, "source build", place, f"turned off by {ENV_SOURCE_BUILD}=0")
            return False
        if self.cli_mode:
            self.note(4, "source build", place, "not tried by `setup`/`info` (import server_native builds it)")
            return False
        cargo = _find_cargo()
        if cargo is None:
            self.note(4, "source build", place, "cargo not found on PATH (install Rust: https://rustup.rs)")
            return False
        maturin = _maturin_command()
        if maturin is None:
            self.note(4, "source build", place, "maturin is not installed (pip install 'maturin>=1.5,<2')")
            return False
        try:
            library = _build_from_source(checkout, maturin, cargo)
        except _Skip as skip:
            self.note(4, "source build", place, str(skip), warn=True)
            return False
        return self.try_file(4, "source build", library)


def _find_cargo() -> str | None:
    found = shutil.which("cargo")
    if found:
        return found
    home_cargo = Path.home() / ".cargo" / "bin" / ("cargo.exe" if os.name == "nt" else "cargo")
    return str(home_cargo) if home_cargo.is_file() else None


def _maturin_command() -> list[str] | None:
    found = shutil.which("maturin")
    if found:
        return [found]
    if importlib.util.find_spec("maturin") is not None:
        return [sys.executable, "-m", "maturin"]
    return None


def _build_from_source(checkout: Path, maturin: list[str], cargo: str) -> Path:
    """``maturin build --release`` in the checkout; the library goes into the
    checkout's package folder. Returns its path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(cargo).parent}{os.pathsep}{env.get('PATH', '')}"
    print(
        f"server_native: no native library fits; building it from source in {checkout} "
        "(maturin build --release; a cold build takes a few minutes)",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="server-native-loader-build-") as work:
        command = [*maturin, "build", "--release", "--out", work, "-i", sys.executable]
        try:
            # maturin's output goes to our stderr: the progress of a long build.
            done = subprocess.run(command, cwd=checkout, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
        except OSError as exc:
            raise _Skip(f"could not run maturin: {_one_line(exc)}") from exc
        if done.returncode != 0:
            raise _Skip(f"maturin failed with exit code {done.returncode} (its output is above)")
        wheels = sorted(Path(work).glob("*.whl"))
        if len(wheels) != 1:
            raise _Skip(f"expected one wheel from maturin, found {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as archive:
            members = [
                name
                for name in archive.namelist()
                if name.startswith(f"{PACKAGE_NAME}/_native") and name.count("/") == 1 and name.endswith((".so", ".pyd"))
            ]
            if len(members) != 1:
                raise _Skip(f"expected one {PACKAGE_NAME}/_native library in {wheels[0].name}, found {members}")
            data = archive.read(members[0])
    name = members[0].rsplit("/", 1)[1]
    dest = PACKAGE_DIR / name
    # Write aside, then rename: a process that has the old file loaded keeps it.
    tmp = PACKAGE_DIR / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------- the walk


def _cli_mode(argv: list[str] | None = None) -> bool:
    """True when this process is ``python -m server_native setup|info`` or
    ``server-native setup|info``: the commands that must run without a library."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] not in ("setup", "info"):
        return False
    first = argv[0]
    if first == "-m":  # python -m server_native: argv[0] is "-m" while the package is imported
        return True
    name = Path(first).name.lower()
    return name.startswith("server-native") or (name == "__main__.py" and Path(first).parent.name == PACKAGE_NAME)


def _failure_message(result: Resolution) -> str:
    label = result.platform or "(no prebuilt label for this platform)"
    lines = [
        f"server_native could not load its native library ({MODULE_NAME}, ABI version {ABI_VERSION}, "
        f"platform {label}). Tried, in order:"
    ]
    lines += [f"  {attempt}" for attempt in result.attempts]
    lines.append("Fix it with one of:")
    lines.append("  - pip install server-native (a wheel for this platform), or `pip install .` in a source checkout (needs Rust: https://rustup.rs)")
    if result.platform and not sys.platform.startswith(_platforms.PACKAGE_ONLY_PLATFORMS):
        lines.append(f"  - python -m server_native setup   (downloads the prebuilt library {TAG} for {result.platform} into the project cache)")
        lines.append(f"  - {ENV_PREBUILT}=/absolute/path/to/{_platforms.library_name(result.platform)}")
    return "\n".join(lines)


def resolve(*, cli_mode: bool | None = None, sys_platform: str | None = None) -> Resolution:
    """Walk the rungs and return what happened (loads at most one library)."""
    sys_platform = sys_platform or sys.platform
    if cli_mode is None:
        cli_mode = _cli_mode()
    walk = _Walk(_platforms.host_label(sys_platform), cli_mode)
    if sys_platform.startswith(_platforms.PACKAGE_ONLY_PLATFORMS):
        for rung, source in ((1, ENV_PREBUILT), (2, "caches"), (4, "source build")):
            walk.note(rung, source, "-", f"not used on {sys_platform} (only the library inside the app's package)")
        steps = [walk.package]
    else:
        steps = [walk.env_var, walk.caches, walk.package, walk.source_build]
    for step in steps:
        if step():
            break
    walk.result.attempts.sort(key=lambda attempt: attempt.rung)  # stable: the order within a rung stays
    if walk.result.module is None:
        walk.result.error = _failure_message(walk.result)
    return walk.result


_RESOLUTION: Resolution | None = None


def resolution() -> Resolution:
    """What :func:`load` found (the walk runs on the first call)."""
    global _RESOLUTION
    if _RESOLUTION is None:
        _RESOLUTION = resolve()
    return _RESOLUTION


def load() -> ModuleType:
    """The native module; raises ImportError (listing every place tried) when
    no library fits."""
    result = resolution()
    if result.module is None:
        raise ImportError(result.error, name=MODULE_NAME)
    return result.module


class _Placeholder(type):
    """The class of the stand-in's attributes: inert. Any attribute of one, and
    any call of one, is another placeholder (the package calls some native
    functions at import time); ``setup`` and ``info`` use none of them."""

    _error: str

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name, cls._error)


def _placeholder(name: str, error: str) -> Any:
    def call(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return _placeholder(name, error)

    return _Placeholder(name, (Exception,), {"__new__": call, "_error": error, "__module__": MODULE_NAME})


class _Unavailable(ModuleType):
    """Stands in for the native module in ``setup``/``info`` when none loads."""

    def __init__(self, error: str) -> None:
        super().__init__(MODULE_NAME)
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name, self._error)


def _native_or_stand_in() -> ModuleType:
    try:
        return load()
    except ImportError:
        result = resolution()
        if not _cli_mode():
            raise
        return _Unavailable(result.error or "server_native's native library is not available")


native = _native_or_stand_in()
