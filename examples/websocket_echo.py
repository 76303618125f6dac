import asyncio
import os

from server_native import NativeHttpServer, is_upgrade_request, upgrade_websocket


async def main() -> None:
    server = await NativeHttpServer.bind("127.0.0.1", int(os.environ.get("PORT", "8080")), http3=False)
    async for request in server:
        if is_upgrade_request(request):
            asyncio.create_task(echo(request))
        else:
            request.response.write("connect with a WebSocket client")
            await request.response.close()


async def echo(request) -> None:
    socket = await upgrade_websocket(request)
    async for message in socket:
        await socket.send(message)


asyncio.run(main())
