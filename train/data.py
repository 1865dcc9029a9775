"""Data pipelines: documents or ready-made examples from a registered source, as per-host batches.

Every batch is a dict of numpy arrays for one host:

    {"inputs": int32[b, L], "targets": int32[b, L], "mask": float32[b, L]}

with b = data.batch_size // process_count and L = data.seq_len.

Sources are registered by name (`SOURCES`, `register_source`) and come in two kinds:

- "text": `factory(cfg, split)` returns a grain.MapDataset of documents (str or bytes).
  Documents are tokenized, ended with the tokenizer's eos id and packed into sequences
  of L + 1 tokens (concatenate, then split); inputs = seq[:-1], targets = seq[1:].
- "examples": `factory(cfg, split)` returns a grain.MapDataset of ready examples
  {"inputs": int32[L], "targets": int32[L], "mask": float32[L]}; the mask says which
  targets count (the synthetic recall tasks of eval/ score only the answers).

`split` is "train" or "eval". Training reads a disjoint shard of the train split per
host, reshuffled every epoch, forever; `iterator_state` gives its position as plain JSON
and `restore_iterator_state` continues a fresh iterator with the exact next batch.
Evaluation reads the held-out split in a fixed order, so every call gives the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import operator
import os
import pathlib
import re
import sysconfig
from collections.abc import Callable, Iterable
from typing import Any

import grain
import numpy as np

from arch.config import ConfigError
from train.config import DataConfig
from train.plugins import load_plugins
from train.tokenizer import ByteTokenizer, Tokenizer, make_tokenizer

SPLITS = ("train", "eval")
SOURCE_KINDS = ("text", "examples")
EXAMPLE_FIELDS = {"inputs": np.int32, "targets": np.int32, "mask": np.float32}

# Documents are read in the pipeline's own thread (the batch prefetch thread when
# data.prefetch > 0): grain's default 16 reader threads with a 500-element read-ahead
# per row stream would read thousands of documents nobody asked for yet.
_SYNCHRONOUS_READS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ---------------------------------------------------------------------------
# Source registry


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A registered source: how to build a split, and optional cheap config checks."""

    name: str
    kind: str  # one of SOURCE_KINDS
    factory: Callable[[DataConfig, str], grain.MapDataset]
    validate: Callable[[DataConfig], None] | None = None  # raises ConfigError; must not read data
    vocab_size: Callable[[DataConfig], int | None] | None = None  # "examples" sources: the task's vocabulary
    # "examples" sources that score few targets: the most an example has. The loss then
    # computes vocabulary logits only at those positions.
    labels_per_example: Callable[[DataConfig], int] | None = None


SOURCES: dict[str, DataSource] = {}


def register_source(
    name: str,
    *,
    kind: str,
    validate: Callable[[DataConfig], None] | None = None,
    vocab_size: Callable[[DataConfig], int | None] | None = None,
    labels_per_example: Callable[[DataConfig], int] | None = None,
) -> Callable:
    """Decorator registering `factory(cfg, split) -> grain.MapDataset` as data source `name`."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"register_source({name!r}): kind must be one of {SOURCE_KINDS}, got {kind!r}")

    def register(factory: Callable[[DataConfig, str], grain.MapDataset]):
        existing = SOURCES.get(name)
        # Re-running the same definition (a reloaded module, a notebook cell) replaces it;
        # two different factories claiming one name is a mistake.
        if existing is not None and _qualified_name(existing.factory) != _qualified_name(factory):
            raise ValueError(
                f"data source {name!r} is already registered by {_qualified_name(existing.factory)}; pick another name"
            )
        SOURCES[name] = DataSource(name, kind, factory, validate, vocab_size, labels_per_example)
        return factory

    return register


def _qualified_name(function: Callable) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks that need the source registry or the file system; reads no data."""
    load_plugins()  # plugins (eval's tasks) register further sources
    source = SOURCES.get(cfg.source)
    if source is None:
        raise ConfigError(
            f"data.source: unknown source {cfg.source!r}; registered sources: {', '.join(sorted(SOURCES))}"
        )
    if cfg.seed < 0:
        raise ConfigError(f"data.seed: must be >= 0 (got {cfg.seed})")
    if cfg.tokenizer == "sentencepiece" and not os.path.isfile(cfg.spm_model):
        raise ConfigError(
            f"data.spm_model: file {cfg.spm_model!r} does not exist; expected a SentencePiece .model file "
            "(train one with sentencepiece.SentencePieceTrainer)"
        )
    if source.validate is not None:
        source.validate(cfg)


