import asyncio
import os

from server_native import ContentType, NativeHttpServer


async def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    # "localhost" binds 127.0.0.1 and ::1 (when available) on one port.
    # Equivalent: NativeHttpServer.bind("any", port) for every interface,
    # or NativeHttpServer.loopback(port).
    server = await NativeHttpServer.bind("localhost", port, http3=False)
    print(f"Serving on {server.addresses}", flush=True)

    async for request in server:
        request.response.headers.content_type = ContentType.text
        request.response.write("localhost multi-server ok")
        await request.response.close()


asyncio.run(main())
