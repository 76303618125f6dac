"""Small application modules (Starlette, FastAPI, Flask, Django) and the
harness that runs them on server_native, uvicorn or werkzeug for the tests in
``tests/test_asgi.py``, ``tests/test_wsgi.py`` and ``tests/test_differential.py``."""
