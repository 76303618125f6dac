"""The app the deployment examples serve (``server-native serve app:app``):
``/health`` for a proxy's checks and Kubernetes' probes, ``/client`` the
client and scheme the app sees (JSON), ``/work`` a request that takes 20 to
50 ms, answered with the worker's pid. Replace it with yours."""

import asyncio
import json
import os
import random


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/work":
        await asyncio.sleep(random.uniform(0.02, 0.05))
        body = str(os.getpid()).encode()
    elif scope["path"] == "/client":
        body = json.dumps({"client": scope["client"], "scheme": scope["scheme"]}).encode()
    else:
        body = b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
