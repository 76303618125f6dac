import asyncio
import os

from server_native import NativeHttpServer


async def main() -> None:
    # HTTP/3 needs TLS. The same certificate serves TCP (HTTP/1.1, HTTP/2)
    # and QUIC (HTTP/3), on the same port number: TCP 8443 and UDP 8443.
    server = await NativeHttpServer.bind_secure(
        "localhost",  # 127.0.0.1 and ::1, each over TCP and UDP
        int(os.environ.get("PORT", "8443")),
        certificate_path=os.environ.get("CERT", "server.pem"),
        key_path=os.environ.get("KEY", "server.key"),
        http3=True,  # the default with TLS; http3=False serves TCP only
        alt_svc_max_age=86400,  # how long browsers remember the Alt-Svc advertisement
    )
    print(f"Serving on https://localhost:{server.port} over HTTP/1.1, HTTP/2 and HTTP/3", flush=True)

    async for request in server:
        # Over TCP every response also carries: Alt-Svc: h3=":8443"; ma=86400
        request.response.write(f"hello over HTTP/{request.protocol_version}\n")
        await request.response.close()


asyncio.run(main())
