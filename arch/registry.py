"""The mixer registry: config name -> mixer class and its options class.

A mixer registers itself with `@register_mixer("name", options=OptionsClass)`.
`ModelConfig` validates its layer pattern and `mixer_options` here, so a wrong
name or option fails when the config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from arch.config import Config, ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class MixerOptions(Config):
    """Base of per-mixer options. Override `check_model` / `check_seq_len` for cross-field rules."""

    def check_model(self, model: ModelConfig) -> None:
        """Raise ConfigError if these options cannot work with this model config."""

    def check_seq_len(self, model: ModelConfig, seq_len: int) -> None:
        """Raise ConfigError if the mixer cannot take sequences of this length."""


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    cls: type
    options: type[MixerOptions]
    description: str


MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, *, options: type[MixerOptions], description: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered by {MIXERS[name].cls.__qualname__}")
        MIXERS[name] = MixerSpec(name, cls, options, description)
        return cls

    return decorate


def _ensure_registered() -> None:
    import arch.mixers  # noqa: F401  (importing registers every built-in mixer)


def mixer_names() -> list[str]:
    _ensure_registered()
    return sorted(MIXERS)


def get_spec(name: str) -> MixerSpec:
    _ensure_registered()
    if name not in MIXERS:
        close = difflib.get_close_matches(name, MIXERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.layers: unknown mixer {name!r}{hint}; registered mixers: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def mixer_options(model: ModelConfig, name: str) -> MixerOptions:
    """The validated options of mixer `name` under `model.mixer_options[name]`."""
    spec = get_spec(name)
    given: dict[str, Any] = dict(model.mixer_options.get(name, {}))
    fields = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(
            f"model.mixer_options.{name}.{unknown[0]}: unknown option of mixer {name!r}; "
            f"its options are: {', '.join(sorted(fields)) or '(none)'}"
        )
    try:
        return spec.options(**given)
    except TypeError as error:
        raise ConfigError(f"model.mixer_options.{name}: {error}") from None


def validate_model_config(model: ModelConfig) -> None:
    for name in model.layers:
        mixer_options(model, name).check_model(model)
    unused = sorted(set(model.mixer_options) - set(model.layers))
    for name in unused:
        get_spec(name)  # an unknown name is an error even when unused
    if unused:
        raise ConfigError(
            f"model.mixer_options.{unused[0]}: options given for mixer {unused[0]!r}, "
            f"which no layer uses (model.layers = {model.layers})"
        )


def validate_sequence_length(model: ModelConfig, seq_len: int) -> None:
    for name in set(model.layers):
        mixer_options(model, name).check_seq_len(model, seq_len)


def build_mixer(model: ModelConfig, name: str, *, rngs):
    spec = get_spec(name)
    return spec.cls(model, mixer_options(model, name), rngs=rngs)
