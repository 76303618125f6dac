"""The command line's process options, run as real processes: the pid file,
the environment file, a logging configuration file (JSON, YAML, .ini), the
access log's format on every interface and with workers, and the one-line
refusal of every bad value."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apps.harness import free_port, wait_for
from cliserver import ROOT, command, environment, get, serve_once, serving, stop

EXAMPLES = ROOT / "examples"

# ---------------------------------------------------------------- --pid-file


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_pid_file_names_the_server_while_it_runs(app_dir: Path, workers: str) -> None:
    pid_file = app_dir / "run" / "server.pid"
    pid_file.parent.mkdir()
    with serving(app_dir, "cliapp:app", "--workers", workers, "--pid-file", str(pid_file)) as (process, _):
        assert pid_file.read_text() == f"{process.pid}\n"
        stop(process)
    assert process.returncode == 0
    assert not pid_file.exists()


# ---------------------------------------------------------------- --env-file


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_env_file_is_loaded_before_the_app_is_imported(app_dir: Path, workers: str) -> None:
    (app_dir / "app.env").write_text(
        '# settings\nexport SERVER_NATIVE_GREETING="hello world"\nSERVER_NATIVE_KEPT=from-file\n'
    )
    options = ("--env-file", "app.env", "--workers", workers)
    with serving(app_dir, "cliapp:app", *options, env={"SERVER_NATIVE_KEPT": "from-environment"}) as (process, port):
        assert get(port, "/env") == (200, "hello world from-environment")
        stop(process)


def wait_for_answer(port: int, path: str, process: subprocess.Popen[str]) -> tuple[int, str]:
    def answer() -> tuple[int, str] | None:
        assert process.poll() is None, process.communicate(timeout=10)[0]
        try:
            return get(port, path)
        except OSError:
            return None

    return wait_for(answer, 30, f"an answer to {path}")


def test_without_python_dotenv_the_env_file_is_one_line(app_dir: Path) -> None:
    (app_dir / "app.env").write_text("A=1\n")
    result = run_cli_without(app_dir, "dotenv", "serve", "cliapp:app", "--env-file", "app.env")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "server-native: error: --env-file needs python-dotenv (pip install 'server-native[dotenv]')"
    ]


def run_cli_without(app_dir: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where ``module`` cannot be imported."""
    script = f"import sys; sys.modules[{module!r}] = None; from server_native.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=app_dir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------- --log-config

INI_CONFIG = """[loggers]
keys=root,access

[handlers]
keys=file

[formatters]
keys=plain

[logger_root]
handlers=

[logger_access]
qualname=server_native.access
handlers=file
propagate=0
level=INFO

[handler_file]
class=FileHandler
formatter=plain
args=('access.log',)

[formatter_plain]
format=ACCESS %(message)s
"""


def yaml_config() -> str:
    import yaml

    config = json.loads((EXAMPLES / "log_config.json").read_text())
    return str(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("log_config.json", lambda: (EXAMPLES / "log_config.json").read_text()),
        ("log.yaml", yaml_config),
        ("log.ini", lambda: INI_CONFIG),
    ],
    ids=["json", "yaml", "ini"],
)
def test_a_log_config_file_replaces_the_logging_configuration(app_dir: Path, name: str, text: object) -> None:
    assert callable(text)
    (app_dir / name).write_text(text())
    with serving(app_dir, "cliapp:app", "--log-config", name, "--access-log") as (process, port):
        assert get(port, "/configured")[0] == 200
        output = stop(process)
    assert re.search(
        r'^ACCESS 127\.0\.0\.1:\d+ - "GET /configured HTTP/1\.1" 200$', (app_dir / "access.log").read_text(), re.M
    )
    assert "/configured" not in output


def test_log_level_still_applies_over_a_log_config(app_dir: Path) -> None:
    shutil.copy(EXAMPLES / "log_config.json", app_dir / "log_config.json")
    with serving(
        app_dir, "cliapp:app", "--log-config", "log_config.json", "--access-log", "--log-level", "warning"
    ) as (process, port):
        assert get(port, "/quiet")[0] == 200
        stop(process)
    assert "/quiet" not in (app_dir / "access.log").read_text()


def test_a_broken_log_config_is_one_line(app_dir: Path) -> None:
    (app_dir / "log.json").write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    result = serve_once(app_dir, "--log-config", "log.json")
    assert result.returncode == 2
    assert error_line(result).startswith("error: --log-config log.json: ValueError: Unable to configure handler 'h'")


