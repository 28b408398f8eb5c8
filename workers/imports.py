"""Importing user code named ``package.module:attribute`` in the pools file, with clear errors.

The worker's current directory is importable (as with ``python -m``), so a project's own
packages resolve when the fleet runs from the project root.
"""

from __future__ import annotations

import importlib
import os
import sys

from agentpool.shared.errors import ConfigError


def import_object(path: str, what: str) -> object:
    """``module:attr`` (attr may be dotted); a ConfigError naming ``what`` and the path otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {path!r}: expected 'package.module:name'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module raised while importing
        raise ConfigError(
            f"{what} {path!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}") from None
    return obj
