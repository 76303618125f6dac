"""The native library loader: every rung and their order, the
cache's tag, ownership and hash rules, what loads nothing (importing the
package, --help, setup, info), with real built libraries (copies of the
crate's build, and a wrong-ABI extension module compiled here), each case in a
child process with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    run_python,
    serve_one_request,
    sha256,
    ship_hashes,
    tool_module,
    user_cache_of,
)

import server_native
from server_native._dist import loader as _loader
from server_native._dist import platforms as _platforms
from server_native._dist.setup import make_folders

pytestmark = pytest.mark.skipif(
    HOST_LABEL is None or not REAL_LIBRARY.is_file(), reason="no platform label / library here"
)


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

    def serve(self, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """``server-native serve`` of an ASGI app in the project (serving needs the library)."""
        (self.cwd / "app.py").write_text("async def app(scope, receive, send):\n    pass\n")
        return run_cli("serve", "app:app", "--port", "0", cwd=self.cwd, env=env)


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
    assert info["tried"] == [
        {"rung": 1, "source": "SERVER_NATIVE_PREBUILT", "place": str(library), "outcome": "loaded"}
    ]


def test_other_tags_in_a_cache_are_not_used_unless_named(world: World) -> None:
    """After `pip install -U`, what `setup` fetched for an older version stays in
    the cache: it is not the new package's library."""
    place_library(world.project_dir("server-native-prebuilt-v0.0.9"))
    place_library(world.project_dir("server-native-prebuilt-v0.10.0"))
    place_library(world.project_dir("not-our-prefix-v99"))
    info = world.probe()
    assert (info["rung"], info["source"]) == (3, "package"), info["tried"]
    assert info["tried"][1]["outcome"] == (
        "not found (also here: server-native-prebuilt-v0.10.0, server-native-prebuilt-v0.0.9; "
        "used only when named by SERVER_NATIVE_PREBUILT_TAG or `setup --tag`)"
    )
    assert "overrides" not in info["stderr"]
    own = place_library(world.project_dir(TAG))
    assert world.probe()["path"] == str(own)


@pytest.mark.parametrize("named", ["0.10.0", "v0.10.0", "server-native-prebuilt-v0.10.0"])
def test_a_tag_named_by_the_environment_overrides_with_a_warning(world: World, named: str) -> None:
    place_library(world.project_dir(TAG))
    other = place_library(world.project_dir("server-native-prebuilt-v0.10.0"))
    info = world.probe(SERVER_NATIVE_PREBUILT_TAG=named)
    assert (info["rung"], info["path"], info["cache_tag"]) == (2, str(other), "server-native-prebuilt-v0.10.0")
    assert (
        f"the project cache library of server-native-prebuilt-v0.10.0 (named by SERVER_NATIVE_PREBUILT_TAG) "
        f"overrides the package's own {TAG}: {other}"
    ) in info["stderr"]


def test_a_pin_in_the_user_cache_names_a_tag(world: World) -> None:
    other = place_library(world.project_dir("server-native-prebuilt-v0.10.0"))
    cache = user_cache_of(world.env(), world.cwd)
    make_folders(cache / "prebuilt")
    pin = cache / "prebuilt" / "pinned-tag"
    pin.write_text("server-native-prebuilt-v0.10.0\n")
    info = world.probe()
    assert (info["rung"], info["path"]) == (2, str(other))
    assert f"(named by the pin in {pin}) overrides the package's own {TAG}" in info["stderr"]
    # a pin others could have written is not followed
    os.chmod(pin, 0o666)
    info = world.probe()
    assert info["rung"] == 3 and info["cache_tag"] == TAG
    assert f"ignoring the pinned tag in {pin}: {pin} is writable by group and others (mode 666)" in info["stderr"]


# ---------------------------------------------------------------- caches others could write, and shipped hashes


@pytest.mark.parametrize("component", ["library", "platform folder", "cache root"])
def test_a_cache_others_can_write_is_refused(world: World, component: str) -> None:
    library = place_library(world.project_dir())
    loose = {"library": library, "platform folder": library.parent, "cache root": world.project / ".server_native"}[
        component
    ]
    os.chmod(loose, 0o777 if loose.is_dir() else 0o666)
    info = world.probe()
    assert info["rung"] == 3, info["tried"]
    mode = "777" if loose.is_dir() else "666"
    outcome = f"refused: {loose} is writable by group and others (mode {mode})"
    assert info["tried"][1] == {"rung": 2, "source": "project cache", "place": str(library), "outcome": outcome}
    assert "NativeLibraryWarning" in info["stderr"] and outcome in info["stderr"]
    os.chmod(loose, 0o775 if loose.is_dir() else 0o664)
    assert "is writable by group (mode" in world.probe()["tried"][1]["outcome"]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to hand a file to another user")
