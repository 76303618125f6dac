"""The dart:io-style API: ``NativeHttpServer`` and the ``serve_*`` helpers,
requests and responses with their headers and cookies, and the HttpServer
WebSocket upgrade."""
