"""The GitHub workflows, checked by running the tools they run: actionlint
passes, cibuildwheel resolves exactly the intended abi3 identifiers and
their tests, the wheels' smoke test (the quick test subset) passes against a
wheel built here, and the release check refuses metadata that names no
complete prebuilt release."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from distribution_helpers import HOST_LABEL, REAL_LIBRARY, clean_env, venv_tool
from test_packaging import build_wheel_without_rust, fresh_venv, source_tree

from server_native._dist import platforms as _platforms

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CIBW_CONFIG = ROOT / "tool" / "cibuildwheel.toml"
GENERATOR = ROOT / "tool" / "generate_prebuilt_release.py"

INTENDED = {
    "linux": {"cp310-manylinux_x86_64", "cp310-manylinux_aarch64", "cp310-musllinux_x86_64", "cp310-musllinux_aarch64"},
    "macos": {"cp310-macosx_arm64", "cp310-macosx_x86_64"},
    "windows": {"cp310-win_amd64", "cp310-win_arm64"},
    "android": {"cp313-android_arm64_v8a", "cp313-android_x86_64"},
    "ios": {"cp313-ios_arm64_iphoneos", "cp313-ios_arm64_iphonesimulator", "cp313-ios_x86_64_iphonesimulator"},
}


def test_actionlint() -> None:
    actionlint = venv_tool("actionlint")
    assert actionlint is not None, "actionlint is not installed (pip install -e '.[test]')"
    done = subprocess.run(
        [actionlint, "-no-color", *sorted(str(p) for p in WORKFLOWS.glob("*.yml"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def cibuildwheel_platforms() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "cibuildwheel", "--help"], capture_output=True, text=True, timeout=60)
    return [platform for platform in INTENDED if platform in done.stdout]


@pytest.mark.parametrize("platform", list(INTENDED))
def test_cibuildwheel_identifiers(platform: str) -> None:
    if platform not in cibuildwheel_platforms():
        pytest.skip(f"the installed cibuildwheel does not know --platform {platform}")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cibuildwheel",
            "--config-file",
            str(CIBW_CONFIG),
            "--print-build-identifiers",
            "--platform",
            platform,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == INTENDED[platform]


def cibuildwheel_config() -> dict:
    return dict(tomllib.loads(CIBW_CONFIG.read_text())["tool"]["cibuildwheel"])


#: Identifiers whose wheel only loads the library and reports (no quick subset):
#: iOS runs no test at all.
INFO_ONLY = {"cp313-android_arm64_v8a", "cp313-android_x86_64", "cp310-win_arm64"}


@pytest.mark.parametrize("platform", list(INTENDED))
def test_cibuildwheel_resolves_the_wheel_tests_and_images(platform: str) -> None:
    """The options cibuildwheel computes for each identifier: the quick subset
    (or `info` where its requirements have no wheels), manylinux2014 images."""
    from cibuildwheel.options import CommandLineArguments, compute_options

    if platform not in cibuildwheel_platforms():
        pytest.skip(f"the installed cibuildwheel does not know --platform {platform}")
    arguments = dataclasses.replace(
        CommandLineArguments.defaults(), platform=platform, config_file=str(CIBW_CONFIG), package_dir=ROOT
    )  # type: ignore[arg-type]
    options = compute_options(platform, arguments, env={})  # type: ignore[arg-type]
    quick = cibuildwheel_config()["test-command"]
    assert "python -m pytest" in quick
    for identifier in INTENDED[platform]:
        build = options.build_options(identifier)
        if platform == "ios":
            assert not build.test_selector(identifier)
        elif identifier in INFO_ONLY:
            assert (build.test_command, build.test_requires, build.test_sources) == (
                "python -m server_native info",
                [],
                [],
            )
        else:
            assert (
                build.test_command == quick
                and build.test_sources == ["tests", "pyproject.toml"]
                and build.test_requires
            )
        if "manylinux" in identifier:
            assert build.manylinux_images is not None
            for arch in ("x86_64", "aarch64"):
                assert f"/manylinux2014_{arch}@" in build.manylinux_images[arch]


# ---------------------------------------------------------------- nothing publishes without release metadata


def check_release(module: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--require-release", "--output", str(module)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def generated_release(tmp_path: Path, labels: tuple[str, ...], repository: str) -> Path:
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(
        "".join(f"{index:064x}  {_platforms.asset_name(label)}\n" for index, label in enumerate(labels, 1))
    )
    module = tmp_path / "_prebuilt_release.py"
    done = subprocess.run(
        [
            sys.executable,
            str(GENERATOR),
            "--manifest",
            str(manifest),
            "--repository",
            repository,
            "--output",
            str(module),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return module


def test_the_release_check_passes_metadata_that_names_a_complete_release(tmp_path: Path) -> None:
    done = check_release(generated_release(tmp_path, _platforms.LABELS, "owner/server_native"))
    assert done.returncode == 0, done.stderr
    assert "is up to date and names the release" in done.stdout


@pytest.mark.parametrize(
    ("labels", "repository", "gap"),
    [
        (_platforms.LABELS, "", "REPOSITORY is empty"),
        (_platforms.LABELS[:-1], "owner/server_native", f"SHA256 has no hash for {_platforms.LABELS[-1]}"),
    ],
)
def test_the_release_check_fails_metadata_with_a_gap(
    tmp_path: Path, labels: tuple[str, ...], repository: str, gap: str
) -> None:
    done = check_release(generated_release(tmp_path, labels, repository))
    assert done.returncode == 1
    assert "names no complete release" in done.stderr and gap in done.stderr


def test_the_unpublished_metadata_in_the_checkout_fails_the_release_check() -> None:
    """Until a prebuilt release is made, the package names none: publishing must stop."""
    from server_native._dist import release as _prebuilt_release

    if _prebuilt_release.REPOSITORY and len(_prebuilt_release.SHA256) == len(_platforms.LABELS):
        pytest.skip("this checkout's release metadata names a release")
    done = check_release(ROOT / "server_native" / "_dist" / "release.py")
    assert done.returncode == 1 and "names no complete release" in done.stderr


# ---------------------------------------------------------------- the wheels' smoke test


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or HOST_LABEL != "linux-x64" or not REAL_LIBRARY.is_file(),
    reason="builds a linux-x64 wheel from the library built here",
)
def test_the_wheel_smoke_test_passes_against_a_wheel(tmp_path: Path) -> None:
    """What cibuildwheel does after building each wheel: a fresh venv, the wheel
    and test-requires installed, test-sources copied to an empty folder, and
    test-command run there, so the tests import the installed package."""
    config = cibuildwheel_config()
    wheels = tmp_path / "dist"
    built = build_wheel_without_rust(
        source_tree(tmp_path / "tree"), wheels, tmp_path / "build-home", SERVER_NATIVE_PREBUILT=str(REAL_LIBRARY)
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    (wheel,) = wheels.glob("*.whl")
    bin_dir = fresh_venv(tmp_path / "venv").parent
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home, **config.get("test-environment", {}))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    for requirements in ([str(wheel)], config["test-requires"]):
        done = subprocess.run(
            [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *requirements],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    test_cwd = tmp_path / "test_cwd"
    for source in config["test-sources"]:
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, test_cwd / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            test_cwd.mkdir(exist_ok=True)
            shutil.copyfile(ROOT / source, test_cwd / source)
    done = subprocess.run(
        config["test-command"], shell=True, cwd=test_cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    library = re.search(r"^library:\s+(\S+)", done.stdout, re.M)
    assert library is not None and Path(library.group(1)).is_relative_to(tmp_path / "venv"), done.stdout[:2000]
    assert re.search(r"^\d+ passed", done.stdout.splitlines()[-1]), done.stdout[-2000:]
