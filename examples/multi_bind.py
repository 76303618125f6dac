import asyncio
import os

from server_native import HttpRequest, NativeMultiServer, NativeServerBind, serve_native_multi


async def handle(request: HttpRequest) -> None:
    request.response.write(f"served on port {request.connection_info.local_port}")
    await request.response.close()


async def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    if os.environ.get("MODE") == "explicit":
        # An explicit list of listeners, each with its own address and port.
        binds = [NativeServerBind("127.0.0.1", port), NativeServerBind("127.0.0.1", port + 1)]
        await serve_native_multi(handle, binds=binds, http3=False)
    else:
        # http_multi_server semantics: "localhost" is every loopback interface.
        await NativeMultiServer.bind(handle, "localhost", port, http3=False)


asyncio.run(main())
