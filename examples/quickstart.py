import asyncio
import os
from http import HTTPStatus

from server_native import ContentType, NativeHttpServer


async def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = await NativeHttpServer.bind("127.0.0.1", port, http3=False)
    print(f"Serving on http://127.0.0.1:{server.port}", flush=True)

    async for request in server:
        if request.uri.path == "/health":
            request.response.status_code = HTTPStatus.OK
            request.response.headers.content_type = ContentType.json
            request.response.write('{"ok":true}')
            await request.response.close()
            continue

        request.response.status_code = HTTPStatus.NOT_FOUND
        request.response.headers.content_type = ContentType.text
        request.response.write("Not Found")
        await request.response.close()


asyncio.run(main())
