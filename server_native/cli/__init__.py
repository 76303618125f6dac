"""The command line (``server-native``, ``python -m server_native``), the
``run()`` it stands on, and the worker supervisor."""
