"""Multi-query associative recall (MQAR), the generator of zoology (Arora, Eyuboglu et al., 2023).

An example of length L over a vocabulary of V tokens:

    k1 v1 k2 v2 ... kK vK | query region of L - 2K tokens

Keys are K distinct tokens from [1, V/2), values K distinct tokens from [V/2, V).
The query region is cut into (L - 2K) // 2 slots of two tokens; every key is queried
exactly once, in a slot g drawn without replacement with probability proportional to
(g + 1) ** (power_a - 1), so most queries come soon after the context. The query key
sits at the slot's first token, and its target there is the key's value: next-token
prediction, scored only at the K query positions. The other tokens are filler: 0, or
uniform random tokens when random_non_queries is set (the default).

One deliberate difference from zoology: random filler never takes the value of one
of the example's own keys or values (such draws are redrawn), so each answer can be
read from its key-value pair and nowhere else: no stray repeated key opens a second,
unscored query and no stray value plants a decoy. It excludes 2K of V tokens from the
filler distribution and leaves everything else as zoology draws it.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from arch.config import ConfigError
from eval.tasks.common import TaskOptions, example_rng, parse_options
from train.data import register_source


@dataclasses.dataclass(frozen=True)
class MqarOptions(TaskOptions):
    vocab_size: int = 8192
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def validate(self) -> None:
        super().validate()
        self.check(self.num_kv_pairs >= 1, "num_kv_pairs", "must be >= 1")
        self.check(
            self.vocab_size // 2 - 1 >= self.num_kv_pairs,
            "vocab_size",
            f"must leave at least num_kv_pairs={self.num_kv_pairs} keys in [1, vocab_size / 2)",
        )
        self.check(self.power_a > 0.0, "power_a", "must be positive (1 spreads queries uniformly, smaller favours early slots)")

    def check_seq_len(self, seq_len: int, field: str) -> None:
        if 4 * self.num_kv_pairs > seq_len:
            raise ConfigError(
                f"{field}: {seq_len} is too short for data.task.num_kv_pairs={self.num_kv_pairs}; MQAR needs "
                f"at least 4 tokens per pair (2 in the context, a query slot of 2 after it), {4 * self.num_kv_pairs}"
            )


def options_from_task(task) -> MqarOptions:
    return parse_options(MqarOptions, task, "mqar")


def query_slot_probabilities(slots: int, power_a: float) -> np.ndarray:
    """P(query slot g) for g in [0, slots): proportional to (g + 1) ** (power_a - 1)."""
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


def mqar_example(options: MqarOptions, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example: inputs, targets (the value at each query key, 0 elsewhere) and the query mask."""
    pairs, vocab = options.num_kv_pairs, options.vocab_size
    keys = 1 + rng.choice(vocab // 2 - 1, size=pairs, replace=False)
    values = vocab // 2 + rng.choice(vocab - vocab // 2, size=pairs, replace=False)
    context = 2 * pairs
    slots = (seq_len - context) // 2
    gaps = rng.choice(slots, size=pairs, replace=False, p=query_slot_probabilities(slots, options.power_a))
    query_positions = context + 2 * gaps

    inputs = np.zeros(seq_len, np.int32)
    inputs[0:context:2] = keys
    inputs[1:context:2] = values
    inputs[query_positions] = keys
    targets = np.zeros(seq_len, np.int32)
    targets[query_positions] = values
    mask = np.zeros(seq_len, np.float32)
    mask[query_positions] = 1.0
    if options.random_non_queries:
        filler = np.ones(seq_len, bool)
        filler[:context] = False
        filler[query_positions] = False
        inputs[filler] = _filler_tokens(rng, int(filler.sum()), vocab, np.concatenate([keys, values]))
    return {"inputs": inputs, "targets": targets, "mask": mask}


def _filler_tokens(rng: np.random.Generator, count: int, vocab: int, excluded: np.ndarray) -> np.ndarray:
    """Uniform tokens in [0, vocab), redrawn until none is in `excluded`."""
    tokens = rng.integers(0, vocab, size=count)
    clashes = np.isin(tokens, excluded)
    while clashes.any():
        tokens[clashes] = rng.integers(0, vocab, size=int(clashes.sum()))
        clashes = np.isin(tokens, excluded)
    return tokens


def _validate(cfg) -> None:
    options_from_task(cfg.task).check_seq_len(cfg.seq_len, "data.seq_len")


@register_source(
    "mqar",
    kind="examples",
    validate=_validate,
    vocab_size=lambda cfg: options_from_task(cfg.task).vocab_size,
    labels_per_example=lambda cfg: options_from_task(cfg.task).num_kv_pairs,
)
def mqar_examples(cfg, split: str) -> grain.MapDataset:
    """MQAR examples of length data.seq_len; example i of a split is seeded by (data.seed, split, i)."""
    options = options_from_task(cfg.task)

    def example(index: int) -> dict[str, np.ndarray]:
        return mqar_example(options, cfg.seq_len, example_rng(cfg.seed, split, index))

    return grain.MapDataset.range(options.split_size(split)).map(example)
