#!/usr/bin/env python3
"""Stages prebuilt native libraries for a release (used by .github/workflows/prebuilt.yml).

    # one platform: take the library out of a wheel (or a built file), strip it,
    # put it in prebuilt/<platform>/ and tar it as dist/server_native-<platform>.tar.gz
    python tool/stage_prebuilt.py stage --label linux-x64 --wheel wheelhouse/server_native-*.whl
    python tool/stage_prebuilt.py stage --label android-armv7 --library target/.../lib_native.so --strip llvm-strip

    # all platforms: write dist/SHA256SUMS (sha256sum format) for the archives
    python tool/stage_prebuilt.py manifest dist --expect-all

Each archive holds exactly one member, the library under the platform's file name
(``_native.abi3.so``, or ``_native.pyd`` on Windows), a regular file with fixed
metadata (mtime 0, uid/gid 0, mode 0755): what ``setup``'s allow-list accepts.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "SHA256SUMS"


def _platforms() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_server_native_platforms", ROOT / "server_native" / "_dist" / "platforms.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def library_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        members = [
            name
            for name in archive.namelist()
            if name.startswith("server_native/_native") and name.count("/") == 1 and name.endswith((".so", ".pyd"))
        ]
        if len(members) != 1:
            raise SystemExit(f"{wheel.name}: expected one server_native/_native library, found {members}")
        return archive.read(members[0])


def write_archive(library: Path, label: str, dist: Path) -> Path:
    """``dist/server_native-<label>.tar.gz`` with ``library`` as its one member."""
    platforms = _platforms()
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / platforms.asset_name(label)
    data = library.read_bytes()
    info = tarfile.TarInfo(platforms.library_name(label))
    info.size = len(data)
    info.mode = 0o755
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    # gzip with mtime 0: the same library gives the same archive bytes.
    with open(target, "wb") as out, gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return target


def stage(label: str, wheel: Path | None, library: Path | None, strip: str | None, prebuilt: Path, dist: Path) -> Path:
    platforms = _platforms()
    platforms.check_label(label)
    folder = prebuilt / label
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / platforms.library_name(label)
    if wheel is not None:
        staged.write_bytes(library_from_wheel(wheel))
    elif library is not None:
        shutil.copyfile(library, staged)
    else:
        raise SystemExit("give --wheel or --library")
    if strip:
        subprocess.run([*shlex.split(strip), str(staged)], check=True)
    archive = write_archive(staged, label, dist)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    print(f"{staged} -> {archive} ({archive.stat().st_size} bytes, sha256 {digest})")
    return archive


def write_manifest(dist: Path, expect_all: bool) -> Path:
    platforms = _platforms()
    lines = []
    missing = []
    for label in platforms.LABELS:
        archive = dist / platforms.asset_name(label)
        if archive.is_file():
            lines.append(f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  {archive.name}\n")
        else:
            missing.append(label)
    if expect_all and missing:
        raise SystemExit(f"missing archives for: {', '.join(missing)}")
    if not lines:
        raise SystemExit(f"no server_native-<platform>.tar.gz in {dist}")
    manifest = dist / MANIFEST
    manifest.write_text("".join(lines), encoding="utf-8")
    print(manifest.read_text(encoding="utf-8"), end="")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("stage", help="stage and archive one platform's library")
    one.add_argument("--label", required=True)
    source = one.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path)
    source.add_argument("--library", type=Path)
    one.add_argument("--strip", help="strip command to run on the staged library, e.g. 'strip -x'")
    one.add_argument("--prebuilt-dir", type=Path, default=ROOT / "prebuilt")
    one.add_argument("--dist", type=Path, default=ROOT / "dist")
    every = commands.add_parser("manifest", help=f"write {MANIFEST} for the archives in a folder")
    every.add_argument("dist", type=Path)
    every.add_argument("--expect-all", action="store_true", help="fail unless all twelve platforms are there")
    args = parser.parse_args(argv)
    if args.command == "stage":
        stage(args.label, args.wheel, args.library, args.strip, args.prebuilt_dir, args.dist)
    else:
        write_manifest(args.dist, args.expect_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
