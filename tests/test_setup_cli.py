"""``python -m server_native setup`` against a real HTTP server on loopback that
serves a release layout built here from the real native library (archives made
by tool/stage_prebuilt.py, SHA256SUMS manifests, a GitHub-style releases API
JSON); then the loader picks the downloaded library and a request is served.
Also: pins, what proves a download (and what does not), a server that stalls
or refuses, the release metadata generator and its staleness check."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
    ThreadingHTTPServer,
)
from pathlib import Path

import pytest
from distribution_helpers import (
    HOST_LABEL,
    REAL_LIBRARY,
    ROOT,
    TAG,
    clean_env,
    copy_package,
    probe,
    run_cli,
    serve_one_request,
    sha256,
    ship_hashes,
    tool_module,
    user_cache_of,
)

from server_native._dist import platforms as _platforms
from server_native._dist import release as _prebuilt_release
from server_native._dist import setup as prebuilt

pytestmark = pytest.mark.skipif(
    HOST_LABEL is None or not REAL_LIBRARY.is_file(), reason="no platform label / library here"
)

PREFIX = _prebuilt_release.TAG_PREFIX


stage_tool = tool_module("stage_prebuilt")
generator = tool_module("generate_prebuilt_release")


def evil_archive(target: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> None:
    with tarfile.open(target, "w:gz") as tar:
        for info in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info


@dataclass
class Release:
    """The release layout on disk, served over HTTP on 127.0.0.1."""

    root: Path
    port: int = 0
    requests: list[str] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/releases"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/releases"

    def folder(self, tag: str) -> Path:
        folder = self.root / "releases" / "download" / tag
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def add(
        self, tag: str, labels: list[str], *, draft: bool = False, prerelease: bool = False, manifest: bool = True
    ) -> Path:
        folder = self.folder(tag)
        for label in labels:
            staged = folder / "staging" / label / _platforms.library_name(label)
            staged.parent.mkdir(parents=True)
            staged.write_bytes(REAL_LIBRARY.read_bytes())
            stage_tool.write_archive(staged, label, folder)
        if manifest:
            stage_tool.write_manifest(folder, expect_all=False)
        self.releases.append(
            {
                "tag_name": tag,
                "draft": draft,
                "prerelease": prerelease,
                "assets": [{"name": _platforms.asset_name(label)} for label in labels] + [{"name": "SHA256SUMS"}],
            }
        )
        self.write_api()
        return folder

    def write_api(self) -> None:
        api = self.root / "api"
        api.mkdir(exist_ok=True)
        (api / "releases").write_text(json.dumps(self.releases))

    def host_asset(self, tag: str) -> Path:
        assert HOST_LABEL is not None
        return self.folder(tag) / _platforms.asset_name(HOST_LABEL)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    assert HOST_LABEL is not None
    layout = Release(tmp_path_factory.mktemp("release-server"))
    others = [label for label in ("macos-arm64", "windows-x64") if label != HOST_LABEL]
    layout.add(TAG, [HOST_LABEL, *others])
    layout.add(f"{PREFIX}0.2.0", [HOST_LABEL])
    layout.add(f"{PREFIX}0.3.0", ["windows-x64" if HOST_LABEL != "windows-x64" else "macos-arm64"])
    layout.add(f"{PREFIX}0.4.0", [HOST_LABEL], draft=True)
    layout.add(f"{PREFIX}0.5.0rc1", [HOST_LABEL], prerelease=True)
    layout.add("some-other-tool-v9.0.0", [HOST_LABEL])
    # a manifest whose hash does not match the archive
    bad = layout.add(f"{PREFIX}0.0.1", [HOST_LABEL])
    (bad / "SHA256SUMS").write_text(f"{'0' * 64}  {_platforms.asset_name(HOST_LABEL)}\n")
    # archives that try to escape, or hold more than the library
    name = _platforms.library_name(HOST_LABEL)
    for tag, members in {
        f"{PREFIX}0.0.2": [member(f"../{name}")],
        f"{PREFIX}0.0.3": [member(name, tarfile.SYMTYPE, "/etc/passwd")],
        f"{PREFIX}0.0.4": [member(name), member("README.md")],
        f"{PREFIX}0.0.5": [member(f"/tmp/{name}")],
        f"{PREFIX}0.0.6": [member("lib", tarfile.DIRTYPE), member(name)],
    }.items():
        folder = layout.folder(tag)
        evil_archive(layout.host_asset(tag), members)
        stage_tool.write_manifest(folder, expect_all=False)
    # a release whose manifest does not list this platform
    layout.add(f"{PREFIX}0.0.7", [label for label in ("android-arm64", "ios-arm64")])

    handler = partial(_Handler, layout, directory=str(layout.root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    layout.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield layout
    server.shutdown()
    server.server_close()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, layout: Release, *args: object, **kwargs: object) -> None:
        self.layout = layout
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        self.layout.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class Project:
    def __init__(self, tmp: Path) -> None:
        self.site = tmp / "site"
        self.package = copy_package(self.site)
        self.home = tmp / "home"
        self.home.mkdir()
        self.root = tmp / "project"
        self.root.mkdir()
        (self.root / "pyproject.toml").write_text("[project]\nname = 'app'\nversion = '0'\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env(self.home, self.site)
        env.update(extra)
        return env

    def setup(
        self, release: Release, *args: str, quiet: bool = True, base_url: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        options = ["--base-url", base_url or release.base_url, "--api-url", release.api_url]
        return run_cli("setup", *options, *(["--quiet"] if quiet else []), *args, cwd=self.root, env=self.env())

    def installed(self, tag: str = TAG, label: str | None = None) -> Path:
        label = label or HOST_LABEL
        assert label is not None
        return self.root / ".server_native" / "prebuilt" / tag / label / _platforms.library_name(label)

    def pin(self) -> Path:
        return user_cache_of(self.env(), self.root) / "prebuilt" / "pinned-tag"

    def prebuilt_tree(self) -> list[str]:
        base = self.root / ".server_native"
        return sorted(str(p.relative_to(base)) for p in base.rglob("*")) if base.exists() else []


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("server-native setup: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- success


def test_tagged_download_then_the_loader_uses_it_and_serves(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", TAG, quiet=False)
    assert done.returncode == 0, done.stderr
    library = project.installed()
    assert library.read_bytes() == REAL_LIBRARY.read_bytes()
    assert done.stdout.strip() == f"installed {TAG} for {HOST_LABEL}: {library}"
    assert "100%" in done.stderr  # the progress bar ran
    record = json.loads((library.parent / prebuilt.INSTALL_RECORD).read_text())
    assert record["sha256"] == sha256(release.host_asset(TAG)) and record["tag"] == TAG
    # the archive stays beside the library (the loader checks one against the other)
    assert sorted(p.name for p in library.parent.iterdir()) == sorted(
        [library.name, release.host_asset(TAG).name, prebuilt.INSTALL_RECORD]
    )
    assert (library.parent / release.host_asset(TAG).name).read_bytes() == release.host_asset(TAG).read_bytes()
    # no staging folder left behind, and nothing others can write to
    assert sorted(p.name for p in library.parent.parent.iterdir()) == [HOST_LABEL]
    for folder in (library.parent, library.parent.parent, project.root / ".server_native"):
        assert folder.stat().st_mode & 0o022 == 0, folder
    # this build ships no hashes and names no repository: nothing proved the download, and setup says so
    assert (
        f"not verified: this build of server_native names no GitHub repository to check an attestation against. {prebuilt.NOT_PROVEN}."
        in done.stderr
    )

    info = probe(cwd=project.root, env=project.env())
    assert (info["rung"], info["source"], info["path"]) == (2, "project cache", str(library))
    answer = serve_one_request(cwd=project.root, env=project.env())
    assert answer == {"rung": 2, "source": "project cache", "path": str(library)}


def test_default_tag_is_the_package_tag(project: Project, release: Release) -> None:
    done = project.setup(release)
    assert done.returncode == 0, done.stderr
    assert project.installed(TAG).is_file()


def test_version_shorthand(project: Project, release: Release) -> None:
    assert project.setup(release, "--tag", "v0.2.0").returncode == 0
    assert project.installed(f"{PREFIX}0.2.0").is_file()
    assert project.pin().read_text() == f"{PREFIX}0.2.0\n"


def test_latest_is_the_newest_release_with_the_asset(project: Project, release: Release) -> None:
    release.requests.clear()
    done = project.setup(release, "--tag", "latest", quiet=False)
    assert done.returncode == 0, done.stderr
    # 0.3.0 lacks this platform, 0.4.0 is a draft, 0.5.0rc1 a prerelease, 9.0.0 another prefix
    assert HOST_LABEL is not None
    assert f"latest release with {_platforms.asset_name(HOST_LABEL)}: {PREFIX}0.2.0" in done.stderr
    assert project.installed(f"{PREFIX}0.2.0").is_file()
    assert any(path.startswith("/api/releases?per_page=100") for path in release.requests)
    # naming a tag pinned it: the loader takes it over the package's own, and says so
    assert f"pinned {PREFIX}0.2.0: the loader uses it instead of the package's own {TAG}" in done.stderr
    info = probe(cwd=project.root, env=project.env())
    assert info["path"] == str(project.installed(f"{PREFIX}0.2.0"))
    assert f"overrides the package's own {TAG}" in info["stderr"]
    # setup without --tag goes back to the package's tag
    done = project.setup(release, quiet=False)
    assert done.returncode == 0, done.stderr
    assert f"removed the pin of {PREFIX}0.2.0" in done.stderr and not project.pin().exists()
    info = probe(cwd=project.root, env=project.env())
    assert info["path"] == str(project.installed(TAG)) and "overrides" not in info["stderr"]


def test_latest_for_another_platform(project: Project, release: Release) -> None:
    other = "windows-x64" if HOST_LABEL != "windows-x64" else "macos-arm64"
    done = project.setup(release, "--tag", "latest", "--platform", other)
    assert done.returncode == 0, done.stderr
    library = project.installed(f"{PREFIX}0.3.0", other)
    assert library.read_bytes() == REAL_LIBRARY.read_bytes()
    assert library.name == _platforms.library_name(other)
    assert not project.pin().exists()  # a library for another machine pins nothing here


def test_already_installed_needs_force(project: Project, release: Release) -> None:
    assert project.setup(release, "--tag", TAG).returncode == 0
    library = project.installed()
    library.write_bytes(b"stale")
    release.requests.clear()
    done = project.setup(release, "--tag", TAG)
    assert done.returncode == 0 and "is installed" in done.stdout
    assert release.requests == []  # no download
    done = project.setup(release, "--tag", TAG, "--force")
    assert done.returncode == 0, done.stderr
    assert library.read_bytes() == REAL_LIBRARY.read_bytes()
    assert sorted(p.name for p in library.parent.parent.iterdir()) == [HOST_LABEL]


def test_user_destination(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", TAG, "--dest", "user")
    assert done.returncode == 0, done.stderr
    assert HOST_LABEL is not None
    library = (
        user_cache_of(project.env(), project.root) / "prebuilt" / TAG / HOST_LABEL / _platforms.library_name(HOST_LABEL)
    )
    assert library.read_bytes() == REAL_LIBRARY.read_bytes()
    assert project.prebuilt_tree() == []
    info = probe(cwd=project.root, env=project.env())
    assert (info["source"], info["path"]) == ("user cache", str(library))


def test_release_location_from_the_environment(project: Project, release: Release) -> None:
    env = project.env(SERVER_NATIVE_RELEASES_URL=release.base_url, SERVER_NATIVE_RELEASES_API_URL=release.api_url)
    done = run_cli("setup", "--quiet", "--tag", "latest", cwd=project.root, env=env)
    assert done.returncode == 0, done.stderr
    assert project.installed(f"{PREFIX}0.2.0").is_file()


# ---------------------------------------------------------------- refusals


def test_wrong_checksum_is_refused_and_nothing_installed(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", f"{PREFIX}0.0.1")
    assert done.returncode == 1
    line = one_error_line(done)
    assert "checksum mismatch" in line and "SHA256SUMS says " + "0" * 64 in line and "nothing installed" in line
    assert project.prebuilt_tree() == ["prebuilt", f"prebuilt/{PREFIX}0.0.1"]  # the tag folder, empty


def test_package_shipped_hash_is_checked_for_the_package_tag(project: Project, release: Release) -> None:
    assert HOST_LABEL is not None
    with pytest.raises(prebuilt.SetupError, match="the hash shipped in this package is f{64}"):
        prebuilt.setup(
            TAG,
            base_url=release.base_url,
            progress=False,
            start=project.root,
            package_hashes={HOST_LABEL: "f" * 64},
            log=lambda m: None,
        )
    assert not project.installed().exists()
    installed = prebuilt.setup(
        TAG,
        base_url=release.base_url,
        progress=False,
        start=project.root,
        package_hashes={HOST_LABEL: sha256(release.host_asset(TAG))},
        log=lambda m: None,
    )
    assert installed.path == project.installed() and installed.downloaded
    record = json.loads((installed.path.parent / prebuilt.INSTALL_RECORD).read_text())
    assert record["checked_against"] == ["SHA256SUMS", "package"]


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("0.0.2", "leaves the folder ('..')"),
        ("0.0.3", "is a link"),
        ("0.0.4", "unexpected member 'README.md'"),
        ("0.0.5", "absolute or Windows path"),
        ("0.0.6", "'lib' is not a regular file"),
    ],
)
def test_unsafe_archives_are_refused(project: Project, release: Release, version: str, reason: str) -> None:
    done = project.setup(release, "--tag", f"{PREFIX}{version}")
    assert done.returncode == 1
    assert reason in one_error_line(done)
    assert project.prebuilt_tree() == ["prebuilt", f"prebuilt/{PREFIX}{version}"]
    # nothing was written where the members point (their content is b"x")
    name = _platforms.library_name(HOST_LABEL or "linux-x64")
    for target in (project.root / ".server_native" / "prebuilt" / name, Path("/tmp", name)):
        assert not (target.is_file() and target.read_bytes() == b"x")


def test_missing_asset(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", f"{PREFIX}0.0.7")
    assert done.returncode == 1
    assert one_error_line(done) == (
        f"server-native setup: error: release {PREFIX}0.0.7 has no asset {_platforms.asset_name(HOST_LABEL or '')} (not in its SHA256SUMS)"
    )


def test_missing_tag(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", f"{PREFIX}7.7.7")
    assert done.returncode == 1
    line = one_error_line(done)
    assert (
        f"release {PREFIX}7.7.7 not found (no SHA256SUMS at {release.base_url}/download/{PREFIX}7.7.7/SHA256SUMS)"
        in line
    )


def test_latest_without_any_release_for_the_platform(project: Project, release: Release) -> None:
    done = project.setup(release, "--tag", "latest", "--platform", "android-armv7")
    assert done.returncode == 1
    assert f"no release tagged {PREFIX}* has server_native-android-armv7.tar.gz" in one_error_line(done)


def test_server_down(project: Project, release: Release) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        closed_port = probe_socket.getsockname()[1]
    done = project.setup(release, "--tag", TAG, base_url=f"http://127.0.0.1:{closed_port}/releases")
    assert done.returncode == 1
    line = one_error_line(done)
    assert (
        f"cannot get the SHA256SUMS of {TAG} from http://127.0.0.1:{closed_port}/releases/download/{TAG}/SHA256SUMS: "
        in line
    )
    assert (
        f"127.0.0.1:{closed_port} refused the connection: nothing listens there (the server is down, or a wrong port) (3 attempts in "
        in line
    )
    assert project.prebuilt_tree() == []


@pytest.fixture
def stalling_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A server on loopback that takes connections and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    taken: list[socket.socket] = []
    stop = threading.Event()

    def take() -> None:
        while not stop.is_set():
            try:
                taken.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    yield listener.getsockname()[1], taken
    stop.set()
    thread.join(5)
    for connection in taken:
        connection.close()
    listener.close()


def test_a_stalling_server_fails_within_the_budget_and_says_so(
    project: Project, release: Release, stalling_server: tuple[int, list[socket.socket]]
) -> None:
    """All network waits of one setup share --timeout (60 s by default; 3 here):
    three tries of 30% of it each, then one line that says the server stalled."""
    port, taken = stalling_server
    done = project.setup(release, "--tag", TAG, "--timeout", "3", base_url=f"http://127.0.0.1:{port}/releases")
    assert done.returncode == 1
    line = one_error_line(done)
    assert f"127.0.0.1:{port} took the connection but sent nothing for 1s (the server stalled) (3 attempts in " in line
    assert len(taken) == 3
    assert project.prebuilt_tree() == []
    assert prebuilt.TIMEOUT == 60


@pytest.fixture
def stalling_body(release: Release) -> Iterator[str]:
    """A release server whose archive download sends its headers and 1000 of
    100000 bytes, then nothing."""
    manifest = (release.folder(TAG) / "SHA256SUMS").read_bytes()
    release_gone = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.endswith("SHA256SUMS"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(manifest)))
                self.end_headers()
                self.wfile.write(manifest)
                return
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
            self.wfile.flush()
            release_gone.wait(30)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/releases"
    release_gone.set()
    server.shutdown()
    server.server_close()


def test_a_download_that_stalls_halfway_is_reported(project: Project, release: Release, stalling_body: str) -> None:
    done = project.setup(release, "--tag", TAG, "--timeout", "3", base_url=stalling_body)
    assert done.returncode == 1
    port = stalling_body.split(":")[2].split("/")[0]
    assert one_error_line(done) == (
        f"server-native setup: error: the download of {_platforms.asset_name(HOST_LABEL or '')} broke off: "
        f"127.0.0.1:{port} took the connection but sent nothing for 1s (the server stalled)"
    )
    assert project.prebuilt_tree() == ["prebuilt", f"prebuilt/{TAG}"]  # the tag folder, empty


def test_setup_help_says_what_proves_a_download(project: Project) -> None:
    done = run_cli("setup", "--help", cwd=project.root, env=project.env())
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert (
        "SHA256SUMS comes from the same server as the archive, so it only catches a damaged download, not a forged one."
        in text
    )
    assert "Any other tag has no such check" in text and "gh attestation verify" in text
    assert "Naming a tag (--tag) for this machine pins it" in text


def test_unknown_platform_and_no_release_location(project: Project, release: Release) -> None:
    done = project.setup(release, "--platform", "linux-riscv64")
    assert done.returncode == 2
    assert "unknown platform 'linux-riscv64'" in one_error_line(done)
    done = run_cli("setup", "--quiet", cwd=project.root, env=project.env())
    if not _prebuilt_release.RELEASES_URL:
        assert done.returncode == 2
        assert "no release location: pass --base-url or set SERVER_NATIVE_RELEASES_URL" in one_error_line(done)


# ---------------------------------------------------------------- what proves a download


def test_own_tag_is_proven_by_the_shipped_hash_and_checked_again_on_load(project: Project, release: Release) -> None:
    assert HOST_LABEL is not None
    ship_hashes(project.package, {HOST_LABEL: sha256(release.host_asset(TAG))})
    done = project.setup(release, quiet=False)
    assert done.returncode == 0, done.stderr
    assert (
        f"verified: {_platforms.asset_name(HOST_LABEL)} has the SHA-256 shipped inside this package for {TAG}"
        in done.stderr
    )
    assert "not verified" not in done.stderr
    library = project.installed()
    info = probe(cwd=project.root, env=project.env())
    assert (info["rung"], info["path"]) == (2, str(library))
    # a library changed after the download is not loaded
    library.write_bytes(library.read_bytes() + b"\0")
    info = probe(cwd=project.root, env=project.env())
    assert info["rung"] == 3
    assert info["tried"][1]["outcome"].startswith("refused: it differs from the library in ")


@pytest.fixture
def gh_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the GitHub CLI, which cannot reach GitHub from here: it
    records its arguments and confirms when ``gh.ok`` exists beside it. Also a
    user cache of the test's own, for the pin."""
    if sys.platform == "win32":
        pytest.skip("a shell script stands in for gh")
    folder = tmp_path / "gh-bin"
    folder.mkdir()
    gh = folder / "gh"
    gh.write_text(
        '#!/bin/sh\necho "$@" > "$0.args"\n'
        'if [ -f "$0.ok" ]; then echo "Verification succeeded!"; exit 0; fi\n'
        'echo "Error: no attestations found for subject" >&2\nexit 1\n'
    )
    gh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return gh


