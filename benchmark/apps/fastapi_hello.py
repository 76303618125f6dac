"""The three workloads as a FastAPI app (`fastapi_hello:app`), for every ASGI server."""

from __future__ import annotations

from _payloads import ECHO_PATH, HELLO, TEN_K, TEN_K_PATH
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/", response_class=PlainTextResponse)
async def hello() -> bytes:
    return HELLO


@app.get(TEN_K_PATH, response_class=PlainTextResponse)
async def ten_k() -> bytes:
    return TEN_K


@app.post(ECHO_PATH, response_class=PlainTextResponse)
async def echo(request: Request) -> bytes:
    return await request.body()
