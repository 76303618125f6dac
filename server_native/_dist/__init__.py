"""Distribution: finding and loading the native library, platform labels,
the release metadata, and the ``setup``/``info`` commands. Never imported on
a request path."""