@pytest.mark.parametrize("attested", [True, False])
def test_other_tags_are_checked_with_an_attestation(
    project: Project, release: Release, gh_stand_in: Path, attested: bool
) -> None:
    if attested:
        gh_stand_in.with_name("gh.ok").touch()
    messages: list[str] = []
    installed = prebuilt.setup(
        f"{PREFIX}0.2.0",
        base_url=release.base_url,
        progress=False,
        start=project.root,
        log=messages.append,
        repository="owner/repo",
    )
    arguments = gh_stand_in.with_name("gh.args").read_text().split()
    assert arguments[:2] == ["attestation", "verify"] and arguments[3:] == ["--repo", "owner/repo"]
    assert Path(arguments[2]).name == _platforms.asset_name(HOST_LABEL or "")  # the downloaded archive
    record = json.loads((installed.path.parent / prebuilt.INSTALL_RECORD).read_text())
    if attested:
        assert "verified: its GitHub artifact attestation holds (gh attestation verify --repo owner/repo)" in messages
        assert record["checked_against"] == ["SHA256SUMS", "attestation"]
    else:
        assert (
            "not verified: `gh attestation verify --repo owner/repo` did not confirm it: "
            f"Error: no attestations found for subject. {prebuilt.NOT_PROVEN}."
        ) in messages
        assert record["checked_against"] == ["SHA256SUMS"]
    assert installed.path.read_bytes() == REAL_LIBRARY.read_bytes()  # said, not refused


