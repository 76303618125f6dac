"""The application interfaces over the shared runtime: ASGI, WSGI, the
direct handler API, and trusted proxy headers."""
