"""``server_native.run(app, ...)``: serve any ASGI, WSGI or direct-handler
app from code, blocking until a shutdown signal; and the ``module:app``
loading the CLI uses."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["detect_interface", "load_app", "run", "serve_app"]

INTERFACES = ("auto", "asgi", "wsgi", "direct")


class AppLoadError(Exception):
    """The ``module:attribute`` path does not lead to an app."""


def load_app(path: str, *, factory: bool = False) -> Any:
    """Imports ``module:attribute`` (attribute may be dotted); with
    ``factory`` calls it to get the app."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise AppLoadError(f"app must be given as 'module:attribute', not {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise
        raise AppLoadError(f"cannot import module {module_name!r}: {exc}") from exc
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if factory:
        app = app()
    if not callable(app):
        raise AppLoadError(f"{path} is not callable")
    return app


def detect_interface(app: Any) -> str:
    """ASGI for a coroutine function (or an object with one as ``__call__``)
    of three arguments, WSGI for a plain callable of two."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", app)  # noqa: B004 - the method, for its signature
    if inspect.iscoroutinefunction(call):
        return "asgi"
    try:
        parameters = [
            p
            for p in inspect.signature(app).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return "asgi"
    return "wsgi" if len(parameters) == 2 else "asgi"


async def serve_app(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    interface: str = "auto",
    shutdown_signal: Awaitable[Any] | None = None,
    **options: Any,
) -> None:
    """Serves ``app`` with the adapter its interface needs."""
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
    if interface == "auto":
        interface = detect_interface(app)
    if interface == "asgi":
        from ..interfaces.asgi import serve_asgi

        await serve_asgi(app, host, port, shutdown_signal=shutdown_signal, **options)
    elif interface == "wsgi":
        from ..interfaces.wsgi import serve_wsgi

        await serve_wsgi(app, host, port, shutdown_signal=shutdown_signal, **options)
    else:
        from ..interfaces.direct import serve_native_direct

        await serve_native_direct(app, host, port, shutdown_signal=shutdown_signal, **options)


def run(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str | None = "info",
    access_log_format: str | None = None,
    **options: Any,
) -> None:
    """Blocking: serves ``app`` until SIGINT/SIGTERM, on uvloop when it is
    installed. ``log_level`` gives the server's own loggers (``server_native``,
    ``server_native.access``) handlers at that level, leaving the root logger
    alone; None leaves logging as it is. ``access_log_format``: the access
    log's line, with gunicorn's atoms (``"%(h)s %(r)s %(s)s %(b)s %(D)s"``;
    see ``server_native.runtime.logs.ACCESS_LOG_ATOMS``). ``options``: ``interface``,
    those of :func:`serve_app`'s adapters (``access_log``...), and any
    ``ServerConfig`` field."""
    from ..runtime.logs import configure_logging, set_access_log_format

    if log_level is not None:
        configure_logging(log_level)
    set_access_log_format(access_log_format)
    main = serve_app(app, host, port, **options)
    runner: Callable[[Any], Any] = asyncio.run
    if sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner = uvloop.run
    runner(main)