def test_a_cache_owned_by_another_user_is_refused(world: World) -> None:
    library = place_library(world.project_dir())
    os.chown(library.parent, 65534, 65534)
    info = world.probe()
    assert info["rung"] == 3
    assert (
        info["tried"][1]["outcome"]
        == f"refused: {library.parent} belongs to uid 65534, not to this user (uid 0) or root"
    )


@pytest.fixture
def shipped(world: World, tmp_path: Path) -> Path:
    """The package copy ships the SHA-256 of a release archive of the real
    library (made by tool/stage_prebuilt.py); returns the archive."""
    assert HOST_LABEL is not None
    archive = tool_module("stage_prebuilt").write_archive(REAL_LIBRARY, HOST_LABEL, tmp_path / "release")
    ship_hashes(world.package, {HOST_LABEL: sha256(archive)})
    return archive


def test_own_tag_with_its_verified_archive_loads(world: World, shipped: Path) -> None:
    library = place_library(world.project_dir())
    place_library(world.project_dir(), source=shipped, name=shipped.name)
    info = world.probe()
    assert (info["rung"], info["path"]) == (2, str(library)), info["tried"]


@pytest.mark.parametrize("tampering", ["no archive", "another archive", "another library"])
def test_own_tag_that_does_not_match_the_shipped_hash_is_refused(
    world: World, shipped: Path, wrong_abi: Path, tampering: str
) -> None:
    place_library(world.project_dir(), source=wrong_abi if tampering == "another library" else None)
    asset = shipped.name
    if tampering != "no archive":
        archive = place_library(world.project_dir(), source=shipped, name=asset)
        if tampering == "another archive":
            archive.write_bytes(archive.read_bytes() + b"\0")
    info = world.probe()
    assert info["rung"] == 3, info["tried"]
    reason = {
        "no archive": f"no {asset} beside it to check against the SHA-256 this package ships for {TAG}",
        "another archive": f"{asset} beside it does not have the SHA-256 this package ships for {TAG}",
        "another library": f"it differs from the library in {asset}, the archive whose SHA-256 this package ships",
    }[tampering]
    assert info["tried"][1]["outcome"] == f"refused: {reason}"


def test_other_tags_have_no_shipped_hash_to_check(world: World, shipped: Path) -> None:
    other = place_library(world.project_dir("server-native-prebuilt-v0.10.0"))
    info = world.probe(SERVER_NATIVE_PREBUILT_TAG="0.10.0")
    assert (info["rung"], info["path"]) == (2, str(other))


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
    assert info["tried"][0] == {
        "rung": 1,
        "source": "SERVER_NATIVE_PREBUILT",
        "place": str(missing),
        "outcome": "not found",
    }
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
    done = world.serve(world.env(SERVER_NATIVE_PREBUILT=str(wrong_abi)))
    assert done.returncode != 0
    error = done.stderr[done.stderr.index("ImportError: server_native could not load its native library") :]
    assert "could not load its native library" in error
    for place in (
        str(wrong_abi),
        str(world.project_dir() / library_name()),
        str(world.user_dir() / library_name()),
        str(world.package),
    ):
        assert place in error
    assert "4. source build" in error and "not a source checkout" in error
    assert "pip install server-native" in error and "SERVER_NATIVE_PREBUILT=" in error
    # no release location in this build: `setup` would only exit 2, so it is not offered
    assert "setup" not in error and "pip install . in" not in error
    done = world.serve(world.env(SERVER_NATIVE_RELEASES_URL="http://127.0.0.1:9/releases"))
    assert f"python -m server_native setup   (downloads the prebuilt library {TAG}" in done.stderr


