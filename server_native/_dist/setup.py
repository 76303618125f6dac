"""``python -m server_native setup`` and ``info``: prebuilt native libraries.

``setup`` downloads ``server_native-<platform>.tar.gz`` of a release tagged
``server-native-prebuilt-v<version>``::

    <base-url>/download/<tag>/server_native-<platform>.tar.gz
    <base-url>/download/<tag>/SHA256SUMS

(GitHub's release download layout), checks it against the release's
``SHA256SUMS`` and, for the package's own tag, against the hash that came inside
the package (``_prebuilt_release.SHA256``), extracts it with a member allow-list
into a temporary folder next to the destination and renames that into place:
``<project root>/.server_native/prebuilt/<tag>/<platform>/`` (``--dest
project``, the default) or the user cache (``--dest user``), where the loader
looks (rung 2). The archive stays beside the library: the loader checks the
library against it and the shipped hash. ``--tag latest`` asks the releases
API (a GitHub-style JSON list of releases) for the newest release whose tag
has the prefix and which has the platform's asset.

Authenticity: ``SHA256SUMS`` comes from the same server as the archive, so
it only catches a damaged download. The hash shipped inside the package
proves the package's own tag; for any other tag, ``setup`` checks a GitHub
artifact attestation with ``gh attestation verify`` when it can, and says so
when it cannot.

Naming a tag (``--tag``) for this machine's platform pins it: the loader uses
that tag's library instead of the package's own until ``setup`` runs again
without ``--tag``. The pin lives in the user cache, out of reach of any
project folder.

The release location comes from ``--base-url``/``--api-url``, else the
``SERVER_NATIVE_RELEASES_URL``/``SERVER_NATIVE_RELEASES_API_URL`` environment
variables, else the package's release metadata. All network waits of one
``setup``, retries included, share one time budget (``--timeout``, 60 s).

``requests`` and ``tqdm`` are imported when a download starts, so the rest of
this module (and ``info``) works without them, and ``import server_native``
never pays for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import platforms as _platforms
from . import release as release_metadata
from .loader import (
    ENV_PREBUILT_TAG,
    cache_dir,
    full_tag,
    pin_file,
    project_cache,
    user_cache,
    version_key,
)
from .release import TAG_PREFIX

ENV_RELEASES_URL = "SERVER_NATIVE_RELEASES_URL"
ENV_RELEASES_API_URL = "SERVER_NATIVE_RELEASES_API_URL"
MANIFEST = release_metadata.MANIFEST
#: Seconds for all the network waits of one setup, retries included.
TIMEOUT = 60.0
ATTEMPTS = 3
CONNECT_TIMEOUT = 10.0
RETRY_STATUSES = (429, 500, 502, 503, 504)
NOT_PROVEN = "SHA256SUMS comes from the same server as the archive: it catches a damaged download, not a forged one"
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
MAX_MEMBERS = 16
INSTALL_RECORD = "server_native-prebuilt.json"
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(\S.*?)\s*$")


class SetupError(Exception):
    """A failure ``setup`` reports in one line (exit code 1)."""

    exit_code = 1


class UsageError(SetupError):
    """A bad argument (exit code 2)."""

    exit_code = 2


@dataclass
class Installed:
    path: Path  # the library file
    tag: str
    platform: str
    sha256: str | None
    downloaded: bool


# ---------------------------------------------------------------- arguments


def normalize_tag(tag: str | None) -> str:
    """``None`` -> the package's tag; ``0.2.0``/``v0.2.0`` -> the full tag;
    ``latest`` and full tags stay as they are."""
    if not tag:
        return release_metadata.TAG
    if tag == "latest":
        return tag
    full = full_tag(tag)
    if full is None:
        raise UsageError(f"unknown tag {tag!r}: give 'latest', a version (0.1.0) or a tag ({TAG_PREFIX}<version>)")
    return full


def default_platform() -> str:
    label = _platforms.host_label()
    if label is None:
        import platform

        raise UsageError(
            f"this machine ({sys.platform}, {platform.machine()}) has no prebuilt label; "
            f"pass --platform (one of: {', '.join(_platforms.LABELS)})"
        )
    if _platforms.is_musl():
        raise UsageError(
            "the prebuilt Linux libraries need glibc and this is a musl system: install the musllinux wheel instead"
        )
    return label


def check_platform(label: str | None) -> str:
    if label is None:
        return default_platform()
    try:
        return _platforms.check_label(label)
    except _platforms.UnknownPlatform as exc:
        raise UsageError(str(exc)) from None


def destination_root(dest: str, start: str | os.PathLike[str] | None = None) -> Path:
    if dest == "project":
        return project_cache(start)
    if dest == "user":
        return user_cache()
    raise UsageError(f"unknown --dest {dest!r} (project or user)")


def release_urls(base_url: str | None, api_url: str | None) -> tuple[str, str]:
    base = base_url or os.environ.get(ENV_RELEASES_URL) or release_metadata.RELEASES_URL
    api = api_url or os.environ.get(ENV_RELEASES_API_URL) or release_metadata.RELEASES_API_URL
    return base.rstrip("/"), api


# ---------------------------------------------------------------- network


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (requests wraps urllib3, which wraps the socket error)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        todo += [arg for arg in current.args if isinstance(arg, BaseException)]
        todo += [
            link
            for link in (getattr(current, "reason", None), current.__cause__, current.__context__)
            if isinstance(link, BaseException)
        ]
    return seen


def _host(url: str) -> str:
    return re.sub(r"^[a-z]+://([^/]+).*$", r"\1", url)


def describe_failure(exc: BaseException, url: str, read_timeout: float) -> tuple[str, bool]:
    """What went wrong reaching ``url``, in words, and whether another try may help."""
    import requests

    host = _host(url)
    causes = _causes(exc)
    if any(isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError" for c in causes):
        reason = next((str(c) for c in causes if isinstance(c, socket.gaierror)), "")
        return f"cannot resolve {host} (DNS{': ' + reason if reason else ''}): no network, or a wrong host name", False
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"{host} refused the connection: nothing listens there (the server is down, or a wrong port)", True
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"connecting to {host} timed out: no answer to the connection (a firewall, or the host is down)", True
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(
        isinstance(c, (TimeoutError, socket.timeout)) for c in causes
    ):
        return f"{host} took the connection but sent nothing for {read_timeout:.0f}s (the server stalled)", True
    return f"the connection to {host} failed: {_reason(exc)}", True


class Network:
    """GETs under one time budget for the whole of a setup, retries included:
    up to :data:`ATTEMPTS` tries, each waiting at most 30% of the budget, with
    short pauses between them; no try starts once the budget is spent."""

    def __init__(self, budget: float = TIMEOUT) -> None:
        import requests

        self.budget = budget
        self.per_try = budget * 0.3
        self.pause = min(1.0, budget / 20)
        self.started = time.monotonic()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"server-native-setup/{release_metadata.VERSION}"

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def get(self, url: str, *, what: str, stream: bool = False) -> Any:
        """The response to GET ``url``; network failures become one-line SetupErrors."""
        import requests

        attempt = 0
        while True:
            attempt += 1
            read = max(min(self.per_try, self.remaining()), 0.1)
            try:
                response = self.session.get(url, timeout=(min(CONNECT_TIMEOUT, read), read), stream=stream)
            except requests.exceptions.RequestException as exc:
                problem, retry = describe_failure(exc, url, read)
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem, retry = f"{_host(url)} answered HTTP {response.status_code}", True
                response.close()
            if not retry or attempt >= ATTEMPTS or self.remaining() <= self.pause:
                tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                raise SetupError(
                    f"cannot get {what} from {url}: {problem} ({tries} in {time.monotonic() - self.started:.0f}s)"
                )
            time.sleep(self.pause)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    match = re.search(r"\[Errno -?\d+\] [^')\]]+|Connection refused|Name or service not known|timed out", text)
    return match.group(0) if match else (text[:160] or type(exc).__name__)


def latest_tag(network: Network, api_url: str, label: str) -> str:
    """The newest non-draft, non-prerelease release whose tag starts with the
    prefix and which has ``label``'s asset."""
    if not api_url:
        raise UsageError(
            f"no releases API to ask for 'latest': pass --api-url or set {ENV_RELEASES_API_URL} "
            "(this build of server_native names no release repository)"
        )
    asset = _platforms.asset_name(label)
    separator = "&" if "?" in api_url else "?"
    response = network.get(f"{api_url}{separator}per_page=100", what="the release list")
    if response.status_code != 200:
        raise SetupError(f"the releases API answered HTTP {response.status_code} ({api_url})")
    try:
        releases = response.json()
    except ValueError:
        raise SetupError(f"the releases API did not answer JSON ({api_url})") from None
    tags = []
    for item in releases if isinstance(releases, list) else []:
        if not isinstance(item, dict) or item.get("draft") or item.get("prerelease"):
            continue
        name = str(item.get("tag_name") or "")
        assets = [a.get("name") for a in item.get("assets") or [] if isinstance(a, dict)]
        if name.startswith(TAG_PREFIX) and asset in assets:
            tags.append(name)
    if not tags:
        raise SetupError(f"no release tagged {TAG_PREFIX}* has {asset} ({api_url})")
    return max(tags, key=version_key)


