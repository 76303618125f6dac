"""Platform labels of the prebuilt native libraries.

A label names one build of the native library: ``linux-x64``, ``macos-arm64``,
``android-armv7``, ``ios-sim-x64``... This module maps labels to the library's
file name, the Rust target triple, and the wheel platform tag, and finds the
label of the running interpreter.

Standard library only, and no imports from the package: ``hatch_build.py``
loads this file by path at build time, before anything is installed.
"""

from __future__ import annotations

import os
import platform
import re
import struct
import sys
from pathlib import Path
from typing import NamedTuple

#: The twelve labels, in the order the README lists them.
LABELS: tuple[str, ...] = (
    "linux-x64",
    "linux-arm64",
    "macos-arm64",
    "macos-x64",
    "windows-x64",
    "windows-arm64",
    "android-arm64",
    "android-armv7",
    "android-x64",
    "ios-arm64",
    "ios-sim-arm64",
    "ios-sim-x64",
)

#: Rust target triple of each label (what ``cargo build --target`` takes).
RUST_TARGETS: dict[str, str] = {
    "linux-x64": "x86_64-unknown-linux-gnu",
    "linux-arm64": "aarch64-unknown-linux-gnu",
    "macos-arm64": "aarch64-apple-darwin",
    "macos-x64": "x86_64-apple-darwin",
    "windows-x64": "x86_64-pc-windows-msvc",
    "windows-arm64": "aarch64-pc-windows-msvc",
    "android-arm64": "aarch64-linux-android",
    "android-armv7": "armv7-linux-androideabi",
    "android-x64": "x86_64-linux-android",
    "ios-arm64": "aarch64-apple-ios",
    "ios-sim-arm64": "aarch64-apple-ios-sim",
    "ios-sim-x64": "x86_64-apple-ios",
}

#: Platforms whose rules allow only the library shipped inside the app's package
#: (rung 3 of the loader): no downloaded or side-loaded native code.
PACKAGE_ONLY_PLATFORMS = ("ios", "android")

ASSET_TEMPLATE = "server_native-{label}.tar.gz"

_ARCH = {
    "x86_64": "x64",
    "amd64": "x64",
    "x64": "x64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "armv7",
    "armv8l": "armv7",  # a 32-bit userland on a 64-bit CPU
    "armv7": "armv7",
}


class UnknownPlatform(ValueError):
    """A label that is not one of :data:`LABELS`."""


def check_label(label: str) -> str:
    if label not in LABELS:
        raise UnknownPlatform(f"unknown platform {label!r} (known: {', '.join(LABELS)})")
    return label


def library_name(label: str) -> str:
    """File name of the native library for ``label``: what maturin writes
    (``_native.pyd`` on Windows, ``_native.abi3.so`` everywhere else)."""
    check_label(label)
    return "_native.pyd" if label.startswith("windows-") else "_native.abi3.so"


def asset_name(label: str) -> str:
    check_label(label)
    return ASSET_TEMPLATE.format(label=label)


def is_musl() -> bool:
    """True on a musl libc Linux (Alpine...): the prebuilt Linux libraries need glibc."""
    if not sys.platform.startswith("linux"):
        return False
    multiarch = getattr(sys.implementation, "_multiarch", "") or ""
    if "musl" in multiarch:
        return True
    return platform.libc_ver()[0] != "glibc" and any(Path("/lib").glob("ld-musl-*"))


def host_label(sys_platform: str | None = None, machine: str | None = None) -> str | None:
    """The label of this interpreter's platform, or None when there is none
    (an architecture without prebuilt libraries)."""
    sys_platform = sys_platform or sys.platform
    arch = _ARCH.get((machine if machine is not None else platform.machine()).lower())
    if arch is None:
        return None
    if sys_platform.startswith("linux"):
        label = f"linux-{arch}"
    elif sys_platform == "darwin":
        label = f"macos-{arch}"
    elif sys_platform in ("win32", "cygwin"):
        label = f"windows-{arch}"
    elif sys_platform == "android":
        label = f"android-{arch}"
    elif sys_platform == "ios":
        multiarch = getattr(sys.implementation, "_multiarch", "") or ""
        label = f"ios-sim-{arch}" if "simulator" in multiarch else f"ios-{arch}"
    else:
        return None
    return label if label in LABELS else None