def test_source_build_rung_needs_cargo(tmp_path: Path) -> None:
    """A source checkout (Cargo.toml beside the package) without cargo on PATH:
    rung 4 says why it could not build."""
    world = World(tmp_path, with_library=False)
    (world.site / "Cargo.toml").write_text("[package]\nname = 'server_native'\n")
    (world.site / "src").mkdir()
    done = world.serve(clean_env(world.home, world.site, cargo=False))
    assert "4. source build: " in done.stderr and "cargo not found on PATH" in done.stderr, done.stderr
    done = world.serve(world.env(SERVER_NATIVE_SOURCE_BUILD="0"))
    assert "turned off by SERVER_NATIVE_SOURCE_BUILD=0" in done.stderr, done.stderr


def test_mobile_platforms_use_only_the_package(world: World) -> None:
    """iOS and Android: only the library inside the app's package (rung 3),
    whatever the environment variable and the caches hold."""
    place_library(world.project_dir())
    code = (
        "import json, server_native._dist.loader as l\n"
        "r = l.resolve(sys_platform='android', build=False)\n"
        "print(json.dumps(r.as_dict()))\n"
    )
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
    assert "pip install server-native" in done.stderr and "setup" not in done.stderr
    done = run_cli("setup", "--platform", "nowhere-x64", cwd=world.cwd, env=world.env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"server-native setup: error: unknown platform 'nowhere-x64' (known: {', '.join(_platforms.LABELS)})"
    ]


# ---------------------------------------------------------------- what loads nothing

NOTHING_LOADED = """
import json, runpy, sys
args = sys.argv[1:]
code = None
if args:
    sys.argv = ["server-native", *args]
    try:
        runpy.run_module("server_native", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
else:
    import server_native, server_native.cli.main
    code = server_native.__version__
print(json.dumps({"code": code, "loaded": sorted(m for m in ("server_native._native", "requests", "tqdm") if m in sys.modules)}))
"""


def run_loading_nothing(world: World, *args: str) -> tuple[dict, str]:
    """``python -m server_native ARGS`` (or, without ARGS, importing the package
    and its CLI) in a child; its exit code and which heavy modules it imported."""
    done = subprocess.run(
        [sys.executable, "-c", NOTHING_LOADED, *args],
        cwd=world.cwd,
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_importing_the_package_loads_no_library_and_no_download_tools(world: World) -> None:
    answer, _ = run_loading_nothing(world)
    assert answer == {"code": server_native.__version__, "loaded": []}


@pytest.fixture
def checkout_without_library(tmp_path: Path) -> World:
    """A source checkout (Cargo.toml and src/ beside the package, cargo and
    maturin at hand) with no library anywhere, and a Cargo.toml maturin rejects
    at once: a build, if one starts, fails in seconds instead of compiling."""
    world = World(tmp_path, with_library=False)
    (world.site / "Cargo.toml").write_text("[package]\nname = 'server_native'\n")
    (world.site / "src").mkdir()
    return world


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--help",), 0),
        (("--version",), 0),
        (("serve", "--help"), 0),
        (("setup", "--help"), 0),
        (("info",), 1),
        (("setup", "--platform", "nowhere-x64"), 2),
    ],
)
def test_commands_that_need_no_library_load_none_and_build_none(
    checkout_without_library: World, args: tuple[str, ...], code: int
) -> None:
    answer, stderr = run_loading_nothing(checkout_without_library, *args)
    assert answer == {"code": code, "loaded": []}, stderr
    assert "building the native library" not in stderr


def test_info_does_not_build_in_a_checkout(checkout_without_library: World) -> None:
    done = run_cli("info", cwd=checkout_without_library.cwd, env=checkout_without_library.env())
    assert done.returncode == 1
    assert "4. source build: " in done.stdout and "not tried by `info` (using the package builds it)" in done.stdout
    assert "pip install . in" in done.stderr  # a checkout: building it is a way out


def test_a_source_build_says_it_starts_why_and_how_to_skip_it(checkout_without_library: World) -> None:
    world = checkout_without_library
    done = run_python("from server_native import NativeHttpServer", cwd=world.cwd, env=world.env())
    assert done.returncode != 0
    notice = done.stderr[done.stderr.index("server_native: building the native library from source") :]
    assert notice.startswith(
        f"server_native: building the native library from source in {world.site} (maturin build --release, about 8 minutes"
    )
    assert (
        "Why: this is a source checkout and no library fits (project cache: not found; user cache: not found; package: no _native library in the package)"
        in notice
    )
    assert "To skip it:" in notice and "SERVER_NATIVE_SOURCE_BUILD=0" in notice
    assert "4. source build: " in done.stderr and "maturin failed" in done.stderr


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
