"""A character vocabulary: the sorted set of characters of a text, and encode/decode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharVocab"]


@dataclass(frozen=True)
class CharVocab:
    """Maps characters to ids ``0 .. len(chars) - 1`` in sorted code-point order.

    Attributes:
        chars: the distinct characters, sorted by code point; ``chars[i]`` has id ``i``.
    """

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("CharVocab needs at least one character")
        if any(len(ch) != 1 for ch in self.chars) or list(self.chars) != sorted(set(self.chars)):
            raise ValueError("CharVocab.chars must be distinct single characters in sorted order")

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every character occurring in ``text``."""
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def _codepoints(self) -> np.ndarray:
        return np.fromiter((ord(ch) for ch in self.chars), dtype=np.uint32, count=len(self.chars))

    def encode(self, text: str) -> Tensor:
        """Ids of the characters of ``text`` as a 1-D tensor (``uint8`` when the vocab fits, else ``int32``).

        Raises:
            ValueError: ``text`` holds a character outside the vocabulary.
        """
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = self._codepoints()
        ids = np.searchsorted(table, points)
        ids_clipped = np.minimum(ids, len(table) - 1)
        bad = table[ids_clipped] != points
        if bad.any():
            first = chr(int(points[int(np.argmax(bad))]))
            raise ValueError(f"character {first!r} is not in the vocabulary")
        dtype = np.uint8 if len(table) <= 256 else np.int32
        return torch.from_numpy(ids_clipped.astype(dtype))

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of ids."""
        if ids.dim() != 1:
            raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
        values = ids.detach().cpu().long()
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= len(self.chars)):
            raise ValueError(f"ids must lie in [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in values.tolist())
