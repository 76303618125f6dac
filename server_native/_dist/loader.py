"""Finds and loads the native library ``server_native._native``.

The rest of the package takes the native module only from here
(``from ._loader import native``), and only when it needs it: importing
``server_native`` or running ``python -m server_native --help``, ``setup`` or
``info`` loads no library. The first use walks these rungs once, in order,
and takes the first library that loads and whose ``ABI_VERSION`` is this
package's :data:`ABI_VERSION`:

1. ``SERVER_NATIVE_PREBUILT``: an absolute path to a library file;
2. the project cache ``<project root>/.server_native/prebuilt/<tag>/<platform>/``,
   then the user cache ``<platformdirs user cache>/prebuilt/<tag>/<platform>/``.
   ``<tag>`` is the package's own release tag, so a library another version
   of the package downloaded is never taken for this one's. Another tag is
   used only when named: ``SERVER_NATIVE_PREBUILT_TAG``, else the pin that
   ``python -m server_native setup --tag`` writes in the user cache; a library
   of another tag that loads says so in a warning (it overrides the package's).
   A cached library is refused when it, or a folder between it and the
   cache's root, is owned by someone other than this user or root, or is
   writable by group or others (as ssh asks of its keys); and, for the
   package's own tag when the package ships the SHA-256 of the platform's
   archive, unless the archive beside it has that hash and holds exactly
   this library;
3. the library inside the installed package (what the wheel ships);
4. a source build through maturin, when running from a source checkout
   (``Cargo.toml`` next to the package) with cargo on PATH. It says on stderr
   that it starts, why, and how to skip it. The built library goes into the
   checkout's ``server_native/`` (as an editable install would put it), so the
   next import finds it at rung 3. ``SERVER_NATIVE_SOURCE_BUILD=0`` turns
   this rung off, and ``info`` never takes it.

A library with another ABI version, or one that fails to load (another
platform, a missing system library), is skipped with a warning and the walk
goes on. When nothing fits, the ImportError lists every place tried and the
ways to fix it that can work here. On iOS and Android only rung 3 is used:
their platform rules allow only native code that ships inside the app.

The project root is the nearest folder, from the working directory up, that
has a ``.server_native`` folder, a ``pyproject.toml``, ``setup.py``,
``setup.cfg`` or ``.git``; without one, the working directory.

:func:`resolution` says which rung won and what was tried (``python -m
server_native info`` prints it).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import platforms as _platforms
from .release import RELEASES_URL, SHA256, TAG, TAG_PREFIX

#: The native ABI this Python package speaks (``ABI_VERSION`` in src/lib.rs).
ABI_VERSION = 3

MODULE_NAME = "server_native._native"
PACKAGE_NAME = "server_native"
ENV_PREBUILT = "SERVER_NATIVE_PREBUILT"
ENV_PREBUILT_TAG = "SERVER_NATIVE_PREBUILT_TAG"
ENV_SOURCE_BUILD = "SERVER_NATIVE_SOURCE_BUILD"
ENV_RELEASES_URL = "SERVER_NATIVE_RELEASES_URL"
#: The package folder, where its own native library lives.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
CACHE_DIR_NAME = ".server_native"
PROJECT_MARKERS = (CACHE_DIR_NAME, "pyproject.toml", "setup.py", "setup.cfg", ".git")
USER_CACHE_APP = "server_native"
#: In the user cache's ``prebuilt/`` folder: the tag ``setup --tag`` pinned.
PIN_FILE = "pinned-tag"
#: What a first source build of the crate took here (hatch_build.py says the same).
FIRST_BUILD = "about 8 minutes the first time on 2 busy cores, 3-4 on idle ones"

RUNG_NAMES = {1: ENV_PREBUILT, 2: "cache", 3: "package", 4: "source build"}

logger = logging.getLogger("server_native.loader")


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
    cache_tag: str = TAG
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
            "cache_tag": self.cache_tag,
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


def pin_file() -> Path:
    return user_cache() / "prebuilt" / PIN_FILE


def full_tag(text: str) -> str | None:
    """``0.2.0``, ``v0.2.0`` or a whole tag -> the whole tag; None for anything else."""
    if text.startswith(TAG_PREFIX) and len(text) > len(TAG_PREFIX):
        return text
    if re.fullmatch(r"v?\d+(\.\d+)*\S*", text):
        return TAG_PREFIX + text.lstrip("v")
    return None


def version_key(tag: str) -> tuple[Any, ...]:
    version = tag[len(TAG_PREFIX) :]
    match = re.match(r"(\d+(?:\.\d+)*)(.*)", version)
    if not match:
        return ((), 0, version)
    numbers = tuple(int(part) for part in match.group(1).split("."))
    return (numbers, 1 if not match.group(2) else 0, match.group(2))


def other_tags(cache: Path, label: str, tag: str) -> list[str]:
    """Tags other than ``tag`` with a ``label`` folder in ``cache``, newest first."""
    root = cache / "prebuilt"
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TAG_PREFIX) and entry.name != tag and (entry / label).is_dir():
                found.append(entry.name)
    return sorted(found, key=version_key, reverse=True)


def release_location() -> str:
    """Where ``setup`` downloads from ('' when this build names no release)."""
    return os.environ.get(ENV_RELEASES_URL) or RELEASES_URL


# ---------------------------------------------------------------- trusting a cache


def untrusted(path: Path, top: Path) -> str | None:
    """Why the file ``path`` in the cache ``top`` is not to be trusted, or None.

    It and every folder up to ``top`` must be owned by this user or root and
    writable by nobody else, as ssh asks of its keys: anyone else who could
    write there could put native code in this process. POSIX only."""
    if not hasattr(os, "getuid"):
        return None
    uid = os.getuid()
    current = path
    while True:
        try:
            status = current.stat()
        except OSError as exc:
            return f"cannot check {current}: {_one_line(exc)}"
        if status.st_uid not in (uid, 0):
            return f"{current} belongs to uid {status.st_uid}, not to this user (uid {uid}) or root"
        writable = [who for who, bit in (("group", 0o020), ("others", 0o002)) if status.st_mode & bit]
        if writable:
            return f"{current} is writable by {' and '.join(writable)} (mode {status.st_mode & 0o777:03o})"
        if current == top or current.parent == current:
            return None
        current = current.parent


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unverified(library: Path, label: str) -> str | None:
    """Why a cached library of the package's own tag does not match the
    SHA-256 the package ships for that platform's archive, or None (it does,
    or the package ships none: a build with no release behind it)."""
    expected = SHA256.get(label)
    if not expected:
        return None
    asset = _platforms.asset_name(label)
    archive = library.parent / asset
    if not archive.is_file():
        return f"no {asset} beside it to check against the SHA-256 this package ships for {TAG}"
    if _sha256(archive) != expected.lower():
        return f"{asset} beside it does not have the SHA-256 this package ships for {TAG}"
    import tarfile

    try:
        with tarfile.open(archive, "r:gz") as tar:
            source = tar.extractfile(_platforms.library_name(label))
            shipped = source.read() if source is not None else None
    except (tarfile.TarError, KeyError, OSError) as exc:
        return f"cannot read {asset}: {_one_line(exc)}"
    if shipped != library.read_bytes():
        return f"it differs from the library in {asset}, the archive whose SHA-256 this package ships"
    return None


def cache_tag() -> tuple[str, str | None]:
    """The tag the caches are searched for, and who named it (None: the
    package's own tag). A pin that cannot be trusted is ignored with a warning."""
    named = os.environ.get(ENV_PREBUILT_TAG)
    if named:
        tag = full_tag(named)
        if tag is None:
            warnings.warn(
                f"server_native: {ENV_PREBUILT_TAG}={named!r} is not a tag or version: ignored",
                NativeLibraryWarning,
                stacklevel=3,
            )
        else:
            return tag, ENV_PREBUILT_TAG
    try:
        pin = pin_file()
        if not pin.is_file():
            return TAG, None
        reason = untrusted(pin, pin.parent.parent)
        if reason is not None:
            warnings.warn(
                f"server_native: ignoring the pinned tag in {pin}: {reason}", NativeLibraryWarning, stacklevel=3
            )
            return TAG, None
        tag = full_tag(pin.read_text(encoding="utf-8").strip())
    except Exception:  # noqa: BLE001 - platformdirs missing or the pin unreadable: the package's own tag
        return TAG, None
    return (tag, f"the pin in {pin}") if tag is not None else (TAG, None)


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
        setattr(package, "_native", module)  # noqa: B010 - an attribute the module type does not declare
    return module


class _Walk:
    def __init__(self, label: str | None, build: bool) -> None:
        self.label = label
        self.build = build
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
        tag, named_by = cache_tag()
        self.result.cache_tag = tag
        for source in ("project cache", "user cache"):
            try:
                cache = project_cache() if source == "project cache" else user_cache()
            except Exception as exc:  # noqa: BLE001 - platformdirs missing or failing: say so, go on
                self.note(2, source, "(platformdirs)", f"unavailable: {_one_line(exc)}")
                continue
            if self.cached(source, cache, tag, named_by):
                return True
        return False

    def cached(self, source: str, cache: Path, tag: str, named_by: str | None) -> bool:
        assert self.label is not None
        library = cache_dir(cache, tag, self.label) / _platforms.library_name(self.label)
        if not library.is_file():
            others = other_tags(cache, self.label, tag)
            hint = (
                f" (also here: {', '.join(others)}; used only when named by {ENV_PREBUILT_TAG} or `setup --tag`)"
                if others
                else ""
            )
            self.note(2, source, str(library), ("not found" if not library.exists() else "not a file") + hint)
            return False
        reason = untrusted(library, cache)
        if reason is None and tag == TAG:
            reason = unverified(library, self.label)
        if reason is not None:
            self.note(2, source, str(library), f"refused: {reason}", warn=True)
            return False
        if not self.try_file(2, source, library):
            return False
        if tag != TAG:
            logger.warning(
                "server_native: the %s library of %s (named by %s) overrides the package's own %s: %s",
                source,
                tag,
                named_by,
                TAG,
                library,
            )
        return True

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
        if not self.build:
            self.note(4, "source build", place, "not tried by `info` (using the package builds it)")
            return False
        cargo = _find_cargo()
        if cargo is None:
            self.note(4, "source build", place, "cargo not found on PATH (install Rust: https://rustup.rs)")
            return False
        maturin = _maturin_command()
        if maturin is None:
            self.note(4, "source build", place, "maturin is not installed (pip install 'maturin>=1.5,<2')")
            return False
        print(_source_build_notice(checkout, self.result.attempts), file=sys.stderr, flush=True)
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
    """maturin from this interpreter's scripts folder (a venv's bin/ need not be
    on PATH), else PATH, else ``python -m maturin``."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent), None):
        found = shutil.which("maturin", path=folder)
        if found:
            return [found]
    if importlib.util.find_spec("maturin") is not None:
        return [sys.executable, "-m", "maturin"]
    return None


def _source_build_notice(checkout: Path, attempts: list[Attempt]) -> str:
    places = "; ".join(f"{a.source}: {a.outcome}" for a in attempts if a.rung in (2, 3))
    return (
        f"server_native: building the native library from source in {checkout} (maturin build --release, "
        f"{FIRST_BUILD}; maturin's output follows).\n"
        f"  Why: this is a source checkout and no library fits ({places}).\n"
        f"  To skip it: `pip install .` builds it once for good; {ENV_PREBUILT}=/path/to/library uses one you have; "
        f"{ENV_SOURCE_BUILD}=0 turns this build off."
    )


def _build_from_source(checkout: Path, maturin: list[str], cargo: str) -> Path:
    """``maturin build --release`` in the checkout; the library goes into the
    checkout's package folder. Returns its path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(cargo).parent}{os.pathsep}{env.get('PATH', '')}"
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
                if name.startswith(f"{PACKAGE_NAME}/_native")
                and name.count("/") == 1
                and name.endswith((".so", ".pyd"))
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


def _fixes(result: Resolution) -> list[str]:
    """The ways out that can work here."""
    fixes = ["pip install server-native (a wheel for this platform)"]
    checkout = PACKAGE_DIR.parent
    if (checkout / "Cargo.toml").is_file():
        fixes.append(f"pip install . in {checkout} (compiles the crate; needs Rust: https://rustup.rs)")
    mobile = sys.platform.startswith(_platforms.PACKAGE_ONLY_PLATFORMS)
    if result.platform and not mobile:
        if release_location():
            fixes.append(
                f"python -m server_native setup   (downloads the prebuilt library {TAG} for {result.platform} into the project cache)"
            )
        fixes.append(
            f"{ENV_PREBUILT}=/absolute/path/to/{_platforms.library_name(result.platform)}   (a library you built or have)"
        )
    return fixes


def _failure_message(result: Resolution) -> str:
    label = result.platform or "(no prebuilt label for this platform)"
    lines = [
        f"server_native could not load its native library ({MODULE_NAME}, ABI version {ABI_VERSION}, "
        f"platform {label}). Tried, in order:"
    ]
    lines += [f"  {attempt}" for attempt in result.attempts]
    lines.append("Fix it with one of:")
    lines += [f"  - {fix}" for fix in _fixes(result)]
    return "\n".join(lines)


def resolve(*, build: bool = True, sys_platform: str | None = None) -> Resolution:
    """Walk the rungs and return what happened (loads at most one library;
    ``build=False`` leaves the source build out)."""
    sys_platform = sys_platform or sys.platform
    walk = _Walk(_platforms.host_label(sys_platform), build)
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


def resolution(*, build: bool = True) -> Resolution:
    """What :func:`load` found (the walk runs on the first call). With
    ``build=False`` (``info``) the walk leaves the source build out, and is
    not kept when it found nothing."""
    global _RESOLUTION
    if _RESOLUTION is not None:
        return _RESOLUTION
    result = resolve(build=build)
    if build or result.module is not None:  # a library loads once per process: keep what did
        _RESOLUTION = result
    return result


def load() -> ModuleType:
    """The native module; raises ImportError (listing every place tried) when
    no library fits."""
    result = resolution()
    if result.module is None:
        raise ImportError(result.error, name=MODULE_NAME)
    return result.module


def __getattr__(name: str) -> Any:
    # ``from ._loader import native``: the walk runs on the first use, not on import.
    if name == "native":
        return load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
