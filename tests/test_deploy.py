"""The deployment examples in deploy/, run for real: HAProxy and nginx on the
configurations as shipped (their ``${...}`` filled in with ports and paths
of this run), server_native started by its CLI as the files say, systemd's
socket activation through ``systemd-socket-activate``; the Kubernetes
Deployment is checked for times that agree with the server's shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from apps.harness import TIMEOUT, free_port, wait_for
from conftest import Certificates
from proxies import haproxy, nginx, through, tls_context, tool, wait_listening

from server_native import ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CLIENT = b"GET /client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
WORK = b"GET /work HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@contextlib.contextmanager
def server(
    *options: str, log: Path, wait_port: int | None = None, wait_path: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``server-native serve app:app`` on deploy/app.py, as the examples run it."""
    command = [sys.executable, "-m", "server_native", "serve", "app:app", "--app-dir", str(DEPLOY), *options]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        if wait_port is not None:
            wait_listening(wait_port, process=process)
        if wait_path is not None:
            wait_for(lambda: os.path.exists(wait_path) or process.poll() is not None, what=f"{wait_path}")
        yield process
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def haproxy_config(name: str) -> str:
    """As shipped: HAProxy fills in ``"${VAR}"`` from the environment."""
    return (DEPLOY / "haproxy" / name).read_text()