def test_a_yaml_log_config_without_pyyaml_is_one_line(app_dir: Path) -> None:
    (app_dir / "log.yaml").write_text("version: 1\n")
    result = run_cli_without(app_dir, "yaml", "serve", "cliapp:app", "--log-config", "log.yaml")
    assert result.returncode == 2
    assert (
        error_line(result)
        == "error: --log-config log.yaml: a YAML logging configuration needs PyYAML (pip install pyyaml)"
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line of stderr, without the program's name (``server-native``
    or ``server-native serve``, as argparse says it)."""
    program, colon, rest = result.stderr.splitlines()[-1].partition(": ")
    assert program in ("server-native", "server-native serve") and colon, result.stderr
    return rest


# ---------------------------------------------------------------- --access-log-format

FORMAT = '%(h)s "%(r)s" %(s)s %(B)s %(D)s %(H)s %(m)s %(U)s %(q)s %(p)s "%(a)s" %({x-trace}i)s'
LINE = re.compile(
    r'^INFO server_native\.access: 127\.0\.0\.1 "GET /slow\?x=1 HTTP/1\.1" 200 (\d+) (\d+) HTTP/1\.1 GET /slow x=1 <(\d+)> "probe/1" t-42$',
    re.M,
)


@pytest.mark.parametrize(
    "app",
    [("cliapp:app",), ("cliapp:wsgi",), ("cliapp:direct", "--interface", "direct")],
    ids=["asgi", "wsgi", "direct"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_access_log_format_on_every_interface(app_dir: Path, app: tuple[str, ...], workers: str) -> None:
    with serving(app_dir, *app, "--access-log-format", FORMAT, "--workers", workers) as (process, port):
        status, body = get(port, "/slow?x=1", {"User-Agent": "probe/1", "X-Trace": "t-42"})
        assert status == 200
        output = stop(process)
    match = LINE.search(output)
    assert match, output
    sent, microseconds, pid = (int(group) for group in match.groups())
    assert sent == len(body.encode())
    assert pid != process.pid if workers == "2" else pid == process.pid
    if app == ("cliapp:app",):
        assert microseconds >= 1_000_000  # /slow sleeps for a second


def test_a_streamed_response_is_logged_once_it_has_gone(app_dir: Path) -> None:
    """A direct handler's stream: bytes and duration cover the whole body."""
    with serving(
        app_dir, "cliapp:direct_stream", "--interface", "direct", "--access-log-format", "%(r)s %(s)s %(B)s %(D)s"
    ) as (process, port):
        status, body = get(port, "/streamed")
        output = stop(process)
    assert (status, body) == (200, "one two three ")
    match = re.search(r"GET /streamed HTTP/1\.1 200 (\d+) (\d+)$", output, re.M)
    assert match, output
    assert int(match.group(1)) == len(body)
    assert int(match.group(2)) >= 300_000  # three chunks 0.1 s apart, and a pause


RUN_SCRIPT = """
import sys

import server_native
import cliapp

port = int(sys.argv[1])
server_native.run(
    cliapp.direct, port=port, interface="direct", native_direct=True, http3=False,
    access_log=True, access_log_format="%(h)s %(r)s %(s)s %(B)s %(L)s",
)
"""


def test_the_access_log_format_with_native_direct_through_run(app_dir: Path) -> None:
    (app_dir / "runit.py").write_text(RUN_SCRIPT)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "runit.py", str(port)], cwd=app_dir, env=environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        status, body = wait_for_answer(port, "/native?y=2", process)
    finally:
        output = stop(process)
    assert status == 200
    assert re.search(
        rf"^INFO server_native\.access: 127\.0\.0\.1 GET /native\?y=2 HTTP/1\.1 200 {len(body)} \d+\.\d{{6}}$",
        output,
        re.M,
    ), output


def test_no_access_log_wins_over_a_format(app_dir: Path) -> None:
    with serving(app_dir, "cliapp:app", "--access-log-format", "%(r)s", "--no-access-log") as (process, port):
        assert get(port, "/unlogged")[0] == 200
        output = stop(process)
    assert "/unlogged" not in output


# ---------------------------------------------------------------- --help and bad values

NEW_OPTIONS = (
    "--limit-max-requests", "--limit-max-requests-jitter", "--workers-lifetime", "--workers-max-rss",
    "--timeout-worker-healthcheck", "--pid-file", "--env-file", "--log-config", "--access-log-format",
)  # fmt: skip


def test_serve_help_lists_every_process_option() -> None:
    result = subprocess.run(command("serve", "--help"), env=environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in NEW_OPTIONS:
        assert option in result.stdout
    assert "--supervisor-fd" not in result.stdout


def test_the_readme_lists_every_process_option() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in NEW_OPTIONS:
        assert f"`{option}" in readme, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--limit-max-requests", "0"), "argument --limit-max-requests: must be at least 1, not 0"),
        (("--limit-max-requests", "many"), "argument --limit-max-requests: not a whole number: 'many'"),
        (
            ("--limit-max-requests-jitter", "-1", "--limit-max-requests", "5"),
            "argument --limit-max-requests-jitter: must be at least 0, not -1",
        ),
        (("--limit-max-requests-jitter", "5"), "--limit-max-requests-jitter needs --limit-max-requests"),
        (("--workers-lifetime", "0"), "argument --workers-lifetime: must be more than 0"),
        (("--workers-lifetime", "nan"), "argument --workers-lifetime: must be at least 0, not nan"),
        (("--workers-max-rss", "0"), "argument --workers-max-rss: must be at least 1, not 0"),
        (("--timeout-worker-healthcheck", "-2"), "argument --timeout-worker-healthcheck: must be at least 0, not -2"),
        (("--pid-file", ""), "--pid-file needs a path"),
        (("--pid-file", "no-such-dir/server.pid"), "--pid-file no-such-dir/server.pid: No such file or directory"),
        (("--env-file", "missing.env"), "argument --env-file: no such file: 'missing.env'"),
        (("--log-config", "missing.json"), "argument --log-config: no such file: 'missing.json'"),
        (
            ("--access-log-format", "%(nope)s"),
            "argument --access-log-format: unknown access log atom %(nope)s: the atoms are h, l, u, t, r, m, U, q, H, s, B, b, f, a, T, M, D, L, p and {name}i",
        ),
        (
            ("--access-log-format", "%(h)s %(s"),
            "argument --access-log-format: not an access log format (incomplete format key): '%(h)s %(s'",
        ),
        (
            ("--access-log-format", "%(h)d"),
            "argument --access-log-format: not an access log format (%d format: a real number is required, not str): '%(h)d'",
        ),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else "",
)
def test_a_bad_value_is_one_line(app_dir: Path, args: tuple[str, ...], message: str) -> None:
    result = serve_once(app_dir, *args)
    assert result.returncode == 2
    assert error_line(result) == f"error: {message}"
