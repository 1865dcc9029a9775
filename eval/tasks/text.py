"""Generated text for the needle tasks: vocabularies, haystack sentences, and prompt assembly.

Two vocabularies: "bytes" (UTF-8 bytes, the training pipeline's default tokenizer) and
"words", a closed word-level vocabulary of every word these generators can write, each
digit and punctuation mark its own token. Haystack text never contains a digit, so a
number in a prompt comes only from a needle (or, in the "kv" haystack, a distractor
line whose number differs from every asked one).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from train.tokenizer import ByteTokenizer

# Short sentences repeated as filler: the passkey haystack and the "noise" haystack.
FILLER_SENTENCES = (
    "The fields are quiet. ",
    "The river is wide and slow. ",
    "The wind moves through the trees. ",
    "On and on it goes. ",
)

# A small grammar for natural-looking essay sentences: subject, verb, object, ending.
ESSAY_SUBJECTS = (
    "The old painter", "A young farmer", "Our neighbor", "The small village", "My brother",
    "The traveling musician", "A careful student", "The town council", "Her grandmother", "The night guard",
)
ESSAY_VERBS = (
    "remembers", "builds", "finds", "watches", "carries", "paints", "follows", "visits", "describes", "keeps",
    "sells", "repairs",
)
ESSAY_OBJECTS = (
    "a long road", "the morning light", "an empty boat", "the winter market", "a wooden bridge",
    "the last letter", "a quiet garden", "the stone tower", "an old map", "the harvest songs",
)
ESSAY_ENDINGS = (
    "before the rain", "after dinner", "near the harbor", "every spring", "with great care", "without a word",
    "in the late afternoon", "for the whole family", "at the edge of town", "when nobody is looking",
)

# Needle keys are "adjective-noun" pairs from words the essay grammar never uses.
KEY_ADJECTIVES = (
    "amber", "brisk", "crimson", "dusty", "eager", "frosty", "golden", "hollow", "ivory", "jolly",
    "lunar", "misty", "noble", "olive", "proud", "rapid", "silver", "tidy", "velvet", "witty",
)
KEY_NOUNS = (
    "falcon", "lantern", "meadow", "pebble", "comet", "thistle", "otter", "anchor", "willow", "badger",
    "crystal", "fjord", "glacier", "heron", "island", "juniper", "kettle", "magnet", "nectar", "orchid",
)

PASSKEY_HEADER = "A pass key is hidden in the text below. Find it and remember it; you will be asked for it at the end. "
PASSKEY_LINE = ("The pass key is ", ". Remember it. ")  # around the key
PASSKEY_QUESTION = "What is the pass key? The pass key is "

NIAH_HEADER = "Some codes are hidden in the text below. Memorize them; a question about them follows. "
NEEDLE_LINE = ("The code for ", " is ", ". ")  # around the key and the value
QUESTION_ONE = ("What is the code for ", "? The code for ", " is ")  # around the key, twice
QUESTION_ALL_VALUES = ("What are all the codes for ", "? The codes for ", " are ")
QUESTION_MANY_KEYS = ("What are the codes for ", "? The codes are ")  # around the list of keys
ANSWER_SEPARATOR = ", "

_WORD_PATTERN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


class ByteVocabulary:
    """UTF-8 bytes, as train.tokenizer.ByteTokenizer encodes text for training."""

    name = "bytes"

    def __init__(self):
        self._tokenizer = ByteTokenizer()
        self.vocab_size = self._tokenizer.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return self._tokenizer.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode(ids)


class WordVocabulary:
    """A closed word-level vocabulary: every word of these generators, each digit and punctuation mark."""

    name = "words"

    def __init__(self, words: Sequence[str]):
        self._words = tuple(words)
        self._ids = {word: index for index, word in enumerate(self._words)}
        self.vocab_size = len(self._words)

    def encode(self, text: str) -> np.ndarray:
        pieces = _WORD_PATTERN.findall(text)
        unknown = [piece for piece in pieces if piece not in self._ids]
        if unknown:
            raise ValueError(f"the word vocabulary has no token for {unknown[0]!r}; it covers only the task texts")
        return np.array([self._ids[piece] for piece in pieces], np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        words = [self._words[i] if 0 <= i < self.vocab_size else "\ufffd" for i in np.asarray(ids).tolist()]
        text = re.sub(r" ([.,?;:!])", r"\1", " ".join(words)).replace(" - ", "-")
        return re.sub(r"(?<=\d) (?=\d)", "", text)  # digits of one number are separate tokens


def _all_texts() -> list[str]:
    fragments = [
        *FILLER_SENTENCES, *ESSAY_SUBJECTS, *ESSAY_VERBS, *ESSAY_OBJECTS, *ESSAY_ENDINGS, *KEY_ADJECTIVES,
        *KEY_NOUNS, PASSKEY_HEADER, *PASSKEY_LINE, PASSKEY_QUESTION, NIAH_HEADER, *NEEDLE_LINE, *QUESTION_ONE,
        *QUESTION_ALL_VALUES, *QUESTION_MANY_KEYS, ANSWER_SEPARATOR, "-",
    ]
    return fragments + [str(digit) for digit in range(10)]


WORDS = WordVocabulary(sorted({piece for text in _all_texts() for piece in _WORD_PATTERN.findall(text)}))
BYTES = ByteVocabulary()
VOCABULARIES = {"bytes": BYTES, "words": WORDS}


# ---------------------------------------------------------------------------
# Haystack sentences


def filler_sentence(index: int, rng: np.random.Generator) -> str:
    return FILLER_SENTENCES[index % len(FILLER_SENTENCES)]


def filler_line(index: int, rng: np.random.Generator) -> str:
    """All filler sentences as one repeated line (the passkey format's unit)."""
    return "".join(FILLER_SENTENCES)


def essay_sentence(index: int, rng: np.random.Generator) -> str:
    parts = (ESSAY_SUBJECTS, ESSAY_VERBS, ESSAY_OBJECTS, ESSAY_ENDINGS)
    return " ".join(part[rng.integers(len(part))] for part in parts) + ". "


def random_keys(rng: np.random.Generator, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """`count` distinct adjective-noun keys, none of them in `exclude`."""
    excluded = set(exclude)
    keys: list[str] = []
    while len(keys) < count:
        key = f"{KEY_ADJECTIVES[rng.integers(len(KEY_ADJECTIVES))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"
        if key not in excluded:
            excluded.add(key)
            keys.append(key)
    return keys


def random_numbers(rng: np.random.Generator, count: int, digits: int, exclude: Sequence[str] = ()) -> list[str]:
    """`count` distinct numbers of exactly `digits` digits (no leading zero), none of them in `exclude`."""
    excluded = set(exclude)
    numbers: list[str] = []
    while len(numbers) < count:
        number = str(rng.integers(10 ** (digits - 1), 10**digits))
        if number not in excluded:
            excluded.add(number)
            numbers.append(number)
    return numbers


def longest_key() -> str:
    return f"{max(KEY_ADJECTIVES, key=len)}-{max(KEY_NOUNS, key=len)}"


# ---------------------------------------------------------------------------
# Prompt assembly


@dataclasses.dataclass(frozen=True)
class Needle:
    """A line to hide: its tokens and, for each answer it carries, the answer's offset in them."""

    tokens: np.ndarray
    answer_offsets: tuple[int, ...]
    depth: float


def needle_from_pieces(vocabulary, pieces: Sequence[tuple[str, bool]], depth: float) -> Needle:
    """Encode (text, is_answer) pieces one by one, so each answer's offset is known exactly."""
    tokens, offsets, length = [], [], 0
    for text, is_answer in pieces:
        encoded = vocabulary.encode(text)
        if is_answer:
            offsets.append(length)
        tokens.append(encoded)
        length += len(encoded)
    return Needle(np.concatenate(tokens).astype(np.int32), tuple(offsets), depth)


def assemble_prompt(
    vocabulary,
    header: str,
    sentence: Callable[[int, np.random.Generator], str],
    needles: Sequence[Needle],
    question: np.ndarray,
    prompt_length: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[int]]:
    """(prompt int32[prompt_length], start of each needle): header, haystack with the needles, question.

    The haystack fills exactly the room left (its last sentence cut short where needed);
    each needle goes at the sentence boundary nearest its depth (0: first, 1: last).
    """
    head = vocabulary.encode(header)
    room = prompt_length - len(head) - sum(len(needle.tokens) for needle in needles) - len(question)
    if room < 0:
        raise ValueError(f"a prompt of {prompt_length} tokens cannot hold the header, needles and question")
    sentences, filled = [], 0
    while filled < room:
        encoded = vocabulary.encode(sentence(len(sentences), rng))[: room - filled]
        sentences.append(encoded)
        filled += len(encoded)
    boundaries = np.cumsum([0] + [len(s) for s in sentences])
    slots = [int(np.argmin(np.abs(boundaries - needle.depth * room))) for needle in needles]
    pieces, starts, position = [head], [0] * len(needles), len(head)
    for boundary in range(len(sentences) + 1):
        for index in (i for i, slot in enumerate(slots) if slot == boundary):
            starts[index] = position
            pieces.append(needles[index].tokens)
            position += len(needles[index].tokens)
        if boundary < len(sentences):
            pieces.append(sentences[boundary])
            position += len(sentences[boundary])
    pieces.append(question)
    prompt = np.concatenate(pieces).astype(np.int32)
    assert len(prompt) == prompt_length
    return prompt, starts
