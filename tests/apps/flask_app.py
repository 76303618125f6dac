"""A Flask application: routing with converters, query strings, JSON and
form bodies, file uploads, streaming responses that a test can gate, files
through ``send_file`` (``wsgi.file_wrapper``), cookies, errors, redirects,
and a view of the WSGI environ."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from flask import (
    Flask,
    Response,
    abort,
    jsonify,
    make_response,
    redirect,
    request,
    send_file,
    stream_with_context,
    url_for,
)

app = Flask(__name__)

#: stream id -> gate the streaming generator waits on between chunks
GATES: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return GATES.setdefault(name, threading.Event())


@app.get("/")
def home() -> str:
    return "flask home"


@app.get("/items/<int:item_id>")
def item(item_id: int) -> Any:
    return jsonify(
        item_id=item_id, url=url_for("item", item_id=item_id), external=url_for("item", item_id=item_id, _external=True)
    )


@app.get("/words/<word>")
def word(word: str) -> Any:
    return jsonify(word=word, path=request.path)


@app.route("/environ", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def environ_view() -> Any:
    env = request.environ
    keys = [
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_PROTOCOL",
        "SERVER_NAME",
        "SERVER_PORT",
        "REMOTE_ADDR",
        "REMOTE_PORT",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "wsgi.url_scheme",
        "wsgi.multithread",
        "wsgi.multiprocess",
        "wsgi.run_once",
    ]
    data = {key: env.get(key) for key in keys}
    data["wsgi.version"] = list(env["wsgi.version"])
    data["http"] = {key: value for key, value in env.items() if key.startswith("HTTP_")}
    data["args"] = list(request.args.items(multi=True))
    data["url"] = request.url
    data["host"] = request.host
    data["body"] = request.get_data(as_text=True)
    return jsonify(data)


@app.post("/json")
def echo_json() -> Any:
    return jsonify(received=request.get_json(), content_type=request.content_type)


@app.post("/form")
def form() -> Any:
    files = {
        name: [
            {
                "filename": f.filename,
                "content_type": f.content_type,
                "size": len(data := f.read()),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            for f in request.files.getlist(name)
        ]
        for name in request.files
    }
    return jsonify(form={k: request.form.getlist(k) for k in request.form}, files=files)


@app.post("/upload")
def upload() -> Any:
    digest = hashlib.sha256()
    size = 0
    while chunk := request.stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(size=size, sha256=digest.hexdigest())


@app.get("/stream")
def stream() -> Response:
    count = int(request.args.get("count", "3"))
    name = request.args.get("gate")

    def chunks() -> Any:
        for index in range(count):
            yield f"chunk-{index};"
            if name is not None and index < count - 1 and not gate(f"{name}-{index}").wait(10):
                yield "gate-timeout;"
                return

    return Response(stream_with_context(chunks()), mimetype="text/plain")


@app.get("/file")
def file() -> Response:
    return send_file(
        request.args["path"], mimetype="application/octet-stream", as_attachment=True, download_name="data.bin"
    )


@app.get("/cookies/set")
def set_cookies() -> Response:
    response = make_response("cookies set")
    response.set_cookie("session", "abc123", httponly=True, samesite="Lax")
    response.set_cookie("theme", "dark", max_age=3600)
    return response


@app.get("/cookies/get")
def get_cookies() -> Any:
    return jsonify(dict(request.cookies))


@app.get("/teapot")
def teapot() -> Any:
    abort(418)


@app.get("/boom")
def boom() -> Any:
    raise RuntimeError("boom (expected by the test)")


@app.get("/redirect")
def go_home() -> Response:
    return redirect(url_for("home"))
