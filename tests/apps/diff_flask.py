"""The Flask app of the differential test: the same routes as
``diff_starlette``, deterministic answers only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, redirect, request

LARGE = bytes(range(256)) * 4096  # 1 MiB

app = Flask(__name__)


@app.get("/")
def home() -> Response:
    return Response("hello", mimetype="text/plain")


@app.get("/json")
def json_view() -> Any:
    return jsonify(a=1, b=[1, 2, 3], unicode="é✓")


@app.get("/items/<int:item_id>")
def item(item_id: int) -> Any:
    return jsonify(id=item_id, query=list(request.args.items(multi=True)))


@app.route("/echo", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def echo() -> Any:
    body = request.get_data()
    return jsonify(
        method=request.method,
        path=request.path,
        query=request.query_string.decode("latin-1"),
        body_length=len(body),
        body_head=body[:64].decode("latin-1"),
        content_type=request.headers.get("content-type"),
        x_custom=request.headers.getlist("x-custom"),
        cookie=request.headers.get("cookie"),
    )


@app.get("/headers")
def headers() -> Response:
    response = Response("headers", mimetype="text/plain")
    response.headers["x-one"] = "1"
    response.headers.add("x-multi", "a")
    response.headers.add("x-multi", "b")
    response.headers["cache-control"] = "no-store"
    return response


@app.get("/status/<int:code>")
def status(code: int) -> Response:
    if code in (204, 304):
        return Response(status=code)
    return Response(f"status {code}", status=code, mimetype="text/plain")


@app.get("/redirect")
def go() -> Response:
    return redirect("/", 302)


@app.get("/set-cookies")
def set_cookies() -> Response:
    response = Response("cookies", mimetype="text/plain")
    response.set_cookie("a", "1")
    response.set_cookie("b", "two words", httponly=True)
    return response


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Iterator[bytes]:
        for index in range(10):
            yield f"chunk {index}\n".encode()

    return Response(chunks(), mimetype="text/plain")


@app.get("/large")
def large() -> Response:
    return Response(LARGE, mimetype="application/octet-stream")


@app.get("/binary")
def binary() -> Response:
    return Response(bytes(range(256)), mimetype="application/octet-stream")


@app.get("/empty")
def empty() -> Response:
    return Response(b"", mimetype="text/plain")


@app.get("/unicode/<word>")
def unicode_path(word: str) -> Response:
    return Response(word, mimetype="text/plain")


@app.get("/error")
def error() -> Response:
    raise RuntimeError("boom (expected by the differential test)")
