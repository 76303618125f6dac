"""A FastAPI application: typed path and query parameters, Pydantic bodies,
validation errors (422), ``Form``/``UploadFile`` (python-multipart),
HTTPException, dependencies, StreamingResponse, FileResponse and a lifespan
with state."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

EVENTS: list[str] = []


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    EVENTS.append("startup")
    yield {"db": {"alice": {"name": "Alice", "age": 30}}}
    EVENTS.append("shutdown")


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


async def db(request: Request) -> dict[str, Any]:
    return request.state.db


def sync_db(request: Request) -> dict[str, Any]:
    """A plain ``def`` dependency: FastAPI runs it in its thread pool."""
    return request.state.db


@app.get("/")
async def root() -> dict[str, str]:
    return {"hello": "fastapi"}


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None, tag: Annotated[list[str], Query()] = []) -> dict[str, Any]:  # noqa: B006 - FastAPI copies it
    return {"item_id": item_id, "q": q, "tags": tag}


@app.post("/items", status_code=201)
async def create_item(item: Item) -> dict[str, Any]:
    return {"created": item.model_dump(), "total": item.price * 2}


@app.get("/users/{name}")
async def read_user(name: str, users: Annotated[dict[str, Any], Depends(db)]) -> dict[str, Any]:
    if name not in users:
        raise HTTPException(status_code=404, detail=f"no user {name}")
    return users[name]


@app.get("/header")
async def read_header(x_token: Annotated[str, Header()]) -> dict[str, str]:
    return {"x_token": x_token}


@app.post("/form")
async def form(username: Annotated[str, Form()], password: Annotated[str, Form()]) -> dict[str, str]:
    return {"username": username, "password_length": str(len(password))}


@app.post("/upload")
async def upload(
    description: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File()],
) -> dict[str, Any]:
    out = []
    for upload in files:
        content = await upload.read()
        out.append(
            {
                "filename": upload.filename,
                "content_type": upload.content_type,
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
            }
        )
    return {"description": description, "files": out}


@app.get("/stream")
async def stream(count: int = 4) -> StreamingResponse:
    async def numbers() -> AsyncIterator[str]:
        for index in range(count):
            yield f"{index}\n"

    return StreamingResponse(numbers(), media_type="text/plain")


@app.get("/file")
async def file(path: str) -> FileResponse:
    return FileResponse(path)


@app.get("/boom")
async def boom() -> None:
    raise ZeroDivisionError("expected by the test")


@app.get("/plain", response_class=PlainTextResponse)
async def plain() -> str:
    return "plain text"


@app.get("/sync/users/{name}")
def read_user_sync(name: str, users: Annotated[dict[str, Any], Depends(sync_db)]) -> dict[str, Any]:
    """A plain ``def`` endpoint (the most common FastAPI style)."""
    if name not in users:
        raise HTTPException(status_code=404, detail=f"no user {name}")
    return users[name]