def tokenizer_vocab_size(cfg: DataConfig) -> int | None:
    """How many token ids the data can contain, or None if the source does not say."""
    load_plugins()
    source = SOURCES.get(cfg.source)
    if source is None:
        return None
    if source.kind == "examples":
        return source.vocab_size(cfg) if source.vocab_size is not None else None
    if cfg.tokenizer == "bytes":
        return ByteTokenizer.vocab_size
    return make_tokenizer(cfg).vocab_size


def split_dataset(cfg: DataConfig, split: str) -> grain.MapDataset:
    """All documents (text sources) or examples ("examples" sources) of one split, unsharded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    load_plugins()
    return SOURCES[cfg.source].factory(cfg, split)


def labels_per_example(cfg: DataConfig) -> int | None:
    """The most scored targets in one example, for sources that declare it; None otherwise."""
    load_plugins()
    source = SOURCES.get(cfg.source)
    if source is None or source.labels_per_example is None:
        return None
    return source.labels_per_example(cfg)


# ---------------------------------------------------------------------------
# Built-in source "text": local files, or the Python standard library's sources


@dataclasses.dataclass(frozen=True)
class _TextFile:
    path: str  # where to read it
    key: str  # path relative to its glob's fixed prefix; its hash decides the held-out split


_GLOB_MAGIC = re.compile(r"[*?[]")
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})


# Globs are matched when a pipeline is built, not when the config is validated: a config
# saved in a checkpoint must still load on a machine that lacks the training files.
@register_source("text", kind="text")
def text_documents(cfg: DataConfig, split: str) -> grain.MapDataset:
    """Files from `data.paths` (comma-separated recursive globs), or the embedded corpus when empty.

    The held-out split is a fixed set of files chosen by a hash of their relative paths,
    about `data.eval_fraction` of them: the same files on any machine and for any seed.
    """
    files = _matched_files(cfg.paths) if cfg.paths.strip() else _embedded_corpus_files()
    train_files, eval_files = _held_out_split(files, cfg.eval_fraction)
    chosen = eval_files if split == "eval" else train_files
    if not chosen:
        raise ConfigError(
            f"data.paths: only {len(files)} file matched {cfg.paths!r}, so none is left to hold out for "
            "evaluation; give at least 2 files, or turn evaluation off (logging.eval_every=0)"
        )
    return grain.MapDataset.source(_FileDocuments([file.path for file in chosen]))


def _matched_files(paths: str) -> list[_TextFile]:
    """Files matched by comma-separated globs, sorted, each once; a glob matching nothing is an error."""
    files: dict[str, _TextFile] = {}
    for pattern in (part.strip() for part in paths.split(",")):
        if not pattern:
            continue
        pattern = os.path.expanduser(pattern)
        matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not matches:
            raise ConfigError(
                f"data.paths: no files match {pattern!r} (relative globs start at {os.getcwd()}; "
                "use ** for subdirectories, commas between globs)"
            )
        base = _glob_base(pattern)
        for path in matches:
            key = pathlib.PurePath(os.path.relpath(path, base)).as_posix()
            files.setdefault(os.path.abspath(path), _TextFile(path, key))
    return sorted(files.values(), key=lambda file: file.path)


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: 'data/**/*.txt' -> 'data'."""
    fixed = []
    for part in pathlib.PurePath(pattern).parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


