import os

import server_native


async def app(scope, receive, send):
    """A raw ASGI 3 app; any Starlette, FastAPI, Litestar, Quart or Django
    (ASGI) app is served the same way."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": "echo: " + (message.get("text") or "")})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"hello from {scope['path']}".encode()})


if __name__ == "__main__":
    server_native.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), http3=False)
