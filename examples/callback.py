import asyncio
import os

from server_native import ContentType, HttpRequest, serve_native_http


async def handle(request: HttpRequest) -> None:
    request.response.headers.content_type = ContentType.text
    request.response.write(f"hello from {request.uri.path}")
    await request.response.close()


port = int(os.environ.get("PORT", "8080"))
asyncio.run(serve_native_http(handle, host="127.0.0.1", port=port, http3=False))