@functools.cache
def _embedded_corpus_files() -> tuple[_TextFile, ...]:
    """Every .py file of the running Python's standard library: a corpus on any machine, no download."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in _THIRD_PARTY_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append(_TextFile(path, pathlib.PurePath(os.path.relpath(path, root)).as_posix()))
    if not files:
        raise ConfigError(
            f"data.paths: empty means the Python standard library's sources, but {root} holds no .py files"
        )
    return tuple(sorted(files, key=lambda file: file.key))


def _held_out_split(files: Iterable[_TextFile], eval_fraction: float) -> tuple[list[_TextFile], list[_TextFile]]:
    """(train, eval): eval takes the files whose key hashes below eval_fraction, at least one, never all."""
    files = list(files)
    ranked = sorted(files, key=lambda file: (_unit_hash(file.key), file.path))
    below = sum(_unit_hash(file.key) < eval_fraction for file in files)
    held_out = {file.path for file in ranked[: min(max(below, 1), len(files) - 1)]}
    return [f for f in files if f.path not in held_out], [f for f in files if f.path in held_out]


def _unit_hash(key: str) -> float:
    """A hash of `key` in [0, 1), the same in every process and on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class _FileDocuments:
    """Random-access documents, each file read only when indexed, so building a pipeline reads nothing."""

    def __init__(self, paths: list[str]):
        self._paths = tuple(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> bytes:
        with open(self._paths[index], "rb") as file:
            return file.read()

    def __repr__(self) -> str:
        return f"_FileDocuments({len(self._paths)} files)"


# ---------------------------------------------------------------------------
# Built-in source "tfds": a prepared TFDS dataset read with tfds.data_source (no TensorFlow)


@register_source("tfds", kind="text")
def tfds_documents(cfg: DataConfig, split: str) -> grain.MapDataset:
    """Records of `data.tfds_name`; the document is the `data.tfds_text_key` feature."""
    import tensorflow_datasets as tfds

    split_field = "train_split" if split == "train" else "eval_split"
    tfds_split = getattr(cfg, split_field)
    try:
        # download=False: a missing dataset must be an error here, not a multi-GB download
        # into the TFRecord format that random access cannot read.
        records = tfds.data_source(cfg.tfds_name, split=tfds_split, data_dir=cfg.tfds_data_dir or None, download=False)
    except Exception as error:  # TFDS raises many types here: not found, wrong format, unknown split
        looked_in = cfg.tfds_data_dir or f"{tfds.core.constants.DATA_DIR} (the default; set data.tfds_data_dir)"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"data.tfds_name: cannot read TFDS dataset {cfg.tfds_name!r}, split {tfds_split!r} "
            f"(data.{split_field}), from {looked_in}: {reason}. memzoo reads TFDS through tfds.data_source, "
            "which needs the dataset prepared there as ArrayRecord, e.g. "
            f"`tfds build {cfg.tfds_name} --data_dir=DIR --file_format=array_record`"
        ) from error
    features = list(records.dataset_info.features.keys())
    if cfg.tfds_text_key not in features:
        raise ConfigError(
            f"data.tfds_text_key: {cfg.tfds_text_key!r} is not a feature of {cfg.tfds_name!r}; "
            f"its features are: {', '.join(features)}"
        )
    return grain.MapDataset.source(records).map(operator.itemgetter(cfg.tfds_text_key))


# ---------------------------------------------------------------------------
# Pipelines


