"""The three workloads every app serves, by path, so one server process serves them all.

- ``GET /``: ``Hello, World!`` (13 bytes)
- ``GET /10k``: 10 KiB
- ``POST /echo``: the request body (256 bytes in the benchmark) sent back

and the two files the static-file cases serve from ``STATIC_DIR`` under ``/static/``
(the harness writes them; no app sees these requests).

The harness checks these bodies before measuring; ``wrk/echo256.lua`` holds the same
256-byte request body as ``ECHO_REQUEST``.
"""

from __future__ import annotations

HELLO = b"Hello, World!"
TEN_K = b"0123456789abcdef" * 640  # 10,240 bytes
ECHO_REQUEST = b"0123456789abcdef" * 16  # 256 bytes; the harness posts this to /echo

HELLO_PATH = "/"
TEN_K_PATH = "/10k"
ECHO_PATH = "/echo"

STATIC_DIR = "static"
STATIC_1K = bytes(range(256)) * 4  # 1,024 bytes
STATIC_1M = bytes(range(256)) * 4096  # 1,048,576 bytes
STATIC_1K_PATH = "/static/1k.bin"
STATIC_1M_PATH = "/static/1m.bin"
