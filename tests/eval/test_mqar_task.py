"""The MQAR generator: zoology's layout, seeding, the answer's uniqueness, an oracle and a constant baseline."""

import numpy as np
import pytest

from arch.config import ConfigError
from eval.tasks.common import example_rng
from eval.tasks.mqar import MqarOptions, mqar_example, query_slot_probabilities
from train import data
from train.config import DataConfig

VOCAB, PAIRS, LENGTH = 64, 4, 48


def dataset(split="train", seed=0, **task):
    task = {"vocab_size": VOCAB, "num_kv_pairs": PAIRS, **task}
    return data.split_dataset(DataConfig(source="mqar", seq_len=LENGTH, batch_size=4, seed=seed, task=task), split)


def examples(count=200, **kwargs):
    source = dataset(**kwargs)
    return [source[i] for i in range(count)]


def test_same_seed_same_examples_and_splits_draw_from_disjoint_seeds():
    first, again = examples(50), examples(50)
    for a, b in zip(first, again):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    reseeded = examples(50, seed=1)
    held_out = examples(50, split="eval")
    train_inputs = {a["inputs"].tobytes() for a in first}
    assert not train_inputs & {b["inputs"].tobytes() for b in reseeded}
    assert not train_inputs & {b["inputs"].tobytes() for b in held_out}
    # Example i of a split is seeded by (data.seed, split, i): random access needs no earlier example.
    direct = mqar_example(MqarOptions(vocab_size=VOCAB, num_kv_pairs=PAIRS), LENGTH, example_rng(0, "eval", 7))
    np.testing.assert_array_equal(direct["inputs"], held_out[7]["inputs"])


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_answers_and_label_positions_on_many_seeds(random_non_queries):
    for example in examples(random_non_queries=random_non_queries):
        inputs, targets, mask = example["inputs"], example["targets"], example["mask"]
        assert inputs.shape == targets.shape == mask.shape == (LENGTH,)
        keys, values = inputs[0 : 2 * PAIRS : 2], inputs[1 : 2 * PAIRS : 2]
        assert len(set(keys)) == len(set(values)) == PAIRS
        assert np.all((keys >= 1) & (keys < VOCAB // 2)) and np.all((values >= VOCAB // 2) & (values < VOCAB))
        queries = np.flatnonzero(mask)
        assert len(queries) == PAIRS and np.all(mask[queries] == 1.0)
        # Query slots are two tokens wide, after the context; each key is asked exactly once.
        assert np.all(queries >= 2 * PAIRS) and np.all((queries - 2 * PAIRS) % 2 == 0)
        assert sorted(inputs[queries]) == sorted(keys)
        answer_of = dict(zip(keys.tolist(), values.tolist()))
        assert [answer_of[k] for k in inputs[queries].tolist()] == targets[queries].tolist()
        assert np.all(targets[mask == 0] == 0)
        # The answer is in its pair and nowhere else; a key appears in its pair and its query only.
        for key, value in answer_of.items():
            assert np.count_nonzero(inputs == value) == 1
            assert np.count_nonzero(inputs == key) == 2
        filler = np.ones(LENGTH, bool)
        filler[: 2 * PAIRS] = False
        filler[queries] = False
        if random_non_queries:
            assert len(set(inputs[filler].tolist())) > 5
        else:
            assert np.all(inputs[filler] == 0)


def test_query_slots_follow_the_power_law():
    slots = (LENGTH - 2 * PAIRS) // 2
    probabilities = query_slot_probabilities(slots, 0.01)
    expected = np.arange(1, slots + 1) ** (0.01 - 1)
    np.testing.assert_allclose(probabilities, expected / expected.sum())
    counts = np.zeros(slots)
    for example in examples(400):
        np.add.at(counts, (np.flatnonzero(example["mask"]) - 2 * PAIRS) // 2, 1)
    # Near slots are asked far more often than far ones; power_a = 1 spreads them evenly.
    assert counts[:3].sum() > 4 * counts[-3:].sum()
    uniform = np.zeros(slots)
    for example in examples(400, power_a=1.0):
        np.add.at(uniform, (np.flatnonzero(example["mask"]) - 2 * PAIRS) // 2, 1)
    assert uniform[:3].sum() < 2 * uniform[-3:].sum()


def accuracy(predict, batch):
    predictions = np.stack([predict(inputs) for inputs in batch["inputs"]])
    hits = (predictions == batch["targets"]) * batch["mask"]
    return hits.sum() / batch["mask"].sum()


def test_an_oracle_reading_the_pairs_scores_one_and_a_constant_scores_at_chance():
    batch = {name: np.stack([e[name] for e in examples(500)]) for name in ("inputs", "targets", "mask")}

    def oracle(inputs):
        answer_of = dict(zip(inputs[0 : 2 * PAIRS : 2].tolist(), inputs[1 : 2 * PAIRS : 2].tolist()))
        return np.array([answer_of.get(token, 0) for token in inputs.tolist()])

    assert accuracy(oracle, batch) == 1.0
    chance = 1 / (VOCAB - VOCAB // 2)  # values are uniform over [V/2, V)
    constant = accuracy(lambda inputs: np.full_like(inputs, VOCAB // 2 + 3), batch)
    assert abs(constant - chance) < 0.02, (constant, chance)


def test_the_source_declares_its_vocabulary_and_label_count():
    cfg = DataConfig(source="mqar", seq_len=LENGTH, batch_size=4, task={"vocab_size": VOCAB, "num_kv_pairs": PAIRS})
    assert data.tokenizer_vocab_size(cfg) == VOCAB
    assert data.labels_per_example(cfg) == PAIRS
    batch = next(data.train_iterator(cfg))
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), PAIRS)


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match=r"data\.task\.num_kv_pair: unknown option .*did you mean 'num_kv_pairs'"):
        DataConfig(source="mqar", task={"num_kv_pair": 4})
    with pytest.raises(ConfigError, match=r"data\.seq_len: 12 is too short for data\.task\.num_kv_pairs=4"):
        DataConfig(source="mqar", seq_len=12, task={"num_kv_pairs": 4})
    with pytest.raises(ConfigError, match=r"data\.task\.vocab_size: must leave at least num_kv_pairs=8 keys"):
        DataConfig(source="mqar", task={"num_kv_pairs": 8, "vocab_size": 16})
    with pytest.raises(ConfigError, match=r"data\.task\.random_non_queries: expected bool"):
        DataConfig(source="mqar", task={"random_non_queries": "yes"})