def label_for_target(triple: str) -> str | None:
    """The label of a Rust target triple; None for targets without one (musl...)."""
    for label, known in RUST_TARGETS.items():
        if known == triple:
            return label
    return None


# ---------------------------------------------------------------- wheel tags


def glibc_requirement(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The newest ``GLIBC_x.y`` symbol version an ELF library needs (what
    decides its manylinux tag), or None when it needs none."""
    data = Path(path).read_bytes()
    versions = [name for name in _Elf(data).needed_versions() if name.startswith("GLIBC_")]
    if not versions:
        # No section headers to walk (or an unusual layout): the version names
        # are plain strings in .dynstr.
        versions = [m.decode() for m in re.findall(rb"GLIBC_2\.[0-9]+(?:\.[0-9]+)?", data)]
    best: tuple[int, int] | None = None
    for name in versions:
        match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", name)
        if match:
            version = (int(match.group(1)), int(match.group(2)))
            best = version if best is None or version > best else best
    return best


def _deployment(env: str, default: str) -> str:
    value = os.environ.get(env) or default
    parts = (value.split(".") + ["0"])[:2]
    return "_".join(parts)


def wheel_platform_tag(label: str, library: str | os.PathLike[str] | None = None) -> str:
    """The wheel platform tag for a library of ``label``. Linux tags come from
    the glibc symbol versions the library needs (manylinux_2_17 at least);
    the others from the deployment targets the CI builds use (overridable with
    the usual environment variables)."""
    check_label(label)
    if label.startswith("linux-"):
        machine = "x86_64" if label == "linux-x64" else "aarch64"
        needed = glibc_requirement(library) if library is not None else None
        major, minor = max(needed or (2, 17), (2, 17))
        return f"manylinux_{major}_{minor}_{machine}"
    if label == "macos-arm64":
        return f"macosx_{_deployment('MACOSX_DEPLOYMENT_TARGET', '11.0')}_arm64"
    if label == "macos-x64":
        return f"macosx_{_deployment('MACOSX_DEPLOYMENT_TARGET', '10.12')}_x86_64"
    if label == "windows-x64":
        return "win_amd64"
    if label == "windows-arm64":
        return "win_arm64"
    if label.startswith("android-"):
        api = os.environ.get("ANDROID_API_LEVEL") or "24"
        abi = {"android-arm64": "arm64_v8a", "android-armv7": "armeabi_v7a", "android-x64": "x86_64"}[label]
        return f"android_{api}_{abi}"
    ios = _deployment("IPHONEOS_DEPLOYMENT_TARGET", "13.0")
    sdk = {
        "ios-arm64": "arm64_iphoneos",
        "ios-sim-arm64": "arm64_iphonesimulator",
        "ios-sim-x64": "x86_64_iphonesimulator",
    }[label]
    return f"ios_{ios}_{sdk}"


# ---------------------------------------------------------------- what a library file is
#
# A wheel's tag promises a platform; the build hook tags a prebuilt library only
# after reading its headers: the file format (ELF, Mach-O, PE), the CPU, and
# the C library or OS it was linked for, against the Rust target of the build.

_ELF_MACHINES = {
    0x03: "x86",
    0x3E: "x86_64",
    0x28: "arm",
    0xB7: "aarch64",
    0xF3: "riscv",
    0x08: "mips",
    0x14: "ppc",
    0x15: "ppc64",
    0x16: "s390x",
    0x102: "loongarch",
}
_MACHO_CPUS = {7: "x86", 0x01000007: "x86_64", 12: "arm", 0x0100000C: "aarch64", 0x0200000C: "arm64_32"}
_MACHO_PLATFORMS = {1: "macos", 2: "ios", 6: "mac-catalyst", 7: "ios-simulator", 3: "tvos", 4: "watchos"}
_PE_MACHINES = {0x14C: "x86", 0x8664: "x86_64", 0x1C4: "arm", 0xAA64: "aarch64"}
#: Rust target triple architecture -> the machine name used here.
_TRIPLE_MACHINES = {
    "x86_64": "x86_64",
    "aarch64": "aarch64",
    "i686": "x86",
    "i586": "x86",
    "armv7": "arm",
    "arm": "arm",
    "thumbv7neon": "arm",
    "riscv64gc": "riscv",
    "s390x": "s390x",
    "powerpc64le": "ppc64",
}


class Binary(NamedTuple):
    """What a library file's headers say it is."""

    format: str  # "ELF", "Mach-O", "PE"
    machines: tuple[str, ...]  # CPUs (a universal Mach-O has several): "x86_64", "aarch64", "arm", ...
    bits: int
    shared: bool  # a shared object, dylib/bundle or DLL: what an interpreter can load
    system: str | None  # ELF: glibc, musl, android; Mach-O: macos, ios, ios-simulator; PE: windows; None: no evidence

    def describe(self) -> str:
        kind = "shared library" if self.shared else "file that is not a shared library"
        system = f" ({self.system})" if self.system else ""
        return f"{_article(self.format)} {self.bits}-bit {'+'.join(self.machines)} {kind}{system}"


def _article(format: str) -> str:
    return f"an {format}" if format == "ELF" else f"a {format}"


class BinaryMismatch(ValueError):
    """A library built for another platform than the one asked for."""


def inspect_binary(path: str | os.PathLike[str]) -> Binary:
    """Read the headers of a library file; ValueError when it is none of
    ELF, Mach-O or PE (or is cut short)."""
    data = Path(path).read_bytes()
    try:
        if data[:4] == b"\x7fELF":
            return _Elf(data).binary()
        if data[:2] == b"MZ":
            return _pe(data)
        return _macho(data)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"{path}: truncated or damaged headers ({exc})") from None


