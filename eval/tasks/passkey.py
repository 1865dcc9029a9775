"""Passkey retrieval in the landmark-attention format (Mohtashami & Jaggi, 2023).

A header says a pass key is hidden; a filler line repeats; one line states a random
pass key once, at the chosen depth; more filler; then the question, which the answer
(the key's digits) continues. Scored by exact match on the key's tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eval.tasks import text
from eval.tasks.common import NeedleOptions, NeedleSample, NeedleTask, register_needle_task


@dataclasses.dataclass(frozen=True)
class PasskeyOptions(NeedleOptions):
    digits: int = 5

    def validate(self) -> None:
        super().validate()
        self.check(1 <= self.digits <= 18, "digits", "must lie in [1, 18]")


@register_needle_task
class Passkey(NeedleTask):
    name = "passkey"
    options_class = PasskeyOptions

    def _key_line(self, key: str, depth: float) -> text.Needle:
        before, after = text.PASSKEY_LINE
        return text.needle_from_pieces(self.vocabulary, [(before, False), (key, True), (after, False)], depth)

    @property
    def answer_length(self) -> int:
        return len(self.vocabulary.encode("9" * self.options.digits))

    @property
    def min_prompt_length(self) -> int:
        fixed = text.PASSKEY_HEADER + text.PASSKEY_QUESTION
        return len(self.vocabulary.encode(fixed)) + len(self._key_line("9" * self.options.digits, 0.0).tokens)

    def sample(self, rng: np.random.Generator, prompt_length: int, depth: float) -> NeedleSample:
        (key,) = text.random_numbers(rng, 1, self.options.digits)
        line = self._key_line(key, depth)
        prompt, (start,) = text.assemble_prompt(
            self.vocabulary,
            text.PASSKEY_HEADER,
            text.filler_line,
            [line],
            self.vocabulary.encode(text.PASSKEY_QUESTION),
            prompt_length,
            rng,
        )
        answer = self.vocabulary.encode(key)
        return NeedleSample(
            prompt=prompt,
            answer=answer,
            answer_spans=((0, len(answer)),),
            answer_sources=(start + line.answer_offsets[0],),
            needle_spans=((start, start + len(line.tokens)),),
            depth=depth,
        )
