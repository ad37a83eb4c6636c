"""The codec interface: how a float vector becomes bytes on the wire and back.

Every codec turns a 1-D float tensor (any float dtype, any length, contiguous or not) into an
:class:`Encoded` value: a flat ``uint8`` tensor plus the element count and the codec's id. The byte
layout of each codec is fixed and documented in its class, so the wire layer can move ``Encoded.data``
as opaque bytes and the receiver can check its size with :meth:`Codec.encoded_nbytes` before it
decodes anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

__all__ = ["Codec", "CodecError", "CodecSpec", "Encoded"]


class CodecError(ValueError):
    """Raised when bytes cannot be decoded by a codec (wrong size, wrong codec, bad values)."""


@dataclass(frozen=True)
class CodecSpec:
    """What a codec is, as data: its wire id and its nominal cost.

    Attributes:
        name: stable identifier used on the wire and in configs (e.g. ``"sign1"``).
        bits_per_param: nominal bits per element, excluding any fixed header.
        lossless_for_signs: whether decoding returns exactly ``sign(x)`` for every element.
    """

    name: str
    bits_per_param: float
    lossless_for_signs: bool = False


@dataclass(frozen=True)
class Encoded:
    """A vector encoded by a codec.

    Attributes:
        codec: the :attr:`CodecSpec.name` of the codec that produced it.
        numel: number of elements of the original vector.
        data: flat, contiguous ``torch.uint8`` tensor (on CPU or on the device it was encoded on).
    """

    codec: str
    numel: int
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def to_bytes(self) -> bytes:
        return bytes(self.data.detach().cpu().contiguous().numpy().tobytes())


class Codec(ABC):
    """Pack / unpack a 1-D float vector; one instance per configuration (stateless otherwise)."""

    spec: CodecSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def bits_per_param(self) -> float:
        """Nominal bits per element, excluding fixed headers."""
        return self.spec.bits_per_param

    @abstractmethod
    def encoded_nbytes(self, numel: int) -> int:
        """Exact size in bytes of ``encode(x).data`` for a vector of ``numel`` elements."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Encoded:
        """Encode a 1-D float tensor. Raises :class:`CodecError` on non-finite input."""

    @abstractmethod
    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode to a 1-D tensor of ``enc.numel`` elements on ``enc.data``'s device.

        Raises :class:`CodecError` when ``enc`` was not produced by this codec or has the wrong size.
        """

    def check(self, enc: Encoded) -> None:
        """Validate that ``enc`` could have been produced by this codec (id and size)."""
        if enc.codec != self.name:
            raise CodecError(f"payload was encoded with codec {enc.codec!r}, expected {self.name!r}")
        if enc.numel < 0:
            raise CodecError(f"element count must be >= 0, got {enc.numel}")
        if enc.data.dtype != torch.uint8 or enc.data.dim() != 1:
            raise CodecError("payload must be a flat uint8 tensor")
        sizes = self.valid_nbytes(enc.numel)
        if enc.nbytes not in sizes:
            want = " or ".join(str(size) for size in sizes)
            raise CodecError(
                f"codec {self.name!r}: {enc.numel} elements need {want} bytes, payload has {enc.nbytes}"
            )

    def valid_nbytes(self, numel: int) -> tuple[int, ...]:
        """Every payload size :meth:`check` accepts; variable-size codecs override this."""
        return (self.encoded_nbytes(numel),)
