"""Training configuration: data, optimizer, mesh, checkpoint and logging, validated when built.

Presets are Python files in `configs/` whose `get_config()` returns a `TrainConfig`.
The CLI loads a preset by name or path and applies `--set path.to.field=value`
overrides, parsed by the field's declared type.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import typing
from typing import Any, ClassVar, Mapping

from arch.config import Config, ConfigError, ModelConfig

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
TOKENIZERS = ("bytes", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where training text or examples come from and how they are cut into batches.

    `source` names a registered data source (see `train.data.SOURCES`):
    "text" reads local text files (`paths`, a comma-separated list of globs; empty
    means the embedded corpus, the Python standard library's own source files);
    "tfds" reads a prepared TFDS dataset through `tfds.data_source`; the synthetic
    recall tasks of `eval/` register further names and take `task` options.
    """

    _path: ClassVar[str] = "data"

    source: str = "text"
    paths: str = ""
    tfds_name: str = ""
    tfds_data_dir: str = ""
    tfds_text_key: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"  # tfds split for evaluation; text files hold out `eval_fraction`
    eval_fraction: float = 0.02
    tokenizer: str = "bytes"
    spm_model: str = ""
    seq_len: int = 256
    batch_size: int = 16  # global, across all hosts
    eval_batches: int = 8
    seed: int = 0
    prefetch: int = 2  # batches prepared ahead in a background thread; 0 disables
    task: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        self.check(self.seq_len > 0, "seq_len", "must be a positive integer")
        self.check(self.batch_size > 0, "batch_size", "must be a positive integer")
        self.check(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        self.check(0.0 < self.eval_fraction < 1.0, "eval_fraction", "must lie strictly between 0 and 1")
        self.check(self.tokenizer in TOKENIZERS, "tokenizer", f"must be one of {TOKENIZERS}")
        self.check(
            self.tokenizer != "sentencepiece" or bool(self.spm_model),
            "spm_model",
            "is required when tokenizer='sentencepiece' (path to a SentencePiece .model file)",
        )
        self.check(self.prefetch >= 0, "prefetch", "must be >= 0")
        if self.source == "tfds":
            self.check(bool(self.tfds_name), "tfds_name", "is required when source='tfds' (e.g. 'pg19')")
        from train import data

        data.validate_data_config(self)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`, and global-norm clipping."""

    _path: ClassVar[str] = "optimizer"

    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        self.check(self.lr > 0, "lr", "must be positive")
        self.check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must lie in [0, 1]")
        self.check(0.0 <= self.b1 < 1.0, "b1", "must lie in [0, 1)")
        self.check(0.0 <= self.b2 < 1.0, "b2", "must lie in [0, 1)")
        self.check(self.eps > 0, "eps", "must be positive")
        self.check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    """Device mesh sizes for the axes (data, fsdp, tensor); -1 takes all remaining devices."""

    _path: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    multi_host: bool = False  # call jax.distributed.initialize() before anything else

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            self.check(size == -1 or size >= 1, name, "must be a positive mesh size or -1")
        self.check(
            sum(size == -1 for size in sizes.values()) <= 1,
            "data",
            "only one mesh axis may be -1 (take the remaining devices)",
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Config):
    _path: ClassVar[str] = "checkpoint"

    every_steps: int = 200
    keep: int = 3
    async_save: bool = True

    def validate(self) -> None:
        self.check(self.every_steps > 0, "every_steps", "must be a positive integer")
        self.check(self.keep > 0, "keep", "must be a positive integer")


@dataclasses.dataclass(frozen=True)
class LoggingConfig(Config):
    _path: ClassVar[str] = "logging"

    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    progress_bar: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        self.check(self.log_every > 0, "log_every", "must be a positive integer")
        self.check(self.eval_every >= 0, "eval_every", "must be >= 0 (0 disables evaluation)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Everything one training run needs; saved beside every checkpoint."""

    name: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    steps: int = 1000
    seed: int = 0
    remat: str = "none"

    def validate(self) -> None:
        self.check(self.steps > 0, "steps", "must be a positive integer")
        self.check(self.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} is longer than model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        from train import data

        vocab = data.tokenizer_vocab_size(self.data)
        if vocab is not None and vocab > self.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {self.model.vocab_size} is smaller than the data's vocabulary ({vocab} "
                f"tokens for data.source={self.data.source!r}, tokenizer={self.data.tokenizer!r})"
            )
        from arch import registry

        registry.validate_sequence_length(self.model, self.data.seq_len)


# ---------------------------------------------------------------------------
# Presets and overrides


CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    import configs

    return configs.preset_names()


def load_config(name_or_path: str) -> TrainConfig:
    """A preset by name (`tiny`, `based-360m`) or a Python file path defining get_config()."""
    path = pathlib.Path(name_or_path)
    if name_or_path.endswith(".py") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: file {name_or_path!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"memzoo_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config: {name_or_path} defines no get_config() function")
        config = module.get_config()
    else:
        import configs

        config = configs.get_preset(name_or_path)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"--config: get_config() in {name_or_path!r} returned {type(config).__name__}, not TrainConfig")
    return config


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `path.to.field=value` strings; values are parsed by the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. model.d_model=512")
        path, raw = item.split("=", 1)
        config = _set_path(config, path.strip().split("."), raw.strip(), path.strip())
    return config


def _set_path(node: Any, parts: list[str], raw: str, full: str) -> Any:
    head, rest = parts[0], parts[1:]
    if isinstance(node, Mapping):
        # Free-form option maps (mixer_options, task): keys are not declared, values parsed as literals.
        current = node.get(head)
        value = _set_path(current if current is not None else {}, rest, raw, full) if rest else _parse_literal(raw)
        return {**node, head: value}
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"--set {full}: {'.'.join(parts)} goes below a plain value")
    fields = {f.name: f for f in dataclasses.fields(node)}
    if head not in fields:
        raise ConfigError(
            f"--set {full}: unknown field {head!r} in {type(node).__name__}; fields are: {', '.join(sorted(fields))}"
        )
    current = getattr(node, head)
    if rest:
        value = _set_path(current, rest, raw, full)
    else:
        hint = typing.get_type_hints(type(node))[head]
        value = _parse_typed(raw, hint, full)
    try:
        return dataclasses.replace(node, **{head: value})
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--set {full}: {error}") from None


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _parse_typed(raw: str, hint: Any, full: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--set {full}: expected true or false, got {raw!r}")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--set {full}: expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--set {full}: expected a number, got {raw!r}") from None
    if hint is str:
        return raw
    if origin is tuple:
        items = [item.strip() for item in raw.strip("()[]").split(",") if item.strip()]
        (item_type, *_) = typing.get_args(hint) or (str,)
        return tuple(_parse_typed(item, item_type, full) for item in items)
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        value = _parse_literal(raw)
        if not isinstance(value, dict):
            raise ConfigError(f"--set {full}: expected a dict literal like {{'window': 128}}, got {raw!r}")
        return value
    raise ConfigError(f"--set {full}: cannot set a field of type {hint} from the command line")


def config_from_dict(values: Mapping[str, Any], cls: type = TrainConfig) -> Any:
    """Rebuild a (nested) config from `Config.to_dict()` output, e.g. the copy saved in a checkpoint."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value, hint = values[field.name], hints[field.name]
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(value, hint)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[field.name] = value
    unknown = sorted(set(values) - set(kwargs))
    if unknown:
        raise ConfigError(f"saved config has unknown field {unknown[0]!r} for {cls.__name__}")
    return cls(**kwargs)