def parse_manifest(text: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for line in text.splitlines():
        match = _MANIFEST_LINE.match(line.strip())
        if match:
            hashes[match.group(2)] = match.group(1).lower()
    return hashes


def fetch_manifest(network: Network, base_url: str, tag: str) -> dict[str, str]:
    url = f"{base_url}/download/{tag}/{MANIFEST}"
    response = network.get(url, what=f"the {MANIFEST} of {tag}")
    if response.status_code == 404:
        raise SetupError(f"release {tag} not found (no {MANIFEST} at {url})")
    if response.status_code != 200:
        raise SetupError(f"{url}: HTTP {response.status_code}")
    return parse_manifest(response.text)


def download(network: Network, url: str, target: Path, *, tag: str, asset: str, progress: bool) -> str:
    """Stream ``url`` into ``target`` with a progress bar; returns the SHA-256.
    A body that stops coming for a try's share of the budget is a stall."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    response = network.get(url, stream=True, what=asset)
    with response:
        if response.status_code == 404:
            raise SetupError(f"release {tag} has no asset {asset} ({url}: HTTP 404)")
        if response.status_code != 200:
            raise SetupError(f"{url}: HTTP {response.status_code}")
        size = int(response.headers.get("Content-Length") or 0) or None
        if size and size > MAX_ARCHIVE_BYTES:
            raise SetupError(f"{asset} is {size} bytes, more than the {MAX_ARCHIVE_BYTES} a library archive may be")
        digest = hashlib.sha256()
        received = 0
        import requests

        with (
            open(target, "wb") as out,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=asset,
                file=sys.stderr,
                disable=not progress,
                leave=True,
                mininterval=0.25,
            ) as bar,
        ):
            try:
                for chunk in response.iter_content(chunk_size=64 * 1024):
                    received += len(chunk)
                    if received > MAX_ARCHIVE_BYTES:
                        raise SetupError(
                            f"{asset} is larger than the {MAX_ARCHIVE_BYTES} bytes a library archive may be"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            except requests.exceptions.RequestException as exc:
                problem, _retry = describe_failure(exc, url, network.per_try)
                raise SetupError(f"the download of {asset} broke off: {problem}") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- archive


def safe_extract(archive: Path, label: str, into: Path) -> Path:
    """Extract the library of ``label`` from ``archive`` into ``into``.

    Allow-list: every member must be a regular file named exactly as the
    platform's library (an optional leading ``./`` aside): no links, no
    folders, no absolute paths, no ``..``. Anything else refuses the whole
    archive. Returns the library's path."""
    allowed = _platforms.library_name(label)
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise SetupError(f"{archive.name} is not a gzip tar archive: {exc}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SetupError(f"{archive.name} is damaged: {exc}") from None
        if len(members) > MAX_MEMBERS:
            raise SetupError(f"{archive.name} has {len(members)} members; a prebuilt archive holds one library")
        library: Path | None = None
        for member in members:
            name = member.name
            path = PurePosixPath(name)
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
                raise SetupError(f"refusing {archive.name}: member {name!r} has an absolute or Windows path")
            if ".." in path.parts:
                raise SetupError(f"refusing {archive.name}: member {name!r} leaves the folder ('..')")
            if member.issym() or member.islnk():
                raise SetupError(f"refusing {archive.name}: member {name!r} is a link")
            if not member.isreg():
                raise SetupError(f"refusing {archive.name}: member {name!r} is not a regular file")
            if str(path) != allowed or library is not None:
                raise SetupError(f"refusing {archive.name}: unexpected member {name!r} (it may hold only {allowed})")
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - a regular member always has data
                raise SetupError(f"refusing {archive.name}: cannot read {name!r}")
            library = into / allowed
            with source, open(library, "wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(library, 0o755)
        if library is None:
            raise SetupError(f"{archive.name} holds no {allowed}")
    return library


# ---------------------------------------------------------------- authenticity


def check_attestation(archive: Path, repository: str) -> tuple[bool, str]:
    """Verify the GitHub artifact attestation of ``archive`` (``gh attestation
    verify``, which checks its Sigstore signature and that ``repository``'s
    workflow built it). Returns whether it holds and what happened, in words."""
    if not repository:
        return False, "this build of server_native names no GitHub repository to check an attestation against"
    gh = shutil.which("gh")
    if gh is None:
        return False, "the GitHub CLI (gh) is not installed to check the release's artifact attestation"
    command = [gh, "attestation", "verify", str(archive), "--repo", repository]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`gh attestation verify` did not finish: {_reason(exc)}"
    if done.returncode == 0:
        return True, f"its GitHub artifact attestation holds (gh attestation verify --repo {repository})"
    said = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
    return False, f"`gh attestation verify --repo {repository}` did not confirm it: {said}"


# ---------------------------------------------------------------- setup


def make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents writable by their owner only:
    the loader refuses a cache that others can write to."""
    missing = []
    for current in (folder, *folder.parents):
        if current.exists():
            break
        missing.append(current)
    for current in reversed(missing):
        current.mkdir(mode=0o755, exist_ok=True)


def _update_pin(tag: str, label: str, named: bool, log: Any) -> None:
    """Naming a tag for this machine pins it for the loader; ``setup`` without
    one (the package's own tag) takes the pin away."""
    if label != _platforms.host_label():
        return
    pin = pin_file()
    if named and tag != release_metadata.TAG:
        make_folders(pin.parent)
        pin.write_text(tag + "\n", encoding="utf-8")
        log(
            f"pinned {tag}: the loader uses it instead of the package's own {release_metadata.TAG}, "
            f"with a warning (pin: {pin}; `python -m server_native setup` without --tag removes it)"
        )
    elif tag == release_metadata.TAG and pin.is_file():
        old = pin.read_text(encoding="utf-8").strip()
        pin.unlink()
        log(f"removed the pin of {old}: the loader uses the package's own {tag} again")


def setup(
    tag: str | None = None,
    platform: str | None = None,
    dest: str = "project",
    base_url: str | None = None,
    api_url: str | None = None,
    force: bool = False,
    progress: bool = True,
    package_hashes: Mapping[str, str] | None = None,
    start: str | os.PathLike[str] | None = None,
    log: Any = None,
    timeout: float = TIMEOUT,
    repository: str | None = None,
) -> Installed:
    """Download, verify and install a prebuilt library; returns where it went.

    ``package_hashes`` are the hashes that came inside the package for its own
    tag (default: ``_prebuilt_release.SHA256``); ``repository`` the GitHub
    repository whose attestations prove other tags (default: the package's)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    label = check_platform(platform)
    named = bool(tag)
    tag = normalize_tag(tag)
    root = destination_root(dest, start)
    base, api = release_urls(base_url, api_url)
    if not base:
        raise UsageError(
            f"no release location: pass --base-url or set {ENV_RELEASES_URL} "
            "(this build of server_native names no release repository)"
        )
    asset = _platforms.asset_name(label)
    network = Network(timeout)
    if tag == "latest":
        tag = latest_tag(network, api, label)
        log(f"latest release with {asset}: {tag}")
    final = cache_dir(root, tag, label)
    library_name = _platforms.library_name(label)
    if (final / library_name).is_file() and not force:
        log(f"already installed: {final / library_name} (--force downloads it again)")
        _update_pin(tag, label, named, log)
        return Installed(final / library_name, tag, label, None, downloaded=False)

    manifest = fetch_manifest(network, base, tag)
    expected = manifest.get(asset)
    if expected is None:
        raise SetupError(f"release {tag} has no asset {asset} (not in its {MANIFEST})")
    hashes = release_metadata.SHA256 if package_hashes is None else package_hashes
    shipped = hashes.get(label) if tag == release_metadata.TAG else None

    make_folders(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}.tmp-", dir=final.parent))
    try:
        archive = staging / asset
        url = f"{base}/download/{tag}/{asset}"
        log(f"downloading {url}")
        got = download(network, url, archive, tag=tag, asset=asset, progress=progress)
        if got != expected:
            raise SetupError(
                f"checksum mismatch for {asset} of {tag}: {MANIFEST} says {expected}, the download is {got}; nothing installed"
            )
        checked = [MANIFEST]
        if shipped is not None:
            if got != shipped.lower():
                raise SetupError(
                    f"checksum mismatch for {asset} of {tag}: the hash shipped in this package is {shipped}, "
                    f"the download is {got}; nothing installed"
                )
            checked.append("package")
            log(f"verified: {asset} has the SHA-256 shipped inside this package for {tag}")
        else:
            attested, said = check_attestation(
                archive, release_metadata.REPOSITORY if repository is None else repository
            )
            if attested:
                checked.append("attestation")
                log(f"verified: {said}")
            else:
                log(f"not verified: {said}. {NOT_PROVEN}.")
        content = staging / "content"
        content.mkdir()
        safe_extract(archive, label, content)
        os.replace(archive, content / asset)  # the loader checks the library against it
        record = {
            "tag": tag,
            "platform": label,
            "asset": asset,
            "url": url,
            "sha256": got,
            "checked_against": checked,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (content / INSTALL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _move_into_place(content, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _update_pin(tag, label, named, log)
    return Installed(final / library_name, tag, label, got, downloaded=True)


def _move_into_place(content: Path, final: Path) -> None:
    """Rename the finished folder to ``final``; an existing one (``--force``)
    is moved aside first and removed after."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
    try:
        os.rename(content, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- CLI


SETUP_EPILOG = f"""\
Authenticity: {MANIFEST} comes from the same server as the archive, so it
only catches a damaged download, not a forged one. The package's own tag
({release_metadata.TAG}) is checked against the SHA-256 shipped inside the
package, when this build ships one. Any other tag has no such check: setup
verifies its GitHub artifact attestation with `gh attestation verify` when gh
is installed and the package names its repository, and otherwise says that
nothing proved the download.

Naming a tag (--tag) for this machine pins it: the loader then uses that
tag's library instead of the package's own, with a warning, until setup runs
again without --tag. Without a pin or {ENV_PREBUILT_TAG}, the loader uses
only libraries of the package's own tag.
"""


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Download the prebuilt native library of a release into a cache the loader reads."
    parser.epilog = SETUP_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--tag", help=f"release tag, a version, or 'latest' (default: {release_metadata.TAG}); naming one pins it"
    )
    parser.add_argument("--platform", help="platform label (default: this machine's)")
    parser.add_argument(
        "--dest", choices=("project", "user"), default="project", help="project cache (default) or user cache"
    )
    parser.add_argument("--base-url", help=f"release downloads URL (default: ${ENV_RELEASES_URL} or the package's)")
    parser.add_argument(
        "--api-url", help=f"releases API URL for --tag latest (default: ${ENV_RELEASES_API_URL} or the package's)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help=f"seconds for all network waits, retries included (default {TIMEOUT:.0f})",
    )
    parser.add_argument("--force", action="store_true", help="download again even when installed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages but errors")


def run_setup(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("server-native setup: error: --timeout must be more than 0 seconds", file=sys.stderr)
        return 2
    try:
        installed = setup(
            tag=args.tag,
            platform=args.platform,
            dest=args.dest,
            base_url=args.base_url,
            api_url=args.api_url,
            force=args.force,
            progress=not args.quiet,
            log=(lambda message: None) if args.quiet else None,
            timeout=args.timeout,
        )
    except SetupError as exc:
        print(f"server-native setup: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"server-native setup: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("server-native setup: interrupted; nothing installed", file=sys.stderr)
        return 130
    if installed.downloaded:
        print(f"installed {installed.tag} for {installed.platform}: {installed.path}")
    else:
        print(f"{installed.tag} for {installed.platform} is installed: {installed.path}")
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_info(args: argparse.Namespace) -> int:
    from .loader import resolution

    info = resolution(build=False).as_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["loaded"] else 1
    if info["loaded"]:
        rung = f"{info['rung']} ({info['source']})"
        print(f"library:      {info['path']}")
        print(f"rung:         {rung}")
        print(f"ABI version:  {info['abi_version']} (package: {info['package_abi_version']})")
        print(f"version:      {info['version']}")
        print(f"features:     {', '.join(info['features'])}")
    else:
        print("library:      none loaded")
    print(f"platform:     {info['platform'] or '(no prebuilt label)'}")
    print(f"release tag:  {info['tag']}")
    if info["cache_tag"] != info["tag"]:
        print(
            f"cache tag:    {info['cache_tag']} (named by {ENV_PREBUILT_TAG} or a pin; it overrides the package's own)"
        )
    print("tried:")
    for attempt in info["tried"]:
        print(f"  {attempt['rung']}. {attempt['source']}: {attempt['place']}: {attempt['outcome']}")
    if not info["loaded"]:
        print(
            "no native library fits. Fix it with one of:" + info["error"].split("Fix it with one of:", 1)[-1],
            file=sys.stderr,
        )
        return 1
    return 0
