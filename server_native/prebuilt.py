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
looks (rung 2). ``--tag latest`` asks the releases API (a GitHub-style JSON
list of releases) for the newest release whose tag has the prefix and which has
the platform's asset.

The release location comes from ``--base-url``/``--api-url``, else the
``SERVER_NATIVE_RELEASES_URL``/``SERVER_NATIVE_RELEASES_API_URL`` environment
variables, else the package's release metadata.

``requests`` and ``tqdm`` are imported when a download starts, so the rest of
this module (and ``info``) works without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import _platforms
from . import _prebuilt_release as release_metadata
from ._loader import TAG_PREFIX, cache_dir, project_cache, user_cache

ENV_RELEASES_URL = "SERVER_NATIVE_RELEASES_URL"
ENV_RELEASES_API_URL = "SERVER_NATIVE_RELEASES_API_URL"
MANIFEST = release_metadata.MANIFEST
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
RETRIES = 3
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
    if tag == "latest" or tag.startswith(TAG_PREFIX):
        return tag
    if re.fullmatch(r"v?\d+(\.\d+)*\S*", tag):
        return TAG_PREFIX + tag.lstrip("v")
    raise UsageError(f"unknown tag {tag!r}: give 'latest', a version (0.1.0) or a tag ({TAG_PREFIX}<version>)")


def default_platform() -> str:
    label = _platforms.host_label()
    if label is None:
        import platform

        raise UsageError(
            f"this machine ({sys.platform}, {platform.machine()}) has no prebuilt label; "
            f"pass --platform (one of: {', '.join(_platforms.LABELS)})"
        )
    if _platforms.is_musl():
        raise UsageError("the prebuilt Linux libraries need glibc and this is a musl system: install the musllinux wheel instead")
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


def _session() -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=RETRIES,
        connect=RETRIES,
        read=RETRIES,
        status=RETRIES,
        backoff_factor=0.3,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = f"server-native-setup/{release_metadata.VERSION}"
    return session


def _get(session: Any, url: str, *, stream: bool = False, what: str) -> Any:
    """GET with timeouts and retries; network failures become one-line SetupErrors."""
    import requests

    try:
        response = session.get(url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), stream=stream)
    except requests.exceptions.ConnectionError as exc:
        host = re.sub(r"^[a-z]+://([^/]+).*$", r"\1", url)
        raise SetupError(f"cannot reach {host} for {what}: no network, or the server is down ({_reason(exc)})") from None
    except requests.exceptions.Timeout:
        raise SetupError(f"timed out downloading {what} from {url}") from None
    except requests.exceptions.RequestException as exc:
        raise SetupError(f"downloading {what} from {url} failed: {_reason(exc)}") from None
    return response


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    match = re.search(r"\[Errno -?\d+\] [^')\]]+|Connection refused|Name or service not known|timed out", text)
    return match.group(0) if match else (text[:160] or type(exc).__name__)


def _version_key(tag: str) -> tuple[Any, ...]:
    from ._loader import _version_key as key

    return key(tag)


def latest_tag(session: Any, api_url: str, label: str) -> str:
    """The newest non-draft, non-prerelease release whose tag starts with the
    prefix and which has ``label``'s asset."""
    if not api_url:
        raise UsageError(
            f"no releases API to ask for 'latest': pass --api-url or set {ENV_RELEASES_API_URL} "
            "(this build of server_native names no release repository)"
        )
    asset = _platforms.asset_name(label)
    separator = "&" if "?" in api_url else "?"
    response = _get(session, f"{api_url}{separator}per_page=100", what="the release list")
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
    return max(tags, key=_version_key)


