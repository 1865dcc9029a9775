"""Validated configuration dataclasses: the shared base and the model config.

Every config in memzoo is a frozen dataclass that checks itself when built, so a
wrong field, name or shape fails at once with a message naming the field,
rather than deep inside a jit trace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for validated configs. Subclasses override `validate` and call `self.check`."""

    # The dotted path of this config inside its parent (e.g. "model"), for messages.
    _path: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is wrong. Subclasses extend this."""

    def check(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            where = f"{self._path}.{field}" if self._path else field
            raise ConfigError(f"{where}: {message} (got {getattr(self, field, '?')!r})")

    def replace(self, **changes: Any):
        """A copy with fields changed; unknown field names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            prefix = f"{self._path}." if self._path else ""
            raise ConfigError(
                f"unknown field {prefix}{unknown[0]}; {type(self).__name__} has: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(value: Any) -> Any:
    """Config (nested) -> JSON-friendly dicts, lists and scalars."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The decoder LM: sizes, the per-layer mixer pattern and per-mixer options.

    `layers` names the mixer of each block. A shorter tuple is repeated, so
    ("attention",) is an all-attention model and ("base_conv", "based") alternates;
    its length must then divide `n_layers`. `mixer_options` maps a mixer name to
    keyword options of that mixer (checked against the mixer's own options class).
    """

    _path: ClassVar[str] = "model"

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (multi-head); fewer gives grouped-query attention
    head_dim: int = 0  # 0 means d_model // n_heads
    mlp_dim: int = 0  # SwiGLU hidden width; 0 means the multiple of 64 nearest 8/3 * d_model
    mlp: bool = True  # False leaves blocks as mixer-only (the zoology MQAR protocol)
    layers: tuple[str, ...] = ("attention",)
    mixer_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # activation / compute dtype; parameters stay float32
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            self.check(getattr(self, name) > 0, name, "must be a positive integer")
        self.check(self.n_kv_heads >= 0, "n_kv_heads", "must be >= 0 (0 means n_heads)")
        self.check(self.head_dim >= 0, "head_dim", "must be >= 0 (0 means d_model // n_heads)")
        self.check(self.mlp_dim >= 0, "mlp_dim", "must be >= 0 (0 means about 8/3 * d_model)")
        if self.head_dim == 0:
            self.check(
                self.d_model % self.n_heads == 0,
                "n_heads",
                f"must divide d_model={self.d_model} when head_dim is 0",
            )
        self.check(
            self.num_kv_heads <= self.n_heads and self.n_heads % self.num_kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads={self.n_heads}",
        )
        self.check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        self.check(isinstance(self.layers, tuple) and len(self.layers) > 0, "layers", "must be a non-empty tuple of mixer names")
        self.check(
            self.n_layers % len(self.layers) == 0,
            "layers",
            f"its length must divide n_layers={self.n_layers} (it is repeated to fill the stack)",
        )
        self.check(self.rope_theta > 0, "rope_theta", "must be positive")
        self.check(self.norm_eps > 0, "norm_eps", "must be positive")
        # Mixer names and options are checked against the registry, which knows the mixers.
        from arch import registry

        registry.validate_model_config(self)

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_mlp_dim(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        return max(64, int(round(8 * self.d_model / 3 / 64)) * 64)

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer name of every block, the pattern repeated to n_layers."""
        return self.layers * (self.n_layers // len(self.layers))
