import os

import server_native


def app(environ, start_response):
    """A plain WSGI app; Flask and Django (WSGI) apps are served the same way."""
    body = f"hello from {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    server_native.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), http3=False, threads=4)
