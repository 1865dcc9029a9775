"""Presets: one Python file per preset, each with `get_config() -> TrainConfig`.

A preset's name is its file name with dashes for underscores: `attention_125m.py`
is `attention-125m`; a dot in a size may be written either way (`based-1.3b` is
`based_1_3b.py`). Presets hold names and numbers only.
"""

from __future__ import annotations

import difflib
import importlib
import pathlib

from arch.config import ConfigError

_HERE = pathlib.Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(path.stem.replace("_", "-") for path in _HERE.glob("*.py") if not path.stem.startswith("_"))


def get_preset(name: str):
    names = preset_names()
    name = name.replace(".", "-")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--config: unknown preset {name!r}{hint}; presets: {', '.join(names)}; or give a path to a .py file")
    module = importlib.import_module(f"configs.{name.replace('-', '_')}")
    return module.get_config()
