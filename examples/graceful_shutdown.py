import asyncio
import os

from server_native import HttpRequest, serve_native_http


async def handle(request: HttpRequest) -> None:
    request.response.write("bye")
    await request.response.close()
    if request.uri.path == "/shutdown":
        shutdown.set()  # in real code: your signal handler or lifecycle hook


async def main() -> None:
    global shutdown
    shutdown = asyncio.Event()
    port = int(os.environ.get("PORT", "8080"))
    # Completing shutdown_signal drains in-flight requests, then returns.
    # SIGINT/SIGTERM do the same; a second signal stops at once.
    await serve_native_http(handle, host="127.0.0.1", port=port, shutdown_signal=shutdown.wait())
    print("server stopped", flush=True)


shutdown: asyncio.Event
asyncio.run(main())
