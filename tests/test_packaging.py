"""Packaging, built here and checked:

* the linux-x64 wheel: ``auditwheel show`` gives a manylinux tag, ``abi3audit``
  is clean, and installed into a fresh venv with no Rust on PATH it serves a request;
* the sdist carries the Rust sources and Cargo.lock; installed into a fresh venv
  it builds from source and serves a request;
* a library staged in ``prebuilt/linux-x64/`` (or the project cache, or
  ``SERVER_NATIVE_PREBUILT``) goes into the wheel with no compile step, one
  with the wrong ABI is skipped, and one whose headers say another target is
  refused (the header reader is checked on real libraries and crafted headers);
* the build's progress lines, from real cargo output, reach the terminal;
* the README's first command works with this Debian's own python3;
* the tools the tests run are found from the venv, whatever PATH says.

The first two compile the crate (marked ``slow``; ``.ci/run`` runs them, ``-m "not
slow"`` leaves them out). Builds use ``CARGO_TARGET_DIR`` when it is set, else the
checkout's ``target/`` (warm after ``pip install -e .``), so the dependencies are
not compiled again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from apps.harness import free_port, wait_for
from distribution_helpers import (
    HOST_LABEL,
    REAL_LIBRARY,
    ROOT,
    TAG,
    build_wrong_abi_library,
    clean_env,
    copy_sources,
    serve_one_request,
    venv_tool,
    without_cargo,
)

from server_native._dist import loader as _loader
from server_native._dist import platforms as _platforms

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or HOST_LABEL != "linux-x64", reason="the linux-x64 packaging checks"
    ),
    pytest.mark.skipif(not REAL_LIBRARY.is_file(), reason="no native library built"),
]

SDIST_FILES = [
    "Cargo.toml",
    "Cargo.lock",
    "third_party/h2/src/lib.rs",
    "src/lib.rs",
    "hatch_build.py",
    "pyproject.toml",
    "LICENSE",
    "README.md",
    "server_native/_dist/loader.py",
    "server_native/_dist/platforms.py",
    "server_native/_dist/release.py",
    "server_native/_dist/setup.py",
    "server_native/py.typed",
    "server_native/_native.pyi",
]
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
    assert (
        wheel.name.startswith("server_native-")
        and "-cp310-abi3-manylinux_" in wheel.name
        and wheel.name.endswith("_x86_64.whl")
    )
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "server_native/_native.abi3.so" in names and "server_native/_dist/loader.py" in names
    assert not [
        n
        for n in names
        if n.startswith("server_native/") and n.endswith(".so") and n != "server_native/_native.abi3.so"
    ]
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
    info = json.loads(
        run([str(python.parent / "server-native"), "info", "--json"], timeout=60, cwd=work, env=env).stdout
    )
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
        done = run(
            [str(python), "-m", "pip", "install", "-v", str(artifacts.sdist)],
            timeout=2400,
            env=cargo_env(CARGO_TARGET_DIR=str(target)),
        )
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
    if venv_tool("maturin") is None and not _has_module("maturin"):
        pytest.skip("maturin is not installed")
    started = time.monotonic()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    copy_crate_sources(checkout)
    copy_sources(checkout / "server_native")
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = cargo_env(PYTHONPATH=str(checkout), XDG_CACHE_HOME=str(home / "cache"))
    answer = serve_one_request(cwd=work, env=env, timeout=1500)
    built = checkout / "server_native" / "_native.abi3.so"
    assert answer == {"rung": 4, "source": "source build", "path": str(built)}
    # the next import finds it in the package (rung 3), with no build
    info = json.loads(
        run([sys.executable, "-m", "server_native", "info", "--json"], timeout=120, cwd=work, env=env).stdout
    )
    assert (info["rung"], info["path"]) == (3, str(built))
    _timed("loader rung 4 (maturin build in a copied checkout, shared target dir)", started)


# ---------------------------------------------------------------- prebuilt libraries at build time (no compile)


def source_tree(target: Path) -> Path:
    """A copy of what the sdist carries (no library anywhere in it)."""
    target.mkdir()
    for name in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "hatch_build.py", "README.md", "LICENSE"):
        shutil.copyfile(ROOT / name, target / name)
    copy_crate_sources(target)
    copy_sources(target / "server_native")
    return target


def copy_crate_sources(target: Path) -> None:
    """The crate's Rust sources, and the patched dependencies Cargo.toml points at."""
    for folder in ("src", "third_party"):
        shutil.copytree(ROOT / folder, target / folder)


