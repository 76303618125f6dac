import os
from pathlib import Path

import server_native


def app(environ, start_response):
    """Everything outside /static reaches the app; files under it never do."""
    body = f"from the app: {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    server_native.run(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8000")),
        http3=False,
        static_files=[("/static", Path(__file__).parent / "public")],
        static_files_expires=3600,
    )
