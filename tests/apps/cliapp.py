"""The app the command-line tests serve, copied next to them as a module of
its own (tests/test_cli.py, tests/test_uds.py). Each interface answers with
what the tests check: the worker's pid, the client and scheme the app saw,
the server's address (a Unix socket's path) and the root path;
``/missing`` answers 404 (tests/test_metrics.py); ``/slow``
answers after a second and leaves an ``arrived-*`` file behind; ``/stream``
sends ``?chunks=N`` lines half a second apart; a WebSocket is accepted
and held until the client's next message. For worker recycling
(tests/test_workers.py): ``/allocate?mib=N`` keeps N more MiB,
``/block?seconds=N`` blocks the event loop (and leaves a ``blocking-PID``
file behind); ``/env`` answers the variables the app saw as it was
imported."""

import asyncio
import os
import time

#: Read as the module is imported, as settings modules do (--env-file).
IMPORTED_ENV = f"{os.environ.get('SERVER_NATIVE_GREETING')} {os.environ.get('SERVER_NATIVE_KEPT')}"
#: Memory /allocate keeps.
_held = []


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        return
    if scope["path"] == "/slow":
        # Each arrival leaves a file in the working directory, so a test
        # knows when its requests have reached the app.
        with open(f"arrived-{os.getpid()}-{id(scope)}", "w"):
            pass
        await asyncio.sleep(1)
    if scope["path"] == "/missing":
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"{os.getpid()} has no such page".encode()})
        return
    if scope["path"] in ROUTES:
        body = ROUTES[scope["path"]](scope["query_string"].decode().partition("=")[2]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["path"] == "/stream":
        await stream(send, int(scope["query_string"].decode().removeprefix("chunks=") or "4"))
        return
    client = scope["client"][0] if scope["client"] else None
    body = f"{os.getpid()} {client} {scope['scheme']} {scope['server'][0]} root={scope['root_path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def allocate(mib):
    _held.append(b"\x01" * (int(mib) << 20))  # written, so resident
    return f"{os.getpid()} holds {len(_held)} blocks"


def block(seconds):
    with open(f"blocking-{os.getpid()}", "w"):
        pass
    time.sleep(float(seconds))  # the event loop with it
    return f"{os.getpid()} blocked"


ROUTES = {"/allocate": allocate, "/block": block, "/env": lambda _: IMPORTED_ENV}


async def stream(send, chunks):
    """A long response, like a download or an event stream."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for index in range(chunks):
        if index:
            await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": f"chunk {index}\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"end\n"})


def create_app():
    """For ``--factory``: the app, made on call."""
    return app


def wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"wsgi {environ['PATH_INFO']} {environ['REMOTE_ADDR']!r}".encode()]


def direct(request):
    from server_native import NativeDirectResponse

    return NativeDirectResponse.bytes(200, [("content-type", "text/plain")], f"direct {request.client}")


async def direct_stream(request):
    """A direct handler's streamed response: three words, 0.1 s apart."""
    from server_native import NativeDirectResponse

    async def words():
        for word in ("one", "two", "three"):
            await asyncio.sleep(0.1)
            yield f"{word} ".encode()

    return NativeDirectResponse.stream(200, [("content-type", "text/plain")], body=words())
