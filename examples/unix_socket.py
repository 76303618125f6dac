import os

import server_native


async def app(scope, receive, send):
    """Behind nginx (``proxy_pass http://unix:/run/app/app.sock;``). Over a
    Unix socket the client has no address: ``scope["client"]`` is None, and
    ``scope["server"]`` is ``(path, None)``."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"hello over {scope['server'][0]}".encode()})


if __name__ == "__main__":
    server_native.run(app, uds=os.environ.get("UDS", "/tmp/server-native.sock"), uds_mode=0o660, lifespan="off")