def nginx_config(name: str, **values: str) -> str:
    """As envsubst fills the template in: the variables named, nginx's own
    ``$host`` and the like left alone."""
    text = (DEPLOY / "nginx" / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    filled = string.Template(body).safe_substitute(values)
    assert "${" not in filled, filled
    return filled


def site_pem(certs: Certificates, directory: Path) -> Path:
    """The certificate chain and key in one file, as HAProxy's ``crt`` wants."""
    pem = directory / "site.pem"
    pem.write_bytes(certs.cert_path.read_bytes() + certs.key_path.read_bytes())
    return pem


def socket_path(tmp_path: Path) -> str:
    return f"/tmp/sn-deploy-{tmp_path.name[-10:]}.sock"


def test_haproxy_terminating_tls_with_the_proxy_protocol(tmp_path: Path, certs: Certificates) -> None:
    app, http, https = free_port(), free_port(), free_port()
    env = {"HTTP_BIND": f"127.0.0.1:{http}", "HTTPS_BIND": f"127.0.0.1:{https}", "TLS_PEM": str(site_pem(certs, tmp_path)),
           "STATS_SOCKET": str(tmp_path / "stats.sock"), "APP1": f"127.0.0.1:{app}", "APP2": f"127.0.0.1:{app}", "APP3": f"127.0.0.1:{app}"}  # fmt: skip
    with (
        server("--port", str(app), "--proxy-protocol", log=tmp_path / "app.log", wait_port=app),
        haproxy(haproxy_config("http.cfg"), tmp_path, [http, https], env),
    ):
        body, own_port = wait_for(
            lambda: _answer(https, CLIENT, tls_context(certs)), what="HAProxy to see the server up"
        )
        assert json.loads(body) == {"client": ["127.0.0.1", own_port], "scheme": "https"}
        body, own_port = through(http, CLIENT)
        assert json.loads(body) == {"client": ["127.0.0.1", own_port], "scheme": "http"}


def _answer(port: int, request: bytes, tls: object = None) -> tuple[str, int] | None:
    """A 200 through the proxy, or None while it has no server up yet."""
    try:
        return through(port, request, tls)  # type: ignore[arg-type]
    except AssertionError:
        return None


def test_haproxy_passing_tls_through_to_a_unix_socket(tmp_path: Path, certs: Certificates) -> None:
    front, path = free_port(), socket_path(tmp_path)
    options = (
        "--uds",
        path,
        "--proxy-protocol",
        "--ssl-certfile",
        str(certs.cert_path),
        "--ssl-keyfile",
        str(certs.key_path),
    )
    with (
        server(*options, log=tmp_path / "app.log", wait_path=path),
        haproxy(haproxy_config("tcp.cfg"), tmp_path, [front], {"TLS_BIND": f"127.0.0.1:{front}", "APP_SOCKET": path}),
    ):
        body, own_port = through(front, CLIENT, tls_context(certs))
        assert json.loads(body) == {"client": ["127.0.0.1", own_port], "scheme": "https"}
    assert "PROXY protocol" not in (tmp_path / "app.log").read_text(), "HAProxy's checks send a header too"


def test_nginx_terminating_tls_to_a_unix_socket(tmp_path: Path, certs: Certificates) -> None:
    front, path = free_port(), socket_path(tmp_path)
    config = nginx_config("http.conf.template", HTTPS_LISTEN=f"127.0.0.1:{front}", TLS_CERT=str(certs.cert_path),
                          TLS_KEY=str(certs.key_path), APP_SOCKET=path)  # fmt: skip
    with (
        server("--uds", path, log=tmp_path / "app.log", wait_path=path),
        nginx(f"events {{}}\nhttp {{\n{config}\n}}\n", tmp_path, [front]),
    ):
        body, _ = through(front, CLIENT, tls_context(certs))
        # X-Forwarded-For names the client (without its port).
        assert json.loads(body) == {"client": ["127.0.0.1", 0], "scheme": "https"}


def test_nginx_stream_passing_tls_through_with_the_proxy_protocol(tmp_path: Path, certs: Certificates) -> None:
    front, app = free_port(), free_port()
    config = nginx_config("stream.conf.template", TLS_LISTEN=f"127.0.0.1:{front}", APP=f"127.0.0.1:{app}")
    options = (
        "--port",
        str(app),
        "--proxy-protocol",
        "--ssl-certfile",
        str(certs.cert_path),
        "--ssl-keyfile",
        str(certs.key_path),
    )
    with (
        server(*options, log=tmp_path / "app.log", wait_port=app),
        nginx(f"events {{}}\n{config}\n", tmp_path, [front]),
    ):
        body, own_port = through(front, CLIENT, tls_context(certs))
        assert json.loads(body) == {"client": ["127.0.0.1", own_port], "scheme": "https"}


# -- systemd ------------------------------------------------------------------


def unit(name: str) -> dict[str, str]:
    """The ``Key=value`` lines of a unit file (the last of each key)."""
    values = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_systemd_socket_activation_and_reload(tmp_path: Path) -> None:
    """The service's ExecStart on the socket unit's socket, handed over as
    systemd does (``systemd-socket-activate``): the CLI finds it without
    --host/--port; ExecReload's SIGHUP replaces the workers on the same
    socket; SIGTERM drains and exits 0."""
    activate = tool("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (.ci/run installs Debian's systemd package)")
    service, socket_unit = unit("server-native.service"), unit("server-native.socket")
    assert socket_unit["ListenStream"] == "127.0.0.1:8000"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    executable, *arguments = shlex.split(service["ExecStart"])
    assert executable.endswith("/server-native") and "--host" not in arguments and "--port" not in arguments
    port = free_port()
    command = [
        activate,
        "-l",
        f"127.0.0.1:{port}",
        sys.executable,
        "-m",
        "server_native",
        *arguments,
        "--app-dir",
        str(DEPLOY),
    ]
    with (tmp_path / "service.log").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, process=process)
        body, own_port = through(port, CLIENT)
        assert json.loads(body) == {"client": ["127.0.0.1", own_port], "scheme": "http"}
        before = {through(port, WORK)[0] for _ in range(20)}
        process.send_signal(signal.SIGHUP)
        after: set[str] = set()
        deadline = time.monotonic() + TIMEOUT
        while len(after - before) < 2 and time.monotonic() < deadline:
            after.add(through(port, WORK)[0])  # never refused: the socket stays
        assert len(after - before) >= 2, (before, after)
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
    log = (tmp_path / "service.log").read_text()
    assert "SIGHUP: starting new workers" in log, log


def test_socket_activation_rejects_a_second_address() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid()); "
         "from server_native.cli.main import main; sys.exit(main(['serve', 'app:app', '--port', '8123']))"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "systemd passed 1 listening socket(s) (LISTEN_FDS)" in result.stderr


# -- Kubernetes ---------------------------------------------------------------


def test_kubernetes_times_agree_with_the_shutdown() -> None:
    """preStop's sleep, then the drain (--shutdown-timeout, the server's
    default), must fit in terminationGracePeriodSeconds with room for the
    exit; the probes use the app's health route on the served port."""
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "deployment.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    arguments = container["command"]
    shutdown_timeout = float(arguments[arguments.index("--shutdown-timeout") + 1])
    assert shutdown_timeout == ServerConfig.shutdown_timeout == 30
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert float(pre_stop[1]) + shutdown_timeout + 5 <= grace, "Kubernetes would kill a draining server"
    port = int(arguments[arguments.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert arguments[1:3] == ["serve", "app:app"]
