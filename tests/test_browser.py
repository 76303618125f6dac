"""HTTP/3 as a browser finds it: headless Chromium, driven over the DevTools
protocol (its JSON messages on a websocket), loads a page from a real server
over TCP, reads the ``Alt-Svc`` header and sends its later requests over QUIC.

Chromium uses QUIC only with a certificate that chains to a root built into
the browser, or for a host allow-listed with ``--origin-to-force-quic-on``;
otherwise it goes on over HTTP/2 without a word. So the browser gets the
README's flags: the trustme certificate's key hash in
``--ignore-certificate-errors-spki-list`` (``--ignore-certificate-errors``
does not reach the QUIC handshake) and the host allow-listed on port 1, where
nothing listens, which leaves the move to the server's port to ``Alt-Svc``.
Every wait is bounded; Chromium's processes are killed after each test."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BackgroundLoop, Certificates, RunningServer, requires_ipv6
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import ClientConnection, connect

from server_native import NativeHttpServer

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (bash .ci/run installs Debian's chromium package)"
)

#: Bounds on Chromium's start and on everything a test asks of the browser
#: (with the websocket's 10 s to open and 10 s to close: well within pytest's 120 s).
STARTUP = 20.0
BUDGET = 40.0
#: What Chromium writes in DevToolsActivePort: its port, then the browser's path.
ACTIVE_PORT = re.compile(r"(?P<port>\d+)\n(?P<path>/devtools/browser/[0-9a-f-]{36})\b")
#: Reloads allowed for the move to HTTP/3 (the first one makes it here).
RELOADS = 3
MIB = 1024 * 1024
DOWNLOAD = bytes(range(256)) * (MIB // 256)
#: The upload the page builds: byte i is i % 251.
UPLOAD = bytes(i % 251 for i in range(MIB))
PAGE = "<!doctype html><title>HTTP/3</title><p>hello</p>"

#: The page fetches /download and answers [status, byte count, SHA-256 hex].
DOWNLOAD_SCRIPT = """
(async () => {
  const response = await fetch("/download", {cache: "no-store"});
  const body = await response.arrayBuffer();
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", body));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  return [response.status, body.byteLength, hex];
})()
"""
#: The page posts UPLOAD to /upload and answers [status, response text].
UPLOAD_SCRIPT = """
(async () => {
  const body = new Uint8Array(1024 * 1024).map((_, i) => i % 251);
  const response = await fetch("/upload", {method: "POST", body});
  return [response.status, await response.text()];
})()
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spki_sha256(certificate_path: Path) -> str:
    """What ``--ignore-certificate-errors-spki-list`` takes: the base64
    SHA-256 of the certificate's SubjectPublicKeyInfo (RFC 7469)."""
    leaf = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    key = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(key).digest()).decode()


