"""Validation of every name that ends up in a path or a libvirt object name."""

from __future__ import annotations

import re

from .errors import UsageError

# Letters, digits and a few separators; no '/', no leading '.', so no '..' and no hidden files.
_SAFE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+:-]{0,127}")


def safe_name(kind: str, value: str) -> str:
    """Return `value` if it can be used as a file or object name, else raise UsageError."""
    if not _SAFE.fullmatch(value) or ".." in value:
        raise UsageError(
            f"invalid {kind} {value!r}",
            hint="use 1-128 letters, digits, '_', '-', '.', '+' or ':', not starting with '.' and without '/' or '..'",
        )
    return value
