"""Importing `ogb` without its network call.

`ogb/version.py` (1.3.6) starts a thread at import time that asks PyPI whether a newer ogb exists (through the
`outdated` package). headprep_hf makes no network calls at import time, so the first import of `ogb` goes through
`import_ogb`, which hides `outdated` for the duration of that import: ogb then skips the check (its own fallback when
`outdated` is not installed). Later `from ogb... import ...` statements reuse the imported package.
"""

from __future__ import annotations

import sys


def import_ogb():
    """Import and return the `ogb` package with its PyPI version check disabled."""
    if "ogb" in sys.modules:
        return sys.modules["ogb"]
    had, previous = "outdated" in sys.modules, sys.modules.get("outdated")
    sys.modules["outdated"] = None  # `from outdated import ...` raises ImportError inside ogb.version
    try:
        import ogb
    finally:
        if had:
            sys.modules["outdated"] = previous
        else:
            del sys.modules["outdated"]
    return ogb
