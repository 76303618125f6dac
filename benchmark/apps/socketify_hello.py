"""socketify (uWebSockets under Python) with its own API: the rival of the direct API.

Sync handlers, as `native_direct_sync` has: `GET /` and `GET /10k` answer with
`res.send(...)` (status, content type and body in one native call); `POST /echo` gathers
the body with `res.on_data` callbacks, then sends it back (socketify's `await
res.get_data()` runs through asyncio and an idle-relaxation loop: 2.8k req/s here).
HTTP/1.1 only: uWebSockets has no HTTP/2."""

from __future__ import annotations

import argparse
from typing import Any

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH
from socketify import App

TEXT = b"text/plain"


def hello(res: Any, req: Any) -> None:
    res.send(HELLO, content_type=TEXT)


def ten_k(res: Any, req: Any) -> None:
    res.send(TEN_K, content_type=TEXT)


#: Responses whose body is still arriving, and the chunks so far. socketify keeps no
#: reference to a response while it waits for its body: without this one, it calls the
#: data handler of a collected response (a fatal error in cffi's from_handle).
READING: dict[Any, list[bytes]] = {}


def echo(res: Any, req: Any) -> None:
    READING[res] = []
    res.on_aborted(forget)
    res.on_data(on_data)


def on_data(res: Any, chunk: bytes | None, is_end: bool) -> None:
    chunks = READING[res]
    if chunk:
        chunks.append(chunk)
    if is_end:
        del READING[res]
        res.send(b"".join(chunks), content_type=TEXT)


def forget(res: Any) -> None:
    READING.pop(res, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    app = App()
    app.get("/", hello)
    app.get(TEN_K_PATH, ten_k)
    app.post(ECHO_PATH, echo)
    app.listen({"port": options.port, "host": "127.0.0.1"})
    app.run()


if __name__ == "__main__":
    main()
