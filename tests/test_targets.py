"""The targets the library ships to, compiled and linked here.

* The minimum Rust version in Cargo.toml covers every locked dependency's
  ``rust-version`` (``cargo metadata``).
* Cross builds (marked ``slow``; ``.ci/run`` installs the toolchains): musl
  x86_64 and aarch64, glibc aarch64 and Windows x86_64 (MinGW) each build the
  library, in cargo's dev profile without debug info: the point is that they
  compile and link, and an optimised build of each would cost many minutes.
* Two of those libraries become a prebuilt release through the release tools
  (tool/stage_prebuilt.py, tool/generate_prebuilt_release.py), served over HTTP
  on loopback, installed with ``python -m server_native setup`` and checked
  against the release's SHA256SUMS and the hashes the package carries.

aarch64 musl has no cross gcc in Debian; Debian's arm64 musl (``musl-dev:arm64``
through multiarch) with its ``musl-gcc.specs`` turns ``aarch64-linux-gnu-gcc``
into one, as ``musl-gcc`` does for the host's gcc. A musl library built without
the static C runtime (the only way to a cdylib) links libgcc_s for unwinding,
which Debian builds for glibc only: the target architecture's glibc
libgcc_s.so.1 stands in at link time, where only its soname and symbol
versions are taken (musl systems have their own libgcc_s.so.1).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from distribution_helpers import ROOT, TAG, clean_env, copy_package, run_cli

from server_native._dist import platforms as _platforms
from server_native._dist import release as _prebuilt_release

CARGO = shutil.which("cargo") or shutil.which("cargo", path=str(Path.home() / ".cargo" / "bin"))
requires_cargo = pytest.mark.skipif(CARGO is None, reason="cargo is not installed")

AARCH64_MUSL_SPECS = Path("/usr/lib/aarch64-linux-musl/musl-gcc.specs")


@dataclass(frozen=True)
class CrossTarget:
    triple: str
    #: C compiler for ring's and mimalloc's C code (cc-rs reads CC_<triple>) and the linker.
    compiler: str
    #: Debian package with the compiler, for the skip message.
    package: str
    #: what the library must be: binary_format()'s answer
    binary: str
    #: extra arguments of the compiler, as C compiler and as linker
    compiler_args: tuple[str, ...] = ()
    #: musl: the glibc gcc of the same architecture, whose libgcc_s.so.1 the link takes
    libgcc_from: str | None = None

    @property
    def musl(self) -> bool:
        return self.triple.endswith("-musl")

    @property
    def library(self) -> str:
        return "_native.dll" if "windows" in self.triple else "lib_native.so"

    def env(self, target_dir: Path) -> dict[str, str]:
        key = self.triple.upper().replace("-", "_")
        rustflags = [f"-C link-arg={arg}" for arg in self.compiler_args]
        if self.musl:
            # musl targets link the C runtime statically by default, which allows no cdylib.
            rustflags.insert(0, "-C target-feature=-crt-static")
            rustflags.append(f"-C link-arg=-L{self.libgcc_s_folder(target_dir)}")
        env = {
            f"CARGO_TARGET_{key}_LINKER": self.compiler,
            f"CC_{self.triple.replace('-', '_')}": " ".join([self.compiler, *self.compiler_args]),
        }
        if rustflags:
            env[f"CARGO_TARGET_{key}_RUSTFLAGS"] = " ".join(rustflags)
        return env

    def libgcc_s_folder(self, target_dir: Path) -> Path:
        """A folder with only ``libgcc_s.so`` in it (the glibc one of this
        architecture): a folder that also had glibc's libc.so would take -lc."""
        assert self.libgcc_from is not None
        printed = run([self.libgcc_from, "-print-file-name=libgcc_s.so.1"], timeout=60).stdout.strip()
        assert Path(printed).is_absolute(), f"{self.libgcc_from} has no libgcc_s.so.1"
        folder = target_dir / self.triple / "libgcc_s"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "libgcc_s.so"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(printed).resolve())
        return folder

    def missing(self) -> str | None:
        """Why this target cannot be built here (None when it can)."""
        if CARGO is None:
            return "cargo is not installed"
        for compiler in (self.compiler, self.libgcc_from):
            if compiler is not None and shutil.which(compiler) is None:
                return f"{compiler} is not installed (Debian: {self.package}; .ci/run installs it)"
        if self.triple == "aarch64-unknown-linux-musl" and not AARCH64_MUSL_SPECS.is_file():
            return f"no {AARCH64_MUSL_SPECS} (Debian: musl-dev:arm64; .ci/run installs it)"
        libdir = subprocess.run(
            [str(Path(CARGO).parent / "rustc"), "--print", "target-libdir", "--target", self.triple],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        if not libdir or not Path(libdir).is_dir():
            return f"Rust's standard library for {self.triple} is not installed (rustup target add {self.triple})"
        return None


TARGETS = {
    target.triple: target
    for target in (
        CrossTarget(
            "x86_64-unknown-linux-musl", "musl-gcc", "musl-tools", "ELF x86-64", libgcc_from="x86_64-linux-gnu-gcc"
        ),
        CrossTarget(
            "aarch64-unknown-linux-musl",
            "aarch64-linux-gnu-gcc",
            "gcc-aarch64-linux-gnu",
            "ELF aarch64",
            compiler_args=(f"-specs={AARCH64_MUSL_SPECS}",),
            libgcc_from="aarch64-linux-gnu-gcc",
        ),
        CrossTarget("aarch64-unknown-linux-gnu", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "ELF aarch64"),
        CrossTarget("x86_64-pc-windows-gnu", "x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64", "PE x86-64"),
    )
}

_ELF_MACHINES = {62: "x86-64", 183: "aarch64"}
_PE_MACHINES = {0x8664: "x86-64", 0xAA64: "aarch64"}


def binary_format(path: Path) -> str:
    """``ELF <machine>`` or ``PE <machine>``, read from the file's header."""
    data = path.read_bytes()[:4096]
    if data[:4] == b"\x7fELF":
        endian = "<" if data[5] == 1 else ">"
        (machine,) = struct.unpack_from(endian + "H", data, 18)
        return f"ELF {_ELF_MACHINES.get(machine, machine)}"
    if data[:2] == b"MZ":
        (offset,) = struct.unpack_from("<I", data, 0x3C)
        if data[offset : offset + 4] == b"PE\0\0":
            (machine,) = struct.unpack_from("<H", data, offset + 4)
            return f"PE {_PE_MACHINES.get(machine, hex(machine))}"
    return "unknown"


def run(command: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done


# ---------------------------------------------------------------- minimum Rust version


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def locked_metadata() -> dict:
    command = [str(CARGO), "metadata", "--format-version", "1", "--locked", "--manifest-path", str(ROOT / "Cargo.toml")]
    done = subprocess.run([*command, "--offline"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        # The registry cache may lack the crates only other platforms use: fetch them.
        done = run(command, timeout=600)
    return dict(json.loads(done.stdout))


@requires_cargo
def test_rust_version_covers_every_locked_dependency() -> None:
    metadata = locked_metadata()
    resolved = {node["id"] for node in metadata["resolve"]["nodes"]}
    ours = next(package for package in metadata["packages"] if package["id"] == metadata["resolve"]["root"])
    needs = {
        f"{package['name']} {package['version']}": _version(package["rust_version"])
        for package in metadata["packages"]
        if package["id"] in resolved and package.get("rust_version")
    }
    floor = max(needs.values())
    assert _version(ours["rust_version"]) >= floor, (
        f"Cargo.toml says rust-version {ours['rust_version']}; these locked dependencies need more: "
        + ", ".join(sorted(name for name, version in needs.items() if version > _version(ours["rust_version"])))
    )


def test_the_minimum_rust_version_is_stated_alike() -> None:
    """The README and the build hook's hint name the version Cargo.toml sets."""
    msrv = re.search(r'^rust-version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert msrv is not None
    assert f"Rust {msrv.group(1)} or newer" in (ROOT / "README.md").read_text()
    assert f"rustc >= {msrv.group(1)}" in (ROOT / "hatch_build.py").read_text()


# ---------------------------------------------------------------- cross builds


class CrossBuilds:
    """Each target built once per session, in dev profile without debug info."""

    def __init__(self) -> None:
        self.built: dict[str, Path] = {}

    def library(self, triple: str) -> Path:
        if triple in self.built:
            return self.built[triple]
        target = TARGETS[triple]
        reason = target.missing()
        if reason is not None:
            pytest.skip(reason)
        env = dict(os.environ)
        env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target"))
        env.update(target.env(Path(env["CARGO_TARGET_DIR"])), CARGO_PROFILE_DEV_DEBUG="false", CARGO_INCREMENTAL="0")
        env["PATH"] = f"{Path(str(CARGO)).parent}{os.pathsep}{env.get('PATH', '')}"
        started = time.monotonic()
        run([str(CARGO), "build", "--lib", "--locked", "--target", triple], timeout=2400, cwd=ROOT, env=env)
        print(f"[targets] cargo build --target {triple}: {time.monotonic() - started:.0f}s")
        library = Path(env["CARGO_TARGET_DIR"]) / triple / "debug" / target.library
        assert library.is_file(), f"cargo wrote no {library}"
        self.built[triple] = library
        return library


@pytest.fixture(scope="module")
def cross_builds() -> CrossBuilds:
    return CrossBuilds()


def elf_details(library: Path) -> str:
    return run(["readelf", "-h", "-d", "-V", "-W", "--dyn-syms", str(library)], timeout=60).stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("triple", list(TARGETS))
def test_the_library_builds_for(triple: str, cross_builds: CrossBuilds) -> None:
    target = TARGETS[triple]
    library = cross_builds.library(triple)
    assert binary_format(library) == target.binary
    if target.binary.startswith("PE"):
        dump = run(["x86_64-w64-mingw32-objdump", "-p", str(library)], timeout=60).stdout
        # the stable ABI's python3.dll, not one interpreter's python3X.dll
        assert re.findall(r"DLL Name: (python\S*)", dump) == ["python3.dll"], dump
        assert re.search(r"\] PyInit__native$", dump, re.M), dump
        return
    details = elf_details(library)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", details)
    assert re.search(r"\sFUNC\s+GLOBAL\s+DEFAULT\s+\d+\s+PyInit__native$", details, re.M), (
        "PyInit__native is not exported"
    )
    assert not [name for name in needed if name.startswith("libpython")], needed
    if target.musl:
        assert "libc.so" in needed and "libc.so.6" not in needed, needed
        assert "GLIBC_" not in details
    else:
        assert "libc.so.6" in needed, needed


# ---------------------------------------------------------------- a prebuilt release of two of them


RELEASED = {
    "linux-arm64": ("aarch64-unknown-linux-gnu", "aarch64-linux-gnu-strip"),
    "windows-x64": ("x86_64-pc-windows-gnu", "x86_64-w64-mingw32-strip"),
}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: (folder, its URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(ROOT / "tool" / f"{name}.py"), *args], timeout=300, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(4800)
def test_a_release_of_cross_built_libraries_installs_with_setup(
    cross_builds: CrossBuilds, served: tuple[Path, str], tmp_path: Path
) -> None:
    www, url = served
    release = www / "download" / TAG
    for label, (triple, strip) in RELEASED.items():
        if shutil.which(strip) is None:
            pytest.skip(f"{strip} is not installed")
        library = cross_builds.library(triple)
        tool(
            "stage_prebuilt",
            "stage",
            "--label",
            label,
            "--library",
            str(library),
            "--strip",
            f"{strip} --strip-unneeded",
            "--prebuilt-dir",
            str(tmp_path / "prebuilt"),
            "--dist",
            str(release),
        )
    tool("stage_prebuilt", "manifest", str(release))
    manifest = dict(line.split()[::-1] for line in (release / "SHA256SUMS").read_text().splitlines())
    assert sorted(manifest) == sorted(_platforms.asset_name(label) for label in RELEASED)

    # the package as a wheel of this release would carry it: metadata with its hashes
    site = tmp_path / "site"
    package = copy_package(site)
    metadata = package / "_dist" / "release.py"
    tool(
        "generate_prebuilt_release",
        "--manifest",
        str(release / "SHA256SUMS"),
        "--repository",
        "example/server_native",
        "--output",
        str(metadata),
    )
    tool("generate_prebuilt_release", "--check", "--output", str(metadata))
    generated = metadata.read_text()
    assert f'TAG = "{_prebuilt_release.TAG}"' in generated

    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'app'\nversion = '0'\n")
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home, site, SERVER_NATIVE_RELEASES_URL=url)
    for label, (triple, _strip) in RELEASED.items():
        done = run_cli("setup", "--tag", TAG, "--platform", label, "--quiet", cwd=project, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        folder = project / ".server_native" / "prebuilt" / TAG / label
        installed = folder / _platforms.library_name(label)
        assert done.stdout.strip() == f"installed {TAG} for {label}: {installed}"
        assert installed.read_bytes() == (tmp_path / "prebuilt" / label / _platforms.library_name(label)).read_bytes()
        assert binary_format(installed) == TARGETS[triple].binary
        record = json.loads((folder / "server_native-prebuilt.json").read_text())
        asset = _platforms.asset_name(label)
        assert record["sha256"] == manifest[asset] and f'"{label}": "{manifest[asset]}"' in generated
        assert record["checked_against"] == ["SHA256SUMS", "package"]
