import asyncio
import os

from server_native import NativeHttpServer


async def main() -> None:
    server = await NativeHttpServer.bind_secure(
        "127.0.0.1",
        int(os.environ.get("PORT", "8443")),
        certificate_path=os.environ.get("CERT", "cert.pem"),
        key_path=os.environ.get("KEY", "key.pem"),
        http2=True,
        http3=True,
    )
    print(f"Serving on https://127.0.0.1:{server.port}", flush=True)

    async for request in server:
        request.response.write(f"secure ok over HTTP/{request.protocol_version}")
        await request.response.close()


asyncio.run(main())