def host_batch_size(cfg: DataConfig, process_count: int = 1) -> int:
    """Rows of each host's batch: the global data.batch_size split evenly across processes."""
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} does not split evenly across {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return cfg.batch_size // process_count


def train_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Endless training batches for this host; `get_state()`/`set_state()` resume exactly.

    Each host reads the documents (or examples) `process_index::process_count` of the
    train split, shuffled with data.seed and reshuffled every epoch. For text sources
    each batch row is its own packed stream of documents, so a long document spreads
    over consecutive batches instead of filling one batch with near-identical rows.
    """
    rows = host_batch_size(cfg, process_count)
    source = SOURCES[cfg.source]
    shard = _train_shard(cfg, process_index, process_count)
    shuffled = shard.shuffle(seed=_shuffle_seed(cfg.seed)).repeat()
    if source.kind == "examples":
        checked = shuffled.map(
            functools.partial(
                _checked_example, source=cfg.source, length=cfg.seq_len, max_labels=labels_per_example(cfg)
            )
        )
        batches = checked.to_iter_dataset(_SYNCHRONOUS_READS).batch(rows)
    else:
        tokenizer = make_tokenizer(cfg)
        row_streams = []
        for row in range(rows):
            # Each row starts at its own random point of its first document, so rows
            # never run in lockstep even when the corpus is one or two files.
            start_fraction = np.random.default_rng([cfg.seed, process_index, row]).random()
            row_tokens = shuffled[row::rows].map_with_index(
                functools.partial(_row_document_tokens, tokenizer=tokenizer, start_fraction=start_fraction)
            )
            row_streams.append(_PackedSequences(row_tokens.to_iter_dataset(_SYNCHRONOUS_READS), cfg.seq_len + 1))
        batches = _RowBatches(row_streams)
    if cfg.prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=cfg.prefetch)
    return iter(batches)


def eval_batches(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> Iterable[dict[str, np.ndarray]]:
    """data.eval_batches held-out batches for this host, the same ones on every iteration.

    The global batches do not depend on the number of processes: every host reads the
    held-out split in order and keeps its own rows, so a held-out split smaller than the
    number of hosts still works and eval losses compare across topologies. Text sources
    pack the held-out documents into consecutive rows; a held-out split shorter than the
    requested batches is read again from its start.
    """
    rows = host_batch_size(cfg, process_count)
    _check_process_index(process_index, process_count)
    if cfg.eval_batches == 0:
        return ()
    host_rows = functools.partial(_host_rows, rows=slice(process_index * rows, (process_index + 1) * rows))
    held_out = split_dataset(cfg, "eval")
    if len(held_out) == 0:
        raise ConfigError(f"data.source: the eval split of {cfg.source!r} is empty")
    cycled = held_out.repeat()
    if SOURCES[cfg.source].kind == "examples":
        checked = cycled[: cfg.eval_batches * cfg.batch_size].map(
            functools.partial(
                _checked_example, source=cfg.source, length=cfg.seq_len, max_labels=labels_per_example(cfg)
            )
        )
        return checked.batch(cfg.batch_size).map(host_rows).to_iter_dataset(_SYNCHRONOUS_READS)
    tokens = cycled.map(functools.partial(_document_tokens, tokenizer=make_tokenizer(cfg)))
    sequences = _PackedSequences(tokens.to_iter_dataset(_SYNCHRONOUS_READS), cfg.seq_len + 1)
    batches = sequences.batch(cfg.batch_size).map(_language_model_batch).map(host_rows)
    return grain.experimental.LimitIterDataset(batches, count=cfg.eval_batches)


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """A training iterator's position as plain JSON data (dicts, lists, ints), for a checkpoint.

    A detached copy: an asynchronous checkpoint writer may hold it while training goes on.
    """
    return json.loads(json.dumps(iterator.get_state()))


def restore_iterator_state(iterator: grain.DatasetIterator, state: dict[str, Any]) -> None:
    """Continue a fresh `train_iterator` exactly where the one that gave `state` stopped."""
    iterator.set_state(state)


def _check_process_index(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, process_count={process_count}), got {process_index}")


def _train_shard(cfg: DataConfig, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's disjoint share of the train split."""
    _check_process_index(process_index, process_count)
    dataset = split_dataset(cfg, "train")
    shard = dataset[process_index::process_count]
    if len(shard) == 0:
        raise ConfigError(
            f"data.source: the train split of {cfg.source!r} has {len(dataset)} documents or examples, "
            f"too few to give each of {process_count} processes one"
        )
    return shard


def _host_rows(batch: dict[str, np.ndarray], *, rows: slice) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in batch.items()}


def _shuffle_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e; hashing data.seed first keeps the epoch
    # orders of seeds 0 and 1 from being the same orders shifted by one epoch.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _document_tokens(document: str | bytes, *, tokenizer: Tokenizer) -> np.ndarray:
    """int32 ids of one document followed by the end-of-document id."""
    body = tokenizer.encode(document)
    tokens = np.empty(len(body) + 1, np.int32)
    tokens[:-1] = body
    tokens[-1] = tokenizer.eos_id
    return tokens


def _row_document_tokens(
    index: int, document: str | bytes, *, tokenizer: Tokenizer, start_fraction: float
) -> np.ndarray:
    tokens = _document_tokens(document, tokenizer=tokenizer)
    return tokens[int(start_fraction * len(tokens)) :] if index == 0 else tokens


