"""Platform labels of the prebuilt native libraries (SPEC section 5).

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

#: The twelve labels, in the order of SPEC section 5.
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
    versions = [name for name in _elf_needed_versions(data) if name.startswith("GLIBC_")]
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


def _elf_needed_versions(data: bytes) -> list[str]:
    """Names in the ELF ``.gnu.version_r`` section (SHT_GNU_verneed)."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        return []
    is64 = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    try:
        if is64:
            shoff, = struct.unpack_from(endian + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
        else:
            shoff, = struct.unpack_from(endian + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x2E)
        sections = []
        for index in range(shnum):
            base = shoff + index * shentsize
            if is64:
                _name, sh_type, _flags, _addr, offset, size, link, info = struct.unpack_from(endian + "IIQQQQII", data, base)
            else:
                _name, sh_type, _flags, _addr, offset, size, link, info = struct.unpack_from(endian + "IIIIIIII", data, base)
            sections.append((sh_type, offset, size, link, info))
        names: list[str] = []
        for sh_type, offset, _size, link, count in sections:
            if sh_type != 0x6FFFFFFE:  # SHT_GNU_verneed
                continue
            strtab = sections[link][1]
            entry = offset
            for _ in range(count):
                _version, aux_count, _file, aux, next_entry = struct.unpack_from(endian + "HHIII", data, entry)
                aux_at = entry + aux
                for _ in range(aux_count):
                    _hash, _flags, _other, name_at, next_aux = struct.unpack_from(endian + "IHHII", data, aux_at)
                    end = data.index(b"\0", strtab + name_at)
                    names.append(data[strtab + name_at : end].decode("ascii", "replace"))
                    if not next_aux:
                        break
                    aux_at += next_aux
                if not next_entry:
                    break
                entry += next_entry
        return names
    except (struct.error, IndexError, ValueError):
        return []


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
    sdk = {"ios-arm64": "arm64_iphoneos", "ios-sim-arm64": "arm64_iphonesimulator", "ios-sim-x64": "x86_64_iphonesimulator"}[label]
    return f"ios_{ios}_{sdk}"
