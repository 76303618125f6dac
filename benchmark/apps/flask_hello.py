"""The three workloads as a Flask app (`flask_hello:app`), for every WSGI server."""

from __future__ import annotations

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH
from flask import Flask, Response, request

app = Flask(__name__)
TEXT = "text/plain"


@app.get("/")
def hello() -> Response:
    return Response(HELLO, mimetype=TEXT)


@app.get(TEN_K_PATH)
def ten_k() -> Response:
    return Response(TEN_K, mimetype=TEXT)


@app.post(ECHO_PATH)
def echo() -> Response:
    return Response(request.get_data(), mimetype=TEXT)
