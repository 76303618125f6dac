import asyncio
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server_native import NativeHttpServer
from server_native.runtime.prometheus import FiguresCollector


async def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = await NativeHttpServer.bind("127.0.0.1", port, http3=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(server.metrics))
    print(f"Serving on http://127.0.0.1:{server.port} (metrics at /metrics)", flush=True)

    async for request in server:
        if request.uri.path == "/metrics":
            request.response.headers.set("content-type", CONTENT_TYPE_LATEST)
            request.response.write(generate_latest(registry))
        else:
            answered = sum(server.metrics()["requests"].values())
            request.response.write(f"requests answered before this one: {answered}")
        await request.response.close()


asyncio.run(main())