def build_wheel_without_rust(tree: Path, out: Path, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m build --wheel`` with no Rust anywhere on PATH (nor in HOME)."""
    home.mkdir(exist_ok=True)
    env = clean_env(home, None, cargo=False, **extra)
    assert shutil.which("cargo", path=env["PATH"]) is None
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--skip-dependency-check",
            "--outdir",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tree,
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
    assert f"{staged} is an ELF 64-bit x86_64 shared library (glibc), as x86_64-unknown-linux-gnu needs" in log
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("server_native/_native.abi3.so") == REAL_LIBRARY.read_bytes()
        assert f"Tag: {expected_tag}" in archive.read(f"server_native-{_loader_version()}.dist-info/WHEEL").decode()
        assert "server_native/py.typed" in archive.namelist()
        dist_info = f"server_native-{_loader_version()}.dist-info"
        assert archive.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        assert (
            "License-Expression: MIT" in metadata
            and "Project-URL: Homepage, https://pypi.org/project/server-native/" in metadata
        )
    if venv_tool("auditwheel") or _has_module("auditwheel"):
        shown = subprocess.run(
            [sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True, timeout=300
        )
        assert f'platform tag: "{expected_tag.split("-")[-1]}"' in " ".join(shown.stdout.split()), (
            shown.stdout + shown.stderr
        )


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
    assert (
        f"prebuilt/{HOST_LABEL}: {staged} has ABI version 999, the package needs {_loader.ABI_VERSION}: skipped" in log
    )
    # then the source build, which needs the Rust toolchain this environment hides
    assert done.returncode != 0 and "compiling the Rust extension" in log and "rustup" in log
    assert not list((tmp_path / "dist").glob("*.whl")) if (tmp_path / "dist").exists() else True


def _loader_version() -> str:
    from server_native._dist import release as _prebuilt_release

    return _prebuilt_release.VERSION


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- a library for another target is refused


@pytest.mark.parametrize(
    ("where", "triple"),
    [
        ("env var", "aarch64-linux-android"),
        ("prebuilt dir", "aarch64-unknown-linux-gnu"),
        ("prebuilt dir", "x86_64-apple-darwin"),
    ],
)
def test_a_library_for_another_target_is_refused(tmp_path: Path, where: str, triple: str) -> None:
    """The x86-64 glibc library of this build, handed to a cross build: the
    hook reads its headers and stops with one line instead of tagging it."""
    label = _platforms.label_for_target(triple)
    assert label is not None
    tree = source_tree(tmp_path / "tree")
    if where == "env var":
        staged = tmp_path / "elsewhere" / "lib.so"
        extra = {"SERVER_NATIVE_PREBUILT": str(staged)}
        origin = "SERVER_NATIVE_PREBUILT"
    else:
        staged = tree / "prebuilt" / label / _platforms.library_name(label)
        extra = {}
        origin = f"prebuilt/{label}"
    staged.parent.mkdir(parents=True)
    shutil.copyfile(REAL_LIBRARY, staged)
    done = build_wheel_without_rust(tree, tmp_path / "dist", tmp_path / "home", CARGO_BUILD_TARGET=triple, **extra)
    log = done.stdout + done.stderr
    format, machine, system = _platforms.expected_binary(triple)
    article = "an" if format == "ELF" else "a"
    line = (
        f"{origin}: refusing to package it: {staged} is an ELF 64-bit x86_64 shared library (glibc); "
        f"the target {triple} needs {article} {format} {machine} shared library ({system})"
    )
    assert done.returncode != 0 and line in log, log[-4000:]
    assert "compiling the Rust extension" not in log
    assert not list((tmp_path / "dist").glob("*.whl"))


# ---------------------------------------------------------------- reading library headers


def test_headers_of_real_libraries() -> None:
    import _ctypes

    for library in (REAL_LIBRARY, Path(_ctypes.__file__)):
        found = _platforms.check_binary(library, "x86_64-unknown-linux-gnu")
        assert found == _platforms.Binary("ELF", ("x86_64",), 64, True, "glibc"), library
    for triple in (
        "x86_64-unknown-linux-musl",
        "x86_64-linux-android",
        "aarch64-unknown-linux-gnu",
        "x86_64-pc-windows-msvc",
    ):
        with pytest.raises(_platforms.BinaryMismatch):
            _platforms.check_binary(REAL_LIBRARY, triple)


def _cargo() -> str | None:
    home_cargo = Path.home() / ".cargo" / "bin" / "cargo"
    return shutil.which("cargo") or (str(home_cargo) if home_cargo.is_file() else None)


def test_a_musl_target_library_linked_against_glibc_is_refused(tmp_path: Path) -> None:
    """A real build for x86_64-unknown-linux-musl that the host's cc linked
    against glibc (what `-C target-feature=-crt-static` gives without a musl
    toolchain): its target says musl, its headers say glibc."""
    cargo = _cargo()
    rustup = shutil.which("rustup", path=str(Path(cargo).parent)) if cargo else None
    if rustup is None:
        pytest.skip("no cargo/rustup here")
    installed = subprocess.run(
        [rustup, "target", "list", "--installed"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if "x86_64-unknown-linux-musl" not in installed:
        pytest.skip("the x86_64-unknown-linux-musl target is not installed")
    crate = tmp_path / "probe"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text(
        '[package]\nname = "probe"\nversion = "0.1.0"\nedition = "2021"\n[lib]\ncrate-type = ["cdylib"]\n'
    )
    (crate / "src" / "lib.rs").write_text('#[no_mangle]\npub extern "C" fn probe() -> u32 { std::process::id() }\n')
    env = {**os.environ, "RUSTFLAGS": "-C target-feature=-crt-static", "CARGO_TARGET_DIR": str(tmp_path / "target")}
    run([cargo, "build", "--release", "--target", "x86_64-unknown-linux-musl"], timeout=600, cwd=crate, env=env)
    library = tmp_path / "target" / "x86_64-unknown-linux-musl" / "release" / "libprobe.so"
    assert _platforms.inspect_binary(library).system == "glibc"
    with pytest.raises(
        _platforms.BinaryMismatch,
        match=r"\(glibc\); the target x86_64-unknown-linux-musl needs an ELF x86_64 shared library \(musl\)",
    ):
        _platforms.check_binary(library, "x86_64-unknown-linux-musl")


def craft_elf(machine: int, *, needed: tuple[str, ...] = (), notes: tuple[str, ...] = (), shared: bool = True) -> bytes:
    """A minimal 64-bit little-endian ELF file: a header and three sections
    (.dynstr, .dynamic with DT_NEEDED entries, and notes)."""
    dynstr = b"\0"
    offsets = []
    for name in needed:
        offsets.append(len(dynstr))
        dynstr += name.encode() + b"\0"
    dynstr += b"\0" * (-len(dynstr) % 8)
    dynamic = b"".join(struct.pack("<qQ", 1, offset) for offset in offsets) + struct.pack("<qQ", 0, 0)
    note = b""
    for owner in notes:
        name = owner.encode() + b"\0"
        note += struct.pack("<III", len(name), 4, 1) + name + b"\0" * (-len(name) % 4) + struct.pack("<I", 24)
    note += b"\0" * (-len(note) % 8)
    at_dynstr = 64
    at_dynamic = at_dynstr + len(dynstr)
    at_note = at_dynamic + len(dynamic)
    at_sections = at_note + len(note)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 3 if shared else 1, machine, 1, 0, 0, at_sections, 0, 64, 56, 0, 64, 4, 0)
    sections = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, at_dynstr, len(dynstr), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 0, 6, 0, 0, at_dynamic, len(dynamic), 1, 0, 8, 16)
    sections += struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, at_note, len(note), 0, 0, 4, 0)
    return header + dynstr + dynamic + note + sections


def craft_macho(cpu: int, platform: int | None, *, filetype: int = 6) -> bytes:
    """A 64-bit Mach-O header (MH_DYLIB by default) with an LC_BUILD_VERSION."""
    commands = struct.pack("<IIIIII", 0x32, 24, platform, 0x000D0000, 0x000D0000, 0) if platform else b""
    return struct.pack("<IiiIIIII", 0xFEEDFACF, cpu, 0, filetype, 1 if platform else 0, len(commands), 0, 0) + commands


def craft_fat(*slices: bytes) -> bytes:
    header = struct.pack(">II", 0xCAFEBABE, len(slices))
    offset = 8 + 20 * len(slices)
    table = b""
    for part in slices:
        (cpu,) = struct.unpack_from("<i", part, 4)
        table += struct.pack(">iiIII", cpu, 0, offset, len(part), 0)
        offset += len(part)
    return header + table + b"".join(slices)


def craft_pe(machine: int, *, dll: bool = True) -> bytes:
    """An MZ stub, a PE signature, a COFF header and the optional header's magic (PE32+)."""
    data = bytearray(0x5A)
    data[0:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x40)
    data[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", data, 0x44, machine, 0, 0, 0, 0, 240, 0x2022 if dll else 0x0022)
    struct.pack_into("<H", data, 0x58, 0x20B)
    return bytes(data)


ARM64, X86_64 = 0x0100000C, 0x01000007


@pytest.mark.parametrize(
    ("content", "fits", "refused"),
    [
        pytest.param(
            craft_elf(0xB7, needed=("libc.so", "libdl.so"), notes=("Android",)),
            ["aarch64-linux-android"],
            ["aarch64-unknown-linux-gnu", "aarch64-unknown-linux-musl", "x86_64-linux-android"],
            id="elf-android-arm64",
        ),
        pytest.param(
            craft_elf(0x28, needed=("libc.so",), notes=("Android",)),
            ["armv7-linux-androideabi"],
            ["aarch64-linux-android"],
            id="elf-android-armv7",
        ),
        pytest.param(
            craft_elf(0x3E, needed=("libc.musl-x86_64.so.1",)),
            ["x86_64-unknown-linux-musl"],
            ["x86_64-unknown-linux-gnu", "x86_64-linux-android"],
            id="elf-musl-x64",
        ),
        pytest.param(
            craft_elf(0x3E, needed=("libc.so.6",), shared=False), [], ["x86_64-unknown-linux-gnu"], id="elf-object-file"
        ),
        pytest.param(
            craft_macho(ARM64, 2),
            ["aarch64-apple-ios"],
            ["aarch64-apple-ios-sim", "aarch64-apple-darwin", "aarch64-linux-android"],
            id="macho-ios-arm64",
        ),
        pytest.param(craft_macho(ARM64, 7), ["aarch64-apple-ios-sim"], ["aarch64-apple-ios"], id="macho-ios-sim-arm64"),
        pytest.param(craft_macho(X86_64, 7), ["x86_64-apple-ios"], ["x86_64-apple-darwin"], id="macho-ios-sim-x64"),
        pytest.param(
            craft_fat(craft_macho(X86_64, 1), craft_macho(ARM64, 1)),
            ["x86_64-apple-darwin", "aarch64-apple-darwin"],
            ["aarch64-apple-ios"],
            id="macho-universal-macos",
        ),
        pytest.param(craft_macho(ARM64, 1, filetype=2), [], ["aarch64-apple-darwin"], id="macho-executable"),
        pytest.param(
            craft_pe(0x8664),
            ["x86_64-pc-windows-msvc"],
            ["aarch64-pc-windows-msvc", "x86_64-unknown-linux-gnu"],
            id="pe-amd64-dll",
        ),
        pytest.param(craft_pe(0xAA64), ["aarch64-pc-windows-msvc"], ["x86_64-pc-windows-msvc"], id="pe-arm64-dll"),
        pytest.param(craft_pe(0x8664, dll=False), [], ["x86_64-pc-windows-msvc"], id="pe-executable"),
        pytest.param(
            b"#!/bin/sh\necho not a library\n", [], ["x86_64-unknown-linux-gnu", "x86_64-pc-windows-msvc"], id="script"
        ),
        pytest.param(craft_elf(0xB7)[:40], [], ["aarch64-unknown-linux-gnu"], id="elf-cut-short"),
    ],
)
def test_crafted_headers(tmp_path: Path, content: bytes, fits: list[str], refused: list[str]) -> None:
    library = tmp_path / "library"
    library.write_bytes(content)
    for triple in fits:
        _platforms.check_binary(library, triple)
    for triple in refused:
        with pytest.raises(_platforms.BinaryMismatch) as caught:
            _platforms.check_binary(library, triple)
        assert "\n" not in str(caught.value) and str(library) in str(caught.value)


# ---------------------------------------------------------------- build progress on the terminal


def hatch_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_server_native_hatch_build", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Path:
    """Two path crates, one with a build script slow enough that cargo draws its bar."""
    if _cargo() is None:
        pytest.skip("cargo is not installed")
    root = tmp_path / "workspace"
    for crate in ("alpha", "beta"):
        (root / crate / "src").mkdir(parents=True)
    (root / "Cargo.toml").write_text('[workspace]\nmembers = ["alpha", "beta"]\nresolver = "2"\n')
    (root / "alpha" / "Cargo.toml").write_text('[package]\nname = "alpha"\nversion = "0.1.0"\nedition = "2021"\n')
    (root / "alpha" / "build.rs").write_text(
        "fn main() { std::thread::sleep(std::time::Duration::from_millis(1500)); }\n"
    )
    (root / "alpha" / "src" / "lib.rs").write_text("pub fn a() -> u32 { 1 }\n")
    (root / "beta" / "Cargo.toml").write_text(
        '[package]\nname = "beta"\nversion = "0.1.0"\nedition = "2021"\n[dependencies]\nalpha = { path = "../alpha" }\n'
    )
    (root / "beta" / "src" / "lib.rs").write_text("pub fn b() -> u32 { alpha::a() }\n")
    return root


def cargo_build_env(workspace: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    cargo = _cargo()
    assert cargo is not None
    env["PATH"] = f"{Path(cargo).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CARGO_TARGET_DIR"] = str(workspace / "target")
    env.update(extra)
    return env


def test_progress_lines_from_real_cargo_output(tiny_workspace: Path) -> None:
    done = subprocess.run(
        ["cargo", "build", "-p", "beta"],
        cwd=tiny_workspace,
        capture_output=True,
        text=True,
        timeout=300,
        env=cargo_build_env(tiny_workspace, CARGO_TERM_PROGRESS_WHEN="always", CARGO_TERM_PROGRESS_WIDTH="100"),
    )
    assert done.returncode == 0, done.stderr
    from io import StringIO

    out = StringIO()
    progress = hatch_build().BuildProgress(out, interval=0)
    kept = [piece for piece in done.stderr.splitlines() if progress.feed(piece)]  # text mode: "\r" ends a piece too
    assert any(piece.strip().startswith("Compiling alpha v0.1.0") for piece in kept)
    assert not [piece for piece in kept if "Building [" in piece]  # bar redraws stay out of the log
    lines = out.getvalue().splitlines()
    assert lines[0] == "[server_native build] 0m00s: compiling alpha (crate 1)"
    counted = [
        re.fullmatch(r"\[server_native build\] \dm\d\ds: (\d+) of (\d+) compiled, now (alpha|beta)", line)
        for line in lines
    ]
    totals = {int(match.group(2)) for match in counted if match}
    assert len(totals) == 1, lines  # cargo's bar: n of m units


def test_progress_goes_on_while_one_crate_compiles() -> None:
    """cargo says nothing while one crate compiles (the last one takes minutes):
    the lines keep coming, with the time so far."""
    from io import StringIO

    out = StringIO()
    progress = hatch_build().BuildProgress(out, interval=0.05)
    progress.feed("   Compiling server_native v0.1.0 (/checkout)")
    stop = threading.Event()
    beating = threading.Thread(target=progress.heartbeat, args=(stop,))
    beating.start()
    try:
        wait_for(
            lambda: out.getvalue().count("compiling server_native (crate 1)") >= 3,
            timeout=30,
            what="three progress lines",
        )
    finally:
        stop.set()
        beating.join(10)


STREAM_CHILD = """
import os, sys, importlib.util
if len(sys.argv) > 3:
    os.open(sys.argv[3], os.O_RDWR)  # a session leader opening a tty: it becomes the controlling terminal
spec = importlib.util.spec_from_file_location("hb", sys.argv[1])
hb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hb)
code, tail = hb.stream_build(["cargo", "build", "-p", "beta"], sys.argv[2], dict(os.environ))
sys.exit(code)
"""


def run_stream_child(workspace: Path, tmp_path: Path, tty: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    """stream_build in a child of its own session: stdout and stderr to a file,
    and ``tty`` (when given) its controlling terminal."""
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as errors:
        child = subprocess.Popen(
            [sys.executable, "-c", STREAM_CHILD, str(ROOT / "hatch_build.py"), str(workspace), *([tty] if tty else [])],
            stdin=subprocess.DEVNULL,
            stdout=errors,
            stderr=errors,
            env=cargo_build_env(workspace),
            start_new_session=True,
        )
    return child, stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal as controlling terminal")
def test_progress_reaches_the_terminal_while_the_output_is_captured(tiny_workspace: Path, tmp_path: Path) -> None:
    """As under pip: the build's stdout and stderr go to a file, yet the
    terminal shows the progress lines (and the log keeps cargo's lines)."""
    import pty

    master, slave = pty.openpty()
    try:
        # the slave stays open here too: with no one holding it, reads on the master fail
        child, stderr = run_stream_child(tiny_workspace, tmp_path, os.ttyname(slave))
        shown = b""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                shown += os.read(master, 4096)
            elif child.poll() is not None:
                break
        assert child.wait(timeout=60) == 0
    finally:
        os.close(slave)
        os.close(master)
    terminal = shown.decode().replace("\r\n", "\n")
    assert (
        "[server_native build] compiling the Rust extension (a first build takes about 8 minutes on 2 busy cores, 3-4 on idle ones)"
        in terminal
    )
    assert re.search(r"compiling alpha \(crate 1\)", terminal), terminal
    assert re.search(r"\[server_native build\] \dm\d\ds: done\n", terminal), terminal
    log = stderr.read_text()
    assert "Compiling alpha v0.1.0" in log and "[server_native build]" not in log and "Building [" not in log


def test_progress_falls_back_to_stderr_without_a_terminal(tiny_workspace: Path, tmp_path: Path) -> None:
    child, stderr = run_stream_child(tiny_workspace, tmp_path, None)
    assert child.wait(timeout=300) == 0
    log = stderr.read_text()
    assert "Compiling alpha v0.1.0" in log and "[server_native build] 0m00s: compiling alpha (crate 1)" in log
    assert "Building [" not in log


# ---------------------------------------------------------------- the sdist, the project's metadata, the tools


def test_sdist_holds_what_a_build_needs_and_no_tests(tmp_path: Path) -> None:
    """Building the sdist compiles nothing; the tests stay in the repository
    (they need examples/, tool/, the workflows beside them)."""
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "--skip-dependency-check",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        timeout=300,
        cwd=tmp_path,
    )
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        license_member = tar.extractfile(f"{sdist.name[: -len('.tar.gz')]}/LICENSE")
        assert license_member is not None and license_member.read() == (ROOT / "LICENSE").read_bytes()
    for needed in SDIST_FILES:
        assert needed in names, needed
    assert not [
        n
        for n in names
        if n.startswith(("tests/", "examples/", "tool/", "benchmark/", "prebuilt/", "target/", ".server_native/"))
    ]
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]


def test_project_urls_follow_the_release_repository() -> None:
    import tomllib

    from server_native._dist import release as _prebuilt_release

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls and all(url.startswith("https://") for url in urls.values())
    if _prebuilt_release.REPOSITORY:
        assert urls.get("Source") == f"https://github.com/{_prebuilt_release.REPOSITORY}"


def test_tools_are_found_without_the_venv_on_path() -> None:
    """`.venv/bin/python -m pytest` on a fresh machine: the venv's bin/ is not on
    PATH, and the workflow lint still finds actionlint."""
    env = dict(os.environ)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    assert shutil.which("actionlint", path=env["PATH"]) is None
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_workflows.py::test_actionlint"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


# ---------------------------------------------------------------- the README's first command


def readme_first_command() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"# 1\. install into a venv[^\n]*\n(.+)\n", readme)
    assert match, "the README opens with the install command"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_first_command_with_the_system_python(tmp_path: Path) -> None:
    """The README's first command, word for word, in a copy of the checkout,
    with the PATH of a fresh machine: this Debian's own python3 (which refuses
    `pip install` outside a venv, PEP 668), a venv, pip install ., and the
    quickstart answering /health."""
    system_path = f"/usr/local/bin:/usr/bin:/bin:{Path.home() / '.cargo' / 'bin'}"
    if shutil.which("python3", path=system_path) is None:
        pytest.skip("no python3 on the system PATH")
    started = time.monotonic()
    checkout = source_tree(tmp_path / "checkout")
    shutil.copytree(ROOT / "examples", checkout / "examples")
    port = free_port()
    env = {k: v for k, v in cargo_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=system_path, PORT=str(port))
    log = tmp_path / "command.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            ["bash", "-c", readme_first_command()],
            cwd=checkout,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        answer = _wait_for_health(port, child, deadline=time.monotonic() + 2000)
        assert answer == (200, {"ok": True}), log.read_text()[-6000:]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 15)
        child.wait(60)
    assert (checkout / ".venv" / "bin" / "python").is_file()
    _timed(
        "README command 1 with the system python3 (venv, pip install . with a warm target dir, one request)", started
    )


def _wait_for_health(port: int, child: subprocess.Popen[bytes], deadline: float) -> tuple[int, object]:
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                return response.status, json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    return -1, f"exited with {child.poll()}" if child.poll() is not None else "no answer in time"