def test_without_gh_setup_says_nothing_proved_the_download(
    project: Project, release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no gh here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    messages: list[str] = []
    prebuilt.setup(
        f"{PREFIX}0.2.0",
        base_url=release.base_url,
        progress=False,
        start=project.root,
        log=messages.append,
        repository="owner/repo",
    )
    assert (
        "not verified: the GitHub CLI (gh) is not installed to check the release's artifact attestation. "
        f"{prebuilt.NOT_PROVEN}."
    ) in messages


# ---------------------------------------------------------------- release metadata and staging


def test_release_metadata_is_not_stale() -> None:
    """server_native/_dist/release.py matches the version in pyproject.toml
    (after a version bump: python tool/generate_prebuilt_release.py)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tool" / "generate_prebuilt_release.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert _prebuilt_release.TAG == f"{PREFIX}{generator.project_version()}"
    assert _prebuilt_release.VERSION == generator.project_version()


def test_release_metadata_goes_stale_with_the_version(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tool" / "generate_prebuilt_release.py"), "--check", "--version", "9.9.9"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "is stale" in done.stderr and f'+TAG = "{PREFIX}9.9.9"' in done.stderr


def test_release_metadata_from_a_manifest(tmp_path: Path, release: Release) -> None:
    output = tmp_path / "_prebuilt_release.py"
    manifest = release.folder(TAG) / "SHA256SUMS"
    assert generator.main(["--manifest", str(manifest), "--repository", "owner/repo", "--output", str(output)]) == 0
    spec = importlib.util.spec_from_file_location("generated", output)
    assert spec is not None and spec.loader is not None
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    assert generated.TAG == _prebuilt_release.TAG
    assert generated.SHA256[HOST_LABEL] == sha256(release.host_asset(TAG))
    assert generated.RELEASES_URL == "https://github.com/owner/repo/releases"
    assert generated.RELEASES_API_URL == "https://api.github.com/repos/owner/repo/releases"
    # the manifest URL form works too (served here)
    assert (
        generator.main(
            ["--manifest", f"{release.base_url}/download/{TAG}/SHA256SUMS", "--output", str(output), "--check"]
        )
        == 0
    )


def test_staged_archives_hold_one_library_and_are_reproducible(tmp_path: Path) -> None:
    first = stage_tool.stage("windows-arm64", None, REAL_LIBRARY, None, tmp_path / "prebuilt", tmp_path / "dist")
    with tarfile.open(first) as tar:
        (only,) = tar.getmembers()
    assert (only.name, only.isreg(), only.mtime, only.mode) == ("_native.pyd", True, 0, 0o755)
    again = stage_tool.write_archive(
        tmp_path / "prebuilt" / "windows-arm64" / "_native.pyd", "windows-arm64", tmp_path / "again"
    )
    assert sha256(first) == sha256(again)
    manifest = stage_tool.write_manifest(tmp_path / "dist", expect_all=False)
    assert manifest.read_text() == f"{sha256(first)}  server_native-windows-arm64.tar.gz\n"
    with pytest.raises(SystemExit, match="missing archives for: linux-x64"):
        stage_tool.write_manifest(tmp_path / "dist", expect_all=True)