def _checked_example(example: Any, *, source: str, length: int, max_labels: int | None) -> dict[str, np.ndarray]:
    """An "examples" source's item as the batch fields, with their dtypes; anything else is an error."""
    if not isinstance(example, dict) or not EXAMPLE_FIELDS.keys() <= example.keys():
        found = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(
            f"data source {source!r} gave an example with {found}; examples must be dicts with 'inputs' and "
            "'targets' (int32[data.seq_len]) and 'mask' (float32[data.seq_len])"
        )
    checked = {name: np.asarray(example[name], dtype) for name, dtype in EXAMPLE_FIELDS.items()}
    for name, value in checked.items():
        if value.shape != (length,):
            raise ValueError(
                f"data source {source!r} gave an example whose {name!r} has shape {value.shape}; "
                f"expected ({length},) for data.seq_len={length}"
            )
    labels = int(np.count_nonzero(checked["mask"]))
    if max_labels is not None and labels > max_labels:
        raise ValueError(
            f"data source {source!r} gave an example with {labels} scored targets but declares at most "
            f"{max_labels} per example (its labels_per_example); the loss would drop the rest"
        )
    return checked


def _language_model_batch(sequences: np.ndarray) -> dict[str, np.ndarray]:
    """int32[b, L + 1] packed token sequences -> next-token inputs, targets and an all-ones mask."""
    return {
        "inputs": np.ascontiguousarray(sequences[:, :-1]),
        "targets": np.ascontiguousarray(sequences[:, 1:]),
        "mask": np.ones((sequences.shape[0], sequences.shape[1] - 1), np.float32),
    }


# ---------------------------------------------------------------------------
# Packing


class _PackedSequences(grain.IterDataset):
    """Concatenates token arrays and cuts the stream into int32[length] sequences."""

    def __init__(self, parent: grain.IterDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __iter__(self) -> _PackedSequencesIterator:
        return _PackedSequencesIterator(self._parent.__iter__(), self._length)

    def __str__(self) -> str:
        return f"_PackedSequences(length={self._length})"


class _PackedSequencesIterator(grain.DatasetIterator):
    """The state is the parent's state before the current document and how many of its
    tokens are used, so restoring re-reads one document and resumes mid-document exactly.
    A final partial sequence of a finite stream is dropped."""

    def __init__(self, parent: grain.DatasetIterator, length: int):
        super().__init__(parent)
        self._length = length
        self._document_state = parent.get_state()
        self._document = np.zeros(0, np.int32)
        self._offset = 0

    def __next__(self) -> np.ndarray:
        sequence = np.empty(self._length, np.int32)
        filled = 0
        while filled < self._length:
            if self._offset == len(self._document):
                self._document_state = self._parent.get_state()
                self._document = next(self._parent)
                self._offset = 0
            take = min(self._length - filled, len(self._document) - self._offset)
            sequence[filled : filled + take] = self._document[self._offset : self._offset + take]
            filled += take
            self._offset += take
        return sequence

    def get_state(self) -> dict[str, Any]:
        return {"document": self._document_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["document"])
        self._document_state = state["document"]
        self._offset = int(state["offset"])
        self._document = next(self._parent) if self._offset else np.zeros(0, np.int32)


class _RowBatches(grain.IterDataset):
    """Batches whose row r is the next sequence of packed stream r."""

    def __init__(self, rows: list[grain.IterDataset]):
        super().__init__(rows)

    def __iter__(self) -> _RowBatchesIterator:
        return _RowBatchesIterator([row.__iter__() for row in self._parents])

    def __str__(self) -> str:
        return f"_RowBatches(rows={len(self._parents)})"


class _RowBatchesIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, np.ndarray]:
        return _language_model_batch(np.stack([next(row) for row in self._parents]))

    def get_state(self) -> dict[str, Any]:
        return {"rows": [row.get_state() for row in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["rows"]) != len(self._parents):
            raise ValueError(
                f"the data iterator state has {len(state['rows'])} rows per host batch but this iterator makes "
                f"{len(self._parents)}; resume with the same data.batch_size and number of processes"
            )
        for row, row_state in zip(self._parents, state["rows"], strict=True):
            row.set_state(row_state)
