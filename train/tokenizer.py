"""Tokenizers: UTF-8 bytes (the default, nothing to download) and SentencePiece.

Both share one small interface: `vocab_size`, `eos_id` (the token the data pipeline
puts between documents), `encode(text) -> int32 ids` and `decode(ids) -> str`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from train.config import DataConfig


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids, int32[n], without an end-of-document token. Bytes are read as UTF-8."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids. Never raises: ids a padded model vocabulary can emit beyond the
        tokenizer's own decode as a replacement mark."""


class ByteTokenizer:
    """One token per UTF-8 byte. Byte 0 (NUL, absent from real text) separates documents."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, np.int64)
        # A model with a padded vocabulary can emit ids >= 256; 0xFF is never valid
        # UTF-8, so such ids show up as U+FFFD instead of wrapping onto real bytes.
        data = np.where((ids >= 0) & (ids < 256), ids, 0xFF).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained SentencePiece model. Documents end with the model's eos id (0 if it has none)."""

    def __init__(self, model_path: str):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path!r} does not exist; expected a .model file written by "
                "sentencepiece.SentencePieceTrainer"
            )
        self.model_path = model_path
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._processor.get_piece_size())
        eos_id = int(self._processor.eos_id())
        # SentencePiece reports -1 when the model was trained with eos disabled (eos_id=-1).
        self.eos_id = eos_id if eos_id >= 0 else 0

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._processor.encode(text), np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, self._processor.unk_id())
        return self._processor.decode(ids.tolist())

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def make_tokenizer(cfg: DataConfig) -> ByteTokenizer | SentencePieceTokenizer:
    if cfg.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(cfg.spm_model)
    return ByteTokenizer()
