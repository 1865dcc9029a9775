"""Needle in a haystack: the synthetic family of RULER (Hsieh et al., 2024), on generated text.

A needle is a line "The code for KEY is VALUE." with an adjective-noun KEY and a
VALUE of `value_digits` digits. Variants:

- single: one needle, asked.
- multikey: `num_needles` needles with different keys; one of them is asked.
- multivalue: `num_values` needles with one key and different values; all values are
  asked, in the order they appear.
- multiquery: `num_needles` needles with different keys; all are asked at once, the
  answer listing their values in the question's order.

Haystacks: "noise" (the same few sentences repeated), "essay" (natural-looking
sentences from a small grammar) and "kv" (distractor needle lines with other keys and
other values). Needle 0 goes at the requested depth, further needles at uniformly
random depths. Each asked answer is scored by exact match, and a sample's score is the
mean over its answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from eval.tasks import text
from eval.tasks.common import NeedleOptions, NeedleSample, NeedleTask, register_needle_task

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("noise", "essay", "kv")


@dataclasses.dataclass(frozen=True)
class NiahOptions(NeedleOptions):
    variant: str = "single"
    haystack: str = "essay"
    num_needles: int = 4  # multikey: needles in all (one asked); multiquery: needles, all asked
    num_values: int = 4  # multivalue: values of the one key, all asked
    value_digits: int = 6

    def validate(self) -> None:
        super().validate()
        self.check_choice("variant", VARIANTS)
        self.check_choice("haystack", HAYSTACKS)
        self.check(self.num_needles >= 2, "num_needles", "must be >= 2 (the multikey and multiquery needles)")
        self.check(self.num_values >= 2, "num_values", "must be >= 2 (the multivalue needles)")
        self.check(2 <= self.value_digits <= 18, "value_digits", "must lie in [2, 18]")
        max_keys = len(text.KEY_ADJECTIVES) * len(text.KEY_NOUNS)
        self.check(self.num_needles < max_keys, "num_needles", f"must be below {max_keys}, the number of distinct keys")


@register_needle_task
class Niah(NeedleTask):
    name = "niah"
    options_class = NiahOptions

    @property
    def needle_count(self) -> int:
        variant = self.options.variant
        return {"single": 1, "multivalue": self.options.num_values}.get(variant, self.options.num_needles)

    @property
    def asked_count(self) -> int:
        return 1 if self.options.variant in ("single", "multikey") else self.needle_count

    def _needle(self, key: str, value: str, depth: float) -> text.Needle:
        before, middle, after = text.NEEDLE_LINE
        pieces = [(before, False), (key, False), (middle, False), (value, True), (after, False)]
        return text.needle_from_pieces(self.vocabulary, pieces, depth)

    def _question(self, keys: Sequence[str]) -> np.ndarray:
        variant = self.options.variant
        if variant == "multiquery":
            opening, closing = text.QUESTION_MANY_KEYS
            return self.vocabulary.encode(opening + text.ANSWER_SEPARATOR.join(keys) + closing)
        opening, middle, closing = text.QUESTION_ALL_VALUES if variant == "multivalue" else text.QUESTION_ONE
        return self.vocabulary.encode(opening + keys[0] + middle + keys[0] + closing)

    def _joined(self, values: Sequence[str]) -> np.ndarray:
        pieces = []
        for index, value in enumerate(values):
            if index:
                pieces.append(self.vocabulary.encode(text.ANSWER_SEPARATOR))
            pieces.append(self.vocabulary.encode(value))
        return np.concatenate(pieces).astype(np.int32)

    @property
    def answer_length(self) -> int:
        return len(self._joined(["9" * self.options.value_digits] * self.asked_count))

    @property
    def min_prompt_length(self) -> int:
        key, value = text.longest_key(), "9" * self.options.value_digits
        needles = self.needle_count * len(self._needle(key, value, 0.0).tokens)
        return len(self.vocabulary.encode(text.NIAH_HEADER)) + needles + len(self._question([key] * self.needle_count))

    def _haystack(self, keys: Sequence[str], values: Sequence[str]) -> Callable[[int, np.random.Generator], str]:
        if self.options.haystack == "noise":
            return text.filler_sentence
        if self.options.haystack == "essay":
            return text.essay_sentence

        def distractor_line(index: int, rng: np.random.Generator) -> str:
            (key,) = text.random_keys(rng, 1, exclude=keys)
            (value,) = text.random_numbers(rng, 1, self.options.value_digits, exclude=values)
            before, middle, after = text.NEEDLE_LINE
            return before + key + middle + value + after

        return distractor_line

    def sample(self, rng: np.random.Generator, prompt_length: int, depth: float) -> NeedleSample:
        count = self.needle_count
        keys = text.random_keys(rng, 1 if self.options.variant == "multivalue" else count)
        keys = keys * count if len(keys) == 1 else keys
        values = text.random_numbers(rng, count, self.options.value_digits)
        depths = [depth, *rng.uniform(size=count - 1).tolist()]
        needles = [self._needle(key, value, needle_depth) for key, value, needle_depth in zip(keys, values, depths)]
        if self.options.variant == "multiquery":
            asked = rng.permutation(count).tolist()
        else:
            asked = list(range(self.asked_count))
        question = self._question([keys[i] for i in asked])
        prompt, starts = text.assemble_prompt(
            self.vocabulary, text.NIAH_HEADER, self._haystack(keys, values), needles, question, prompt_length, rng
        )
        if self.options.variant == "multivalue":
            asked = sorted(asked, key=lambda i: starts[i])  # values are asked in the order they appear
        answer = self._joined([values[i] for i in asked])
        spans, position = [], 0
        for index in asked:
            width = len(self.vocabulary.encode(values[index]))
            spans.append((position, position + width))
            position += width + len(self.vocabulary.encode(text.ANSWER_SEPARATOR))
        return NeedleSample(
            prompt=prompt,
            answer=answer,
            answer_spans=tuple(spans),
            answer_sources=tuple(starts[i] + needles[i].answer_offsets[0] for i in asked),
            needle_spans=tuple((start, start + len(needle.tokens)) for start, needle in zip(starts, needles)),
            depth=depth,
        )