def parse_manifest(text: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for line in text.splitlines():
        match = _MANIFEST_LINE.match(line.strip())
        if match:
            hashes[match.group(2)] = match.group(1).lower()
    return hashes


def fetch_manifest(session: Any, base_url: str, tag: str) -> dict[str, str]:
    url = f"{base_url}/download/{tag}/{MANIFEST}"
    response = _get(session, url, what=f"the {MANIFEST} of {tag}")
    if response.status_code == 404:
        raise SetupError(f"release {tag} not found (no {MANIFEST} at {url})")
    if response.status_code != 200:
        raise SetupError(f"{url}: HTTP {response.status_code}")
    return parse_manifest(response.text)


def download(session: Any, url: str, target: Path, *, tag: str, asset: str, progress: bool) -> str:
    """Stream ``url`` into ``target`` with a progress bar; returns the SHA-256."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    response = _get(session, url, stream=True, what=asset)
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

        with open(target, "wb") as out, tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=asset, file=sys.stderr,
            disable=not progress, leave=True, mininterval=0.25,
        ) as bar:
            try:
                for chunk in response.iter_content(chunk_size=64 * 1024):
                    received += len(chunk)
                    if received > MAX_ARCHIVE_BYTES:
                        raise SetupError(f"{asset} is larger than the {MAX_ARCHIVE_BYTES} bytes a library archive may be")
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            except requests.exceptions.RequestException as exc:
                raise SetupError(f"the download of {asset} broke off: {_reason(exc)}") from None
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


# ---------------------------------------------------------------- setup


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
) -> Installed:
    """Download, verify and install a prebuilt library; returns where it went.

    ``package_hashes`` are the hashes that came inside the package for its own
    tag (default: ``_prebuilt_release.SHA256``)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    label = check_platform(platform)
    tag = normalize_tag(tag)
    root = destination_root(dest, start)
    base, api = release_urls(base_url, api_url)
    if not base:
        raise UsageError(
            f"no release location: pass --base-url or set {ENV_RELEASES_URL} "
            "(this build of server_native names no release repository)"
        )
    asset = _platforms.asset_name(label)
    session = _session()
    if tag == "latest":
        tag = latest_tag(session, api, label)
        log(f"latest release with {asset}: {tag}")
    final = cache_dir(root, tag, label)
    library_name = _platforms.library_name(label)
    if (final / library_name).is_file() and not force:
        log(f"already installed: {final / library_name} (--force downloads it again)")
        return Installed(final / library_name, tag, label, None, downloaded=False)

    manifest = fetch_manifest(session, base, tag)
    expected = manifest.get(asset)
    if expected is None:
        raise SetupError(f"release {tag} has no asset {asset} (not in its {MANIFEST})")
    hashes = release_metadata.SHA256 if package_hashes is None else package_hashes
    shipped = hashes.get(label) if tag == release_metadata.TAG else None

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}.tmp-", dir=final.parent))
    try:
        archive = staging / asset
        url = f"{base}/download/{tag}/{asset}"
        log(f"downloading {url}")
        got = download(session, url, archive, tag=tag, asset=asset, progress=progress)
        if got != expected:
            raise SetupError(f"checksum mismatch for {asset} of {tag}: {MANIFEST} says {expected}, the download is {got}; nothing installed")
        if shipped is not None and got != shipped.lower():
            raise SetupError(
                f"checksum mismatch for {asset} of {tag}: the hash shipped in this package is {shipped}, "
                f"the download is {got}; nothing installed"
            )
        content = staging / "content"
        content.mkdir()
        safe_extract(archive, label, content)
        record = {
            "tag": tag,
            "platform": label,
            "asset": asset,
            "url": url,
            "sha256": got,
            "checked_against": [MANIFEST] + (["package"] if shipped else []),
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (content / INSTALL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _move_into_place(content, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tag", help=f"release tag, a version, or 'latest' (default: {release_metadata.TAG})")
    parser.add_argument("--platform", help="platform label (default: this machine's)")
    parser.add_argument("--dest", choices=("project", "user"), default="project", help="project cache (default) or user cache")
    parser.add_argument("--base-url", help=f"release downloads URL (default: ${ENV_RELEASES_URL} or the package's)")
    parser.add_argument("--api-url", help=f"releases API URL for --tag latest (default: ${ENV_RELEASES_API_URL} or the package's)")
    parser.add_argument("--force", action="store_true", help="download again even when installed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages but errors")


def run_setup(args: argparse.Namespace) -> int:
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
    from ._loader import resolution

    info = resolution().as_dict()
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
    print("tried:")
    for attempt in info["tried"]:
        print(f"  {attempt['rung']}. {attempt['source']}: {attempt['place']}: {attempt['outcome']}")
    if not info["loaded"]:
        print("no native library fits. Fix it with one of:" + info["error"].split("Fix it with one of:", 1)[-1], file=sys.stderr)
        return 1
    return 0