class DevTools:
    """One page of a Chromium over the DevTools protocol. Commands and their
    answers are matched by id; events are kept until a caller takes them.
    Every receive ends by the session's deadline."""

    def __init__(self, websocket: ClientConnection, deadline: float) -> None:
        self._websocket = websocket
        self._deadline = deadline
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _receive(self, waiting_for: str) -> dict[str, Any]:
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return json.loads(self._websocket.recv(timeout=remaining))  # type: ignore[no-any-return]
        except TimeoutError:
            raise AssertionError(f"Chromium: no {waiting_for} within the {BUDGET:.0f}s budget") from None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self._websocket.send(json.dumps(message))
        while True:
            reply = self._receive(f"answer to {method}")
            if reply.get("id") == ident:
                if "error" in reply:
                    raise AssertionError(f"Chromium refused {method}: {reply['error']}")
                return reply["result"]  # type: ignore[no-any-return]
            if "method" in reply:
                self._events.append(reply)

    def take(self, what: str, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (kept or still to come) that ``matches``, removed."""
        for index, event in enumerate(self._events):
            if matches(event):
                return self._events.pop(index)
        while True:
            event = self._receive(what)
            if matches(event):
                return event
            if "method" in event:
                self._events.append(event)

    def load(self, method: str, **params: Any) -> dict[str, Any]:
        """Runs a Page navigation command; answers the document's response
        (as Network.responseReceived gives it) once the page has loaded."""
        self.call(method, **params)
        outcome = self.take(
            "document response",
            lambda event: (
                event.get("method") in ("Network.responseReceived", "Network.loadingFailed")
                and event["params"].get("type") == "Document"
            ),
        )
        if outcome["method"] == "Network.loadingFailed":
            raise AssertionError(f"Chromium could not load the page: {outcome['params']['errorText']}")
        self.take("load event", lambda event: event.get("method") == "Page.loadEventFired")
        return outcome["params"]["response"]  # type: ignore[no-any-return]

    def response_for(self, url: str) -> dict[str, Any]:
        event = self.take(
            f"response for {url}",
            lambda event: (
                event.get("method") == "Network.responseReceived" and event["params"]["response"]["url"] == url
            ),
        )
        return event["params"]["response"]  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"]["value"]


def wait_for_devtools(process: subprocess.Popen[bytes], profile: Path, stderr: Path) -> str:
    """The browser's DevTools websocket URL, from the DevToolsActivePort file
    Chromium writes in its profile (port, then path) once it listens."""
    active_port = profile / "DevToolsActivePort"
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Chromium exited with {process.returncode}: {stderr.read_text()[-2000:]}")
        # Read until both lines are whole: the file is not written atomically.
        found = ACTIVE_PORT.match(active_port.read_text()) if active_port.exists() else None
        if found:
            return f"ws://127.0.0.1:{found['port']}{found['path']}"
        time.sleep(0.05)
    raise AssertionError(f"Chromium did not open DevTools within {STARTUP:.0f}s: {stderr.read_text()[-2000:]}")


def chromium_command(profile: Path, certs: Certificates, host: str) -> list[str]:
    assert CHROMIUM is not None
    return [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",  # Chromium's sandbox refuses to run as root (CI containers)
        f"--user-data-dir={profile}",  # also what lets the SPKI list take effect
        "--remote-debugging-port=0",
        "--no-first-run",
        "--disable-background-networking",
        f"--ignore-certificate-errors-spki-list={spki_sha256(certs.cert_path)}",
        f"--origin-to-force-quic-on={host}:1",
        "about:blank",
    ]


@pytest.fixture(
    params=[
        # The README's recipe: "localhost" binds 127.0.0.1 and ::1; Chromium
        # opening https://localhost tries QUIC on ::1 only.
        pytest.param("localhost", marks=requires_ipv6),
        pytest.param("127.0.0.1"),
    ]
)
def host(request: pytest.FixtureRequest) -> str:
    """The address the server binds and the browser opens."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def page(tmp_path: Path, certs: Certificates, host: str) -> Iterator[DevTools]:
    """A blank page in a headless Chromium that accepts the test certificate
    and may use QUIC for ``host``, with its Network and Page events on."""
    profile = tmp_path / "profile"
    stderr = tmp_path / "chromium.log"
    with contextlib.ExitStack() as stack:
        with stderr.open("wb") as log:
            process = subprocess.Popen(
                chromium_command(profile, certs, host),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                # Chromium's own temporary files go with the test's directory.
                env={**os.environ, "TMPDIR": str(tmp_path)},
                # Its renderer and helper processes share the browser's group.
                start_new_session=True,
            )
        stack.callback(kill_group, process)
        url = wait_for_devtools(process, profile, stderr)
        websocket = stack.enter_context(connect(url, open_timeout=10, max_size=None))
        devtools = DevTools(websocket, time.monotonic() + BUDGET)
        target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
        devtools.session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        devtools.call("Network.enable")
        devtools.call("Page.enable")
        yield devtools


def kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


async def answer(request: Any) -> None:
    """``/download``: 1 MiB; ``/upload``: the SHA-256 of the body; anything
    else: a small page. Every answer says which HTTP version carried it."""
    path = request.uri.path
    request.response.headers.set("x-protocol", request.protocol_version)
    if path == "/download":
        request.response.headers.set("content-type", "application/octet-stream")
        request.response.add(DOWNLOAD)
    elif path == "/upload":
        request.response.write(sha256(await request.read()))
    else:
        request.response.headers.set("content-type", "text/html")
        request.response.write(PAGE)


@pytest.fixture
def server(loop_thread: BackgroundLoop, certs: Certificates, host: str) -> Iterator[RunningServer]:
    """A TLS server on ``host`` with HTTP/3 on, answering with ``answer``."""

    async def bind() -> NativeHttpServer:
        server = await NativeHttpServer.bind_secure(
            host, 0, certificate_path=certs.cert_path, key_path=certs.key_path, http3=True
        )
        server.serve(answer)
        return server

    running = RunningServer(loop_thread.run(bind()), loop_thread)
    yield running
    running.close(force=True)


def header(response: dict[str, Any], name: str) -> str | None:
    return next((value for key, value in response["headers"].items() if key.lower() == name), None)


def test_chromium_moves_to_http3_through_alt_svc(page: DevTools, server: RunningServer, host: str) -> None:
    origin = f"https://{host}:{server.port}"
    first = page.load("Page.navigate", url=origin + "/")
    assert (first["protocol"], header(first, "x-protocol")) == ("h2", "2")
    assert header(first, "alt-svc") == f'h3=":{server.port}"; ma=86400'

    protocols = []
    for _ in range(RELOADS):
        later = page.load("Page.reload", ignoreCache=True)
        protocols.append((later["protocol"], header(later, "x-protocol")))
        if later["protocol"] == "h3":
            break
    assert protocols[-1] == ("h3", "3"), f"reloads went over {protocols}, never HTTP/3"

    assert page.evaluate(DOWNLOAD_SCRIPT) == [200, MIB, sha256(DOWNLOAD)]
    download = page.response_for(origin + "/download")
    assert (download["protocol"], header(download, "x-protocol")) == ("h3", "3")

    assert page.evaluate(UPLOAD_SCRIPT) == [200, sha256(UPLOAD)]
    upload = page.response_for(origin + "/upload")
    assert (upload["protocol"], header(upload, "x-protocol")) == ("h3", "3")
