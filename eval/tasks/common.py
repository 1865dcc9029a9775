"""What every synthetic task shares: validated options, seeding, needle samples and their scoring.

Every example is generated from its own seed, (data.seed, split, index...), so a dataset
has random access by index, needs no storage and is the same on every machine. The
split is part of every seed, so the train, held-out and benchmark examples come from
disjoint seeds.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import grain
import numpy as np

from arch.config import Config, ConfigError
from eval.tasks.text import VOCABULARIES
from train.data import register_source

# The seed stream of each split: "train" and "eval" (held out) are the training loop's
# splits, which `memzoo bench` also scores; "test" is what `memzoo eval` scores.
SPLIT_STREAMS = {"train": 0, "eval": 1, "test": 2}


def example_rng(seed: int, split: str, *indices: int) -> np.random.Generator:
    """The generator of one example: seeded by the run's seed, the split and the example's indices."""
    return np.random.default_rng([seed, SPLIT_STREAMS[split], *indices])


@dataclasses.dataclass(frozen=True)
class TaskOptions(Config):
    """Base of a task's options, given as data.task; errors name data.task.<field>."""

    _path: ClassVar[str] = "data.task"

    num_train_examples: int = 100_000
    num_eval_examples: int = 1_000

    def validate(self) -> None:
        self.check(self.num_train_examples > 0, "num_train_examples", "must be a positive integer")
        self.check(self.num_eval_examples > 0, "num_eval_examples", "must be a positive integer")

    def split_size(self, split: str) -> int:
        return self.num_train_examples if split == "train" else self.num_eval_examples

    def check_choice(self, field: str, choices: Sequence[str]) -> None:
        self.check(getattr(self, field) in choices, field, f"must be one of {', '.join(choices)}")


def parse_options(cls: type[TaskOptions], task: Mapping[str, Any], source: str) -> TaskOptions:
    """`cls` built from a data.task mapping; unknown names and wrong types are ConfigErrors."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name, value in task.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"data.task.{name}: unknown option of task {source!r}{hint}; its options are: {', '.join(sorted(fields))}"
            )
        expected = type(fields[name].default)
        # bool is an int in Python, and an int is a fine float; anything else must match the default's type.
        fits = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not fits and not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"data.task.{name}: expected {expected.__name__}, got {value!r} for task {source!r}")
    return cls(**task)


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """One retrieval question: a prompt to read and the answer to continue it with.

    `answer` is the exact continuation (the asked answers joined by separators);
    `answer_spans[i]` is where asked answer i lies in it, and `answer_sources[i]` where
    the same tokens lie in the prompt (inside needle line `needle_spans[...]`).
    """

    prompt: np.ndarray  # int32[L]
    answer: np.ndarray  # int32[A]
    answer_spans: tuple[tuple[int, int], ...]
    answer_sources: tuple[int, ...]
    needle_spans: tuple[tuple[int, int], ...]
    depth: float

    def answers(self) -> list[np.ndarray]:
        return [self.answer[start:stop] for start, stop in self.answer_spans]


def score_answer(predicted: np.ndarray, sample: NeedleSample) -> float:
    """Exact match of each asked answer's tokens in a predicted continuation, averaged over the answers."""
    predicted = np.asarray(predicted)
    hits = [np.array_equal(predicted[start:stop], sample.answer[start:stop]) for start, stop in sample.answer_spans]
    return float(np.mean(hits))


def needle_example(sample: NeedleSample) -> dict[str, np.ndarray]:
    """A training example: next-token prediction over prompt + answer, scored on the answer only."""
    tokens = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)
    mask = np.zeros(len(tokens) - 1, np.float32)
    mask[len(sample.prompt) - 1 :] = 1.0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "mask": mask}


@dataclasses.dataclass(frozen=True)
class NeedleOptions(TaskOptions):
    vocabulary: str = "bytes"  # "bytes" (UTF-8, the training default) or "words" (closed word-level)

    def validate(self) -> None:
        super().validate()
        self.check_choice("vocabulary", tuple(VOCABULARIES))


class NeedleTask(abc.ABC):
    """A retrieval task with its options: samples prompts of any length with the needle at any depth."""

    name: ClassVar[str]
    options_class: ClassVar[type[NeedleOptions]]

    def __init__(self, options: NeedleOptions):
        self.options = options
        self.vocabulary = VOCABULARIES[options.vocabulary]

    @classmethod
    def from_task_options(cls, task: Mapping[str, Any]) -> NeedleTask:
        return cls(parse_options(cls.options_class, task, cls.name))

    @property
    @abc.abstractmethod
    def answer_length(self) -> int:
        """Tokens of every sample's answer (fixed, so training examples have one length)."""

    @property
    @abc.abstractmethod
    def min_prompt_length(self) -> int:
        """The shortest prompt that holds header, needles and question for any sample."""

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, prompt_length: int, depth: float) -> NeedleSample:
        """A prompt of exactly prompt_length tokens whose (first) asked needle sits at `depth` in [0, 1]."""

    def check_prompt_length(self, prompt_length: int, field: str) -> None:
        if prompt_length < self.min_prompt_length:
            raise ConfigError(
                f"{field}: a {self.name} prompt needs at least {self.min_prompt_length} tokens with the "
                f"{self.options.vocabulary} vocabulary (got {prompt_length}); use a longer length"
            )


def register_needle_task(task_class: type[NeedleTask]) -> type[NeedleTask]:
    """Register a needle task as an "examples" data source: prompt + answer, scored on the answer.

    Each example has its own needle depth, drawn uniformly, and data.seq_len + 1 tokens in all.
    """
    def bind(cfg) -> NeedleTask:
        return task_class.from_task_options(cfg.task)

    def validate(cfg) -> None:
        task = bind(cfg)
        shortest = task.min_prompt_length + task.answer_length - 1
        if cfg.seq_len < shortest:
            raise ConfigError(
                f"data.seq_len: {cfg.seq_len} is too short for {task.name} with data.task={dict(cfg.task)}: "
                f"prompt ({task.min_prompt_length} tokens at least) and answer ({task.answer_length}) need "
                f"data.seq_len >= {shortest}"
            )

    def examples(cfg, split: str) -> grain.MapDataset:
        task = bind(cfg)
        prompt_length = cfg.seq_len + 1 - task.answer_length

        def example(index: int) -> dict[str, np.ndarray]:
            rng = example_rng(cfg.seed, split, index)
            return needle_example(task.sample(rng, prompt_length, depth=float(rng.uniform())))

        return grain.MapDataset.range(task.options.split_size(split)).map(example)

    register_source(
        task_class.name,
        kind="examples",
        validate=validate,
        vocab_size=lambda cfg: bind(cfg).vocabulary.vocab_size,
        labels_per_example=lambda cfg: bind(cfg).answer_length,
    )(examples)
    return task_class
