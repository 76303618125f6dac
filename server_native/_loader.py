"""Finds and loads the native library.

For now the library is the extension module inside this package, built by
``hatch_build.py``; the prebuilt resolution order of SPEC section 5 comes with
the distribution work.
"""

from __future__ import annotations

from types import ModuleType

ABI_VERSION = 1


def load() -> ModuleType:
    try:
        from . import _native
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "server_native's native library is not built. Install the package with "
            "`pip install .` (or `pip install -e .`), which compiles it with Rust "
            f"(https://rustup.rs). Cause: {exc}"
        ) from exc
    if _native.ABI_VERSION != ABI_VERSION:
        raise ImportError(
            f"server_native native library has ABI {_native.ABI_VERSION}, "
            f"this package needs {ABI_VERSION}: rebuild it with `pip install .`"
        )
    return _native


native = load()
