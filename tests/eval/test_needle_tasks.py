"""Passkey and needle-in-a-haystack generators: exact lengths, answers only where stated, depth,
seeding, training examples, an oracle that reads the context, and a constant baseline."""

import re

import numpy as np
import pytest

from arch.config import ConfigError
from eval.tasks import NEEDLE_TASKS, score_answer
from eval.tasks.common import example_rng
from eval.tasks import text
from eval.tasks.text import WORDS
from train import data
from train.config import DataConfig

CASES = {
    "passkey": ("passkey", {}),
    "passkey-words": ("passkey", {"vocabulary": "words", "digits": 7}),
    "single-noise": ("niah", {"haystack": "noise"}),
    "single-essay-words": ("niah", {"haystack": "essay", "vocabulary": "words"}),
    "single-kv": ("niah", {"haystack": "kv"}),
    "multikey-kv": ("niah", {"variant": "multikey", "haystack": "kv", "num_needles": 3}),
    "multivalue-essay": ("niah", {"variant": "multivalue", "num_values": 3}),
    "multiquery-kv-words": ("niah", {"variant": "multiquery", "haystack": "kv", "vocabulary": "words"}),
}


@pytest.fixture(params=sorted(CASES))
def task(request):
    name, options = CASES[request.param]
    return NEEDLE_TASKS[name].from_task_options(options)


def samples(task, count=25, split="test", seed=0):
    """Samples over several lengths and depths, from distinct seeds."""
    lengths = (task.min_prompt_length, task.min_prompt_length + 40, 3 * task.min_prompt_length)
    return [
        task.sample(example_rng(seed, split, index), lengths[index % 3], depth=(index % 5) / 4)
        for index in range(count)
    ]


def occurrences(tokens, pattern):
    width = len(pattern)
    return [i for i in range(len(tokens) - width + 1) if np.array_equal(tokens[i : i + width], pattern)]


def test_every_answer_is_in_its_needle_and_nowhere_else(task):
    lengths = (task.min_prompt_length, task.min_prompt_length + 40, 3 * task.min_prompt_length)
    for index, sample in enumerate(samples(task)):
        assert sample.prompt.dtype == np.int32 and len(sample.prompt) == lengths[index % 3]
        assert len(sample.answer) == task.answer_length
        for answer, source in zip(sample.answers(), sample.answer_sources):
            assert occurrences(sample.prompt, answer) == [source]
            assert any(start <= source and source + len(answer) <= stop for start, stop in sample.needle_spans)


def test_the_depth_places_the_first_needle(task):
    length = 4 * task.min_prompt_length
    starts = [task.sample(example_rng(3, "test", 0), length, depth).needle_spans[0][0] for depth in np.linspace(0, 1, 6)]
    assert starts == sorted(starts) and len(set(starts)) > 3
    header = text.PASSKEY_HEADER if task.name == "passkey" else text.NIAH_HEADER
    assert starts[0] == len(task.vocabulary.encode(header))  # depth 0: right after the header
    assert starts[-1] > 0.7 * length  # depth 1: at the end of the haystack


def decode(task, tokens):
    return task.vocabulary.decode(tokens)


def oracle(task, sample):
    """Answer by reading the prompt's text: find the asked keys' needle lines, as a reader would."""
    text = decode(task, sample.prompt)
    if task.name == "passkey":
        values = re.findall(r"The pass key is (\d+)\. Remember", text)
    else:
        needles = re.findall(r"The code for ([a-z]+-[a-z]+) is (\d+)\.", text[: text.rindex("What")])
        question = text[text.rindex("What") :]
        asked = re.findall(r"[a-z]+-[a-z]+", question.split("?")[0])
        if task.options.variant == "multivalue":
            values = [value for key, value in needles if key == asked[0]]
        else:
            values = [next(value for key, value in needles if key == wanted) for wanted in asked]
    return task.vocabulary.encode(", ".join(values))


def test_an_oracle_reading_the_context_scores_one_and_a_constant_scores_at_chance(task):
    batch = samples(task, count=40)
    assert np.mean([score_answer(oracle(task, sample), sample) for sample in batch]) == 1.0
    constant = task.vocabulary.encode(", ".join(["1" * len(a) for a in batch[0].answers()]))
    assert len(constant) == task.answer_length
    # Exact match on numbers of five or more digits: chance is at most 1e-5 per answer.
    assert np.mean([score_answer(constant, sample) for sample in batch]) == 0.0
    # Scoring is per answer, averaged: one right answer out of n scores 1/n.
    sample = batch[0]
    partly = sample.answer.copy()
    partly[sample.answer_spans[0][0] : sample.answer_spans[0][1]] = constant[: len(sample.answers()[0])]
    expected = (len(sample.answer_spans) - 1) / len(sample.answer_spans)
    assert score_answer(partly, sample) == pytest.approx(expected)


def test_the_question_asks_for_the_answered_keys():
    task = NEEDLE_TASKS["niah"].from_task_options({"variant": "multiquery", "haystack": "kv", "num_needles": 3})
    for sample in samples(task, count=10):
        text = decode(task, sample.prompt)
        asked = re.findall(r"[a-z]+-[a-z]+", text[text.rindex("What") :])
        lines = dict(re.findall(r"The code for ([a-z]+-[a-z]+) is (\d+)\.", text[: text.rindex("What")]))
        assert [lines[key] for key in asked] == decode(task, sample.answer).split(", ")


@pytest.mark.parametrize("name,options", [CASES["passkey"], CASES["multivalue-essay"], CASES["single-essay-words"]])
def test_training_examples_score_the_answer_and_are_seeded_per_split(name, options):
    task = NEEDLE_TASKS[name].from_task_options(options)
    seq_len = task.min_prompt_length + task.answer_length + 20
    cfg = DataConfig(source=name, seq_len=seq_len, batch_size=2, task=options)
    assert data.labels_per_example(cfg) == task.answer_length
    assert data.tokenizer_vocab_size(cfg) == task.vocabulary.vocab_size
    train, held_out = data.split_dataset(cfg, "train"), data.split_dataset(cfg, "eval")
    for index in range(10):
        example = train[index]
        assert example["inputs"].shape == (seq_len,)
        np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])
        scored = np.flatnonzero(example["mask"])
        np.testing.assert_array_equal(scored, np.arange(seq_len - task.answer_length, seq_len))
        rng = example_rng(0, "train", index)
        sample = task.sample(rng, seq_len + 1 - task.answer_length, depth=float(rng.uniform()))
        np.testing.assert_array_equal(example["targets"][scored], sample.answer)
        np.testing.assert_array_equal(train[index]["inputs"], example["inputs"])
        assert not np.array_equal(held_out[index]["inputs"], example["inputs"])


def test_word_vocabulary_round_trips_the_task_text():
    text = "The code for amber-falcon is 123456. What is the code for amber-falcon?"
    assert WORDS.decode(WORDS.encode(text)) == text
    with pytest.raises(ValueError, match="no token for 'zebra'"):
        WORDS.encode("a zebra")


def test_bad_options_and_short_lengths_name_the_field():
    with pytest.raises(ConfigError, match=r"data\.task\.haystack: must be one of noise, essay, kv"):
        DataConfig(source="niah", task={"haystack": "essays"})
    with pytest.raises(ConfigError, match=r"data\.task\.vocabulary: must be one of bytes, words"):
        DataConfig(source="passkey", task={"vocabulary": "chars"})
    with pytest.raises(ConfigError, match=r"data\.seq_len: 64 is too short for passkey .* data\.seq_len >= \d+"):
        DataConfig(source="passkey", seq_len=64)
