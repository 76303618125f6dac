"""The native library loader (SPEC section 5): every rung and their order, with
real built libraries (copies of the crate's build, and a wrong-ABI extension
module compiled here), each case in a child process with a clean environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import server_native
from server_native import _loader, _platforms

from distribution_helpers import (
    HOST_LABEL,
    REAL_LIBRARY,
    TAG,
    WRONG_ABI,
    build_wrong_abi_library,
    clean_env,
    copy_package,
    library_name,
    place_library,
    probe,
    run_cli,
    serve_one_request,
    user_cache_of,
)

pytestmark = pytest.mark.skipif(HOST_LABEL is None or not REAL_LIBRARY.is_file(), reason="no platform label / library here")


class World:
    """A package copy, a project and a home, for one child process."""

    def __init__(self, tmp: Path, *, with_library: bool = True) -> None:
        self.site = tmp / "site"
        self.package = copy_package(self.site, with_library=with_library)
        self.home = tmp / "home"
        self.home.mkdir()
        self.project = tmp / "project"
        (self.project / "app").mkdir(parents=True)
        (self.project / "pyproject.toml").write_text("[project]\nname = 'app'\nversion = '0'\n")
        self.cwd = self.project / "app"  # the project root is found from a subfolder

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env(self.home, self.site)
        env.update(extra)
        return env

    def project_dir(self, tag: str = TAG) -> Path:
        assert HOST_LABEL is not None
        return self.project / ".server_native" / "prebuilt" / tag / HOST_LABEL

    def user_dir(self, tag: str = TAG) -> Path:
        assert HOST_LABEL is not None
        return user_cache_of(self.env(), self.cwd) / "prebuilt" / tag / HOST_LABEL

    def probe(self, **extra: str) -> dict:
        return probe(cwd=self.cwd, env=self.env(**extra))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture(scope="module")
def wrong_abi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    library = build_wrong_abi_library(tmp_path_factory.mktemp("wrong-abi"))
    if library is None:
        pytest.skip("no C compiler or Python headers to build a wrong-ABI library")
    return library


def outcomes(info: dict) -> list[tuple[int, str, str]]:
    return [(t["rung"], t["source"], t["outcome"]) for t in info["tried"]]


# ---------------------------------------------------------------- order


def test_package_library_when_nothing_else(world: World) -> None:
    info = world.probe()
    assert (info["rung"], info["source"]) == (3, "package")
    assert Path(info["path"]).parent == world.package
    assert info["abi_version"] == _loader.ABI_VERSION
    assert [t["rung"] for t in info["tried"]] == [1, 2, 2, 3]
    assert "NativeLibraryWarning" not in info["stderr"]


def test_user_cache_beats_package(world: World) -> None:
    library = place_library(world.user_dir())
    info = world.probe()
    assert (info["rung"], info["source"], info["path"]) == (2, "user cache", str(library))


def test_project_cache_beats_user_cache(world: World) -> None:
    place_library(world.user_dir())
    library = place_library(world.project_dir())
    info = world.probe()
    assert (info["rung"], info["source"], info["path"]) == (2, "project cache", str(library))


def test_env_var_beats_project_cache(world: World, tmp_path: Path) -> None:
    place_library(world.project_dir())
    place_library(world.user_dir())
    library = place_library(tmp_path / "elsewhere", name="any-name.so")
    info = world.probe(SERVER_NATIVE_PREBUILT=str(library))
    assert (info["rung"], info["source"], info["path"]) == (1, "SERVER_NATIVE_PREBUILT", str(library))
    assert info["tried"] == [{"rung": 1, "source": "SERVER_NATIVE_PREBUILT", "place": str(library), "outcome": "loaded"}]


def test_package_tag_first_then_newest_other_tag(world: World) -> None:
    older = place_library(world.project_dir("server-native-prebuilt-v0.0.9"))
    newer = place_library(world.project_dir("server-native-prebuilt-v0.10.0"))
    place_library(world.project_dir("not-our-prefix-v99"))
    info = world.probe()
    assert info["path"] == str(newer), info["tried"]
    assert str(older) not in json.dumps(info["tried"])
    own = place_library(world.project_dir(TAG))
    assert world.probe()["path"] == str(own)


# ---------------------------------------------------------------- skipped candidates


def test_wrong_abi_is_skipped_with_a_warning(world: World, wrong_abi: Path) -> None:
    place_library(world.project_dir(), source=wrong_abi)
    real = place_library(world.user_dir())
    info = world.probe(SERVER_NATIVE_PREBUILT=str(wrong_abi))
    assert (info["rung"], info["source"], info["path"]) == (2, "user cache", str(real))
    skipped = [t for t in info["tried"] if t["outcome"].startswith(f"ABI version {WRONG_ABI}")]
    assert [t["rung"] for t in skipped] == [1, 2]
    assert info["stderr"].count("NativeLibraryWarning") == 2
    assert f"ABI version {WRONG_ABI}, this package needs {_loader.ABI_VERSION}: skipped" in info["stderr"]


def test_missing_file_is_reported(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / library_name()
    info = world.probe(SERVER_NATIVE_PREBUILT=str(missing))
    assert info["rung"] == 3
    assert info["tried"][0] == {"rung": 1, "source": "SERVER_NATIVE_PREBUILT", "place": str(missing), "outcome": "not found"}
    assert "NativeLibraryWarning" in info["stderr"] and str(missing) in info["stderr"]


def test_relative_env_path_is_refused(world: World) -> None:
    place_library(world.cwd, name="relative.so")
    info = world.probe(SERVER_NATIVE_PREBUILT="relative.so")
    assert info["rung"] == 3
    assert info["tried"][0]["outcome"] == "not an absolute path: skipped"


def test_a_library_that_fails_to_load_is_skipped(world: World, tmp_path: Path) -> None:
    broken = tmp_path / "broken" / library_name()
    broken.parent.mkdir()
    broken.write_bytes(b"\x7fELF this is not a library")
    info = world.probe(SERVER_NATIVE_PREBUILT=str(broken))
    assert info["rung"] == 3
    assert info["tried"][0]["outcome"].startswith("failed to load: ")


def test_nothing_fits_one_error_lists_every_place(tmp_path: Path, wrong_abi: Path) -> None:
    world = World(tmp_path, with_library=False)
    place_library(world.project_dir(), source=wrong_abi)
    done = run_cli("serve", "x:app", cwd=world.cwd, env=world.env(SERVER_NATIVE_PREBUILT=str(wrong_abi)))
    assert done.returncode != 0
    error = done.stderr[done.stderr.index("ImportError: ") :]
    assert "could not load its native library" in error
    for place in (str(wrong_abi), str(world.project_dir() / library_name()), str(world.user_dir() / library_name()), str(world.package)):
        assert place in error
    assert "4. source build" in error and "not a source checkout" in error
    assert "pip install" in error and "python -m server_native setup" in error and "SERVER_NATIVE_PREBUILT=" in error


def test_source_build_rung_needs_cargo(tmp_path: Path) -> None:
    """A source checkout (Cargo.toml beside the package) without cargo on PATH:
    rung 4 says why it could not build."""
    world = World(tmp_path, with_library=False)
    (world.site / "Cargo.toml").write_text("[package]\nname = 'server_native'\n")
    (world.site / "src").mkdir()
    done = run_cli("serve", "x:app", cwd=world.cwd, env=clean_env(world.home, world.site, cargo=False))
    assert "4. source build: " in done.stderr and "cargo not found on PATH" in done.stderr, done.stderr
    done = run_cli("serve", "x:app", cwd=world.cwd, env=world.env(SERVER_NATIVE_SOURCE_BUILD="0"))
    assert "turned off by SERVER_NATIVE_SOURCE_BUILD=0" in done.stderr, done.stderr


def test_mobile_platforms_use_only_the_package(world: World) -> None:
    """iOS and Android: only the library inside the app's package (rung 3),
    whatever the environment variable and the caches hold."""
    place_library(world.project_dir())
    code = (
        "import json, server_native._loader as l\n"
        "r = l.resolve(sys_platform='android', cli_mode=True)\n"
        "print(json.dumps(r.as_dict()))\n"
    )
    from distribution_helpers import run_python

    library = place_library(world.home / "side", name="side.so")
    done = run_python(code, cwd=world.cwd, env=world.env(SERVER_NATIVE_PREBUILT=str(library)))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["rung"] == 3 and Path(info["path"]).parent == world.package
    assert [(t["rung"], t["outcome"]) for t in info["tried"][:3]] == [
        (1, "not used on android (only the library inside the app's package)"),
        (2, "not used on android (only the library inside the app's package)"),
        (3, "loaded"),
    ]


# ---------------------------------------------------------------- info, and the CLI without a library


def test_info_says_what_was_loaded_and_from_where(world: World) -> None:
    library = place_library(world.project_dir())
    done = run_cli("info", cwd=world.cwd, env=world.env())
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"library:      {library}" in out
    assert "rung:         2 (project cache)" in out
    assert f"ABI version:  {_loader.ABI_VERSION}" in out
    assert f"platform:     {HOST_LABEL}" in out
    assert "tls-rustls-ring" in out and "http3" in out
    assert "1. SERVER_NATIVE_PREBUILT: (environment variable): not set" in out
    done = run_cli("info", "--json", cwd=world.cwd, env=world.env())
    info = json.loads(done.stdout)
    assert info["path"] == str(library) and info["rung"] == 2 and info["platform"] == HOST_LABEL
    assert info["version"] == server_native.__version__
    assert set(info["features"]) >= {"tls-rustls-ring", "http1", "http2", "http3"}


def test_info_and_setup_run_when_no_library_loads(tmp_path: Path) -> None:
    world = World(tmp_path, with_library=False)
    done = run_cli("info", cwd=world.cwd, env=world.env())
    assert done.returncode == 1
    assert "library:      none loaded" in done.stdout and "3. package: " in done.stdout
    assert "python -m server_native setup" in done.stderr
    done = run_cli("setup", "--platform", "nowhere-x64", cwd=world.cwd, env=world.env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"server-native setup: error: unknown platform 'nowhere-x64' (known: {', '.join(_platforms.LABELS)})"]


def test_the_package_uses_the_loaded_module() -> None:
    from server_native import _native

    assert _native is _loader.native is sys.modules["server_native._native"]
    assert _loader.resolution().rung is not None


def test_a_library_from_the_env_var_serves_a_request(world: World, tmp_path: Path) -> None:
    library = place_library(tmp_path / "side")
    answer = serve_one_request(cwd=world.cwd, env=world.env(SERVER_NATIVE_PREBUILT=str(library)))
    assert answer == {"rung": 1, "source": "SERVER_NATIVE_PREBUILT", "path": str(library)}


# ---------------------------------------------------------------- platform labels


@pytest.mark.parametrize(
    ("sys_platform", "machine", "label"),
    [
        ("linux", "x86_64", "linux-x64"),
        ("linux", "aarch64", "linux-arm64"),
        ("darwin", "arm64", "macos-arm64"),
        ("darwin", "x86_64", "macos-x64"),
        ("win32", "AMD64", "windows-x64"),
        ("win32", "ARM64", "windows-arm64"),
        ("android", "aarch64", "android-arm64"),
        ("android", "armv8l", "android-armv7"),
        ("android", "armv7l", "android-armv7"),
        ("android", "x86_64", "android-x64"),
        ("ios", "arm64", "ios-arm64"),
        ("linux", "riscv64", None),
        ("linux", "armv7l", None),
        ("sunos5", "x86_64", None),
    ],
)
def test_host_labels(sys_platform: str, machine: str, label: str | None) -> None:
    assert _platforms.host_label(sys_platform, machine) == label


def test_labels_targets_and_file_names() -> None:
    assert _platforms.LABELS == (
        "linux-x64", "linux-arm64", "macos-arm64", "macos-x64", "windows-x64", "windows-arm64",
        "android-arm64", "android-armv7", "android-x64", "ios-arm64", "ios-sim-arm64", "ios-sim-x64",
    )
    assert set(_platforms.RUST_TARGETS) == set(_platforms.LABELS)
    for label, triple in _platforms.RUST_TARGETS.items():
        assert _platforms.label_for_target(triple) == label
    assert _platforms.label_for_target("x86_64-unknown-linux-musl") is None
    assert _platforms.library_name("windows-arm64") == "_native.pyd"
    assert _platforms.library_name("ios-sim-x64") == "_native.abi3.so"
    assert _platforms.asset_name("android-armv7") == "server_native-android-armv7.tar.gz"
    with pytest.raises(_platforms.UnknownPlatform):
        _platforms.library_name("linux-mips")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF")
def test_manylinux_tag_from_the_real_library() -> None:
    needed = _platforms.glibc_requirement(REAL_LIBRARY)
    assert needed is not None and needed >= (2, 17)
    machine = "x86_64" if HOST_LABEL == "linux-x64" else "aarch64"
    assert HOST_LABEL is not None
    assert _platforms.wheel_platform_tag(HOST_LABEL, REAL_LIBRARY) == f"manylinux_{needed[0]}_{needed[1]}_{machine}"