def expected_binary(triple: str) -> tuple[str, str, str]:
    """Format, machine and system a library of the Rust target ``triple`` has."""
    machine = _TRIPLE_MACHINES.get(triple.split("-", 1)[0])
    if machine is None:
        raise ValueError(f"unknown architecture in the target {triple!r}")
    if "-linux-android" in triple:
        return "ELF", machine, "android"
    if "-linux-musl" in triple:
        return "ELF", machine, "musl"
    if "-linux-gnu" in triple:
        return "ELF", machine, "glibc"
    if triple.endswith("-apple-darwin"):
        return "Mach-O", machine, "macos"
    if triple.endswith("-apple-ios-sim") or triple == "x86_64-apple-ios":
        return "Mach-O", machine, "ios-simulator"
    if triple.endswith("-apple-ios"):
        return "Mach-O", machine, "ios"
    if "-windows-" in triple:
        return "PE", machine, "windows"
    raise ValueError(f"no known library format for the target {triple!r}")


def check_binary(path: str | os.PathLike[str], triple: str) -> Binary:
    """The library's headers, when they fit the Rust target ``triple``;
    :class:`BinaryMismatch` (one line) when they do not."""
    format, machine, system = expected_binary(triple)
    try:
        found = inspect_binary(path)
    except (ValueError, OSError) as exc:
        raise BinaryMismatch(f"{path}: not a library for {triple}: {exc}") from None
    wanted = f"{_article(format)} {machine} shared library ({system})"
    if (
        found.format != format
        or machine not in found.machines
        or not found.shared
        or found.system not in (None, system)
    ):
        raise BinaryMismatch(f"{path} is {found.describe()}; the target {triple} needs {wanted}")
    return found


