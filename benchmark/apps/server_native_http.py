"""HttpServer-style hello on server_native: every request is answered by Python."""

from __future__ import annotations

from _runner import run
from server_native import NativeHttpServer


async def serve(port: int) -> None:
    server = await NativeHttpServer.bind("127.0.0.1", port, http3=False)
    async for request in server:
        request.response.write("Hello, World!")
        await request.response.close()


if __name__ == "__main__":
    run(serve)
