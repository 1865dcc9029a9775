"""Plugins: packages that extend training without train importing them (eval's tasks and commands).

A plugin is a module named in the `memzoo.plugins` entry-point group of an installed
distribution; memzoo itself declares `eval = "eval.plugin"`. Importing the module
registers what it adds (data sources); a module may also define
`add_commands(subparsers)` to add `memzoo` subcommands.
"""

from __future__ import annotations

import functools
import importlib.metadata
from types import ModuleType

ENTRY_POINT_GROUP = "memzoo.plugins"


@functools.cache
def load_plugins() -> tuple[ModuleType, ...]:
    """Import every plugin module once, in entry-point name order."""
    entry_points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda entry: entry.name)
    return tuple(entry.load() for entry in entry_points)