def _macho(data: bytes) -> Binary:
    magic = data[:4]
    if magic in (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf"):  # universal: big-endian slice table
        (count,) = struct.unpack_from(">I", data, 4)
        if not 0 < count < 32:  # 0xcafebabe is also a Java class file
            raise ValueError("not a library (a Java class file?)")
        wide = magic[3] == 0xBF
        slices = []
        for index in range(count):
            if wide:
                _cpu, _sub, offset, _size, _align, _reserved = struct.unpack_from(">iiQQII", data, 8 + index * 32)
            else:
                _cpu, _sub, offset, _size, _align = struct.unpack_from(">iiIII", data, 8 + index * 20)
            slices.append(_macho_slice(data, offset))
        systems = {part.system for part in slices}
        return Binary(
            "Mach-O",
            tuple(m for part in slices for m in part.machines),
            max(p.bits for p in slices),
            all(p.shared for p in slices),
            systems.pop() if len(systems) == 1 else None,
        )
    return _macho_slice(data, 0)


def _macho_slice(data: bytes, offset: int) -> Binary:
    magic = data[offset : offset + 4]
    if magic in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe"):
        endian = "<"
    elif magic in (b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce"):
        endian = ">"
    else:
        raise ValueError("not an ELF, Mach-O or PE file")
    bits = 64 if magic in (b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf") else 32
    cpu, _sub, filetype, ncmds, _size, _flags = struct.unpack_from(endian + "iIIIII", data, offset + 4)
    system = None
    at = offset + (32 if bits == 64 else 28)
    for _ in range(ncmds):
        command, size = struct.unpack_from(endian + "II", data, at)
        if command == 0x32:  # LC_BUILD_VERSION
            (platform_id,) = struct.unpack_from(endian + "I", data, at + 8)
            system = _MACHO_PLATFORMS.get(platform_id, f"platform {platform_id}")
        elif command == 0x24:  # LC_VERSION_MIN_MACOSX
            system = "macos"
        elif command == 0x25:  # LC_VERSION_MIN_IPHONEOS (a simulator build says so only in LC_BUILD_VERSION)
            system = system or "ios"
        if size < 8:
            break
        at += size
    machine = _MACHO_CPUS.get(cpu & 0xFFFFFFFF, f"cputype {cpu:#x}")
    return Binary("Mach-O", (machine,), bits, filetype in (6, 8), system)  # MH_DYLIB, MH_BUNDLE


def _pe(data: bytes) -> Binary:
    (header,) = struct.unpack_from("<I", data, 0x3C)
    if data[header : header + 4] != b"PE\0\0":
        raise ValueError("an MZ file without a PE header")
    (machine,) = struct.unpack_from("<H", data, header + 4)
    (characteristics,) = struct.unpack_from("<H", data, header + 22)
    (optional_magic,) = struct.unpack_from("<H", data, header + 24)
    name = _PE_MACHINES.get(machine, f"machine {machine:#x}")
    return Binary("PE", (name,), 64 if optional_magic == 0x20B else 32, bool(characteristics & 0x2000), "windows")


class _Elf:
    """Just enough of an ELF file: its header, sections and program headers."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or len(data) < 52:
            raise ValueError("not an ELF file")
        self.data = data
        self.is64 = data[4] == 2
        self.endian = "<" if data[5] == 1 else ">"
        self.type, self.machine = struct.unpack_from(self.endian + "HH", data, 16)

    def _unpack(self, fmt32: str, fmt64: str, offset: int) -> tuple[int, ...]:
        return struct.unpack_from(self.endian + (fmt64 if self.is64 else fmt32), self.data, offset)

    def sections(self) -> list[tuple[int, int, int, int, int]]:
        """(type, offset, size, link, info) of each section."""
        (shoff,) = self._unpack("I", "Q", 0x28 if self.is64 else 0x20)
        shentsize, shnum = self._unpack("HH", "HH", 0x3A if self.is64 else 0x2E)
        found = []
        for index in range(shnum):
            _name, kind, _flags, _addr, offset, size, link, info = self._unpack(
                "IIIIIIII", "IIQQQQII", shoff + index * shentsize
            )
            found.append((kind, offset, size, link, info))
        return found

    def _string(self, table: int, at: int) -> str:
        end = self.data.index(b"\0", table + at)
        return self.data[table + at : end].decode("ascii", "replace")

    def needed_versions(self) -> list[str]:
        """Names in the ``.gnu.version_r`` section (SHT_GNU_verneed)."""
        try:
            sections = self.sections()
            names: list[str] = []
            for kind, offset, _size, link, count in sections:
                if kind != 0x6FFFFFFE:
                    continue
                strtab = sections[link][1]
                entry = offset
                for _ in range(count):
                    _version, aux_count, _file, aux, next_entry = struct.unpack_from(
                        self.endian + "HHIII", self.data, entry
                    )
                    aux_at = entry + aux
                    for _ in range(aux_count):
                        _hash, _flags, _other, name_at, next_aux = struct.unpack_from(
                            self.endian + "IHHII", self.data, aux_at
                        )
                        names.append(self._string(strtab, name_at))
                        if not next_aux:
                            break
                        aux_at += next_aux
                    if not next_entry:
                        break
                    entry += next_entry
            return names
        except (struct.error, IndexError, ValueError):
            return []

    def needed_libraries(self) -> list[str]:
        """DT_NEEDED entries of the ``.dynamic`` section."""
        sections = self.sections()
        names = []
        for kind, offset, size, link, _info in sections:
            if kind != 6:  # SHT_DYNAMIC
                continue
            step = 16 if self.is64 else 8
            for at in range(offset, offset + size - step + 1, step):
                tag, value = self._unpack("iI", "qQ", at)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    names.append(self._string(sections[link][1], value))
        return names

    def note_owners(self) -> set[str]:
        """Owner names of the notes in SHT_NOTE sections (``Android``, ``GNU``...)."""
        owners = set()
        for kind, offset, size, _link, _info in self.sections():
            if kind != 7:
                continue
            at = offset
            while at + 12 <= offset + size:
                name_size, desc_size, _type = struct.unpack_from(self.endian + "III", self.data, at)
                owners.add(self.data[at + 12 : at + 12 + name_size].rstrip(b"\0").decode("ascii", "replace"))
                at += 12 + (name_size + 3) // 4 * 4 + (desc_size + 3) // 4 * 4
        return owners

    def interpreter(self) -> str | None:
        """PT_INTERP (executables have one; shared libraries rarely do)."""
        (phoff,) = self._unpack("I", "Q", 0x20 if self.is64 else 0x1C)
        phentsize, phnum = self._unpack("HH", "HH", 0x36 if self.is64 else 0x2A)
        for index in range(phnum):
            at = phoff + index * phentsize
            (kind,) = struct.unpack_from(self.endian + "I", self.data, at)
            if kind == 3:
                (offset,) = self._unpack("I", "Q", at + (8 if self.is64 else 4))
                (size,) = self._unpack("I", "Q", at + (32 if self.is64 else 16))
                return self.data[offset : offset + size].rstrip(b"\0").decode("ascii", "replace")
        return None

    def system(self) -> str | None:
        """android (bionic), musl or glibc, from the strongest evidence there is."""
        interpreter = self.interpreter() or ""
        needed = self.needed_libraries()
        versions = self.needed_versions()
        if (
            "Android" in self.note_owners()
            or interpreter.startswith("/system/bin/linker")
            or any(v == "LIBC" or v.startswith("LIBC_") for v in versions)
        ):
            return "android"
        if "ld-musl" in interpreter or any(name.startswith(("libc.musl-", "ld-musl-")) for name in needed):
            return "musl"
        if "ld-linux" in interpreter or "libc.so.6" in needed or any(v.startswith("GLIBC_") for v in versions):
            return "glibc"
        return None

    def binary(self) -> Binary:
        machine = _ELF_MACHINES.get(self.machine, f"e_machine {self.machine:#x}")
        return Binary("ELF", (machine,), 64 if self.is64 else 32, self.type == 3, self.system())  # ET_DYN
