"""The concrete codecs and the registry that maps wire names to them.

Every multi-byte header field is little-endian. Bit order is the one of :mod:`._bitpack`: element
``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``, padding bits are zero, and a
multi-bit vector is stored plane-major (plane ``j`` = bit ``j`` of every element, least significant
plane first, each plane ``ceil(numel / 8)`` bytes). Decoders reject any payload the encoder could not
have produced (nonzero padding, out-of-range values, non-finite headers), so one value has one
encoding.
"""

from __future__ import annotations

import functools
import math
import re
import struct

import torch

from . import _bitpack as bp
from ._bitsign import non_finite_error, pack_nonnegative
from .codec import Codec, CodecError, CodecSpec, Encoded

__all__ = [
    "CODEC_NAMES",
    "CODEC_PATTERNS",
    "CountsCodec",
    "FP16Codec",
    "FP32Codec",
    "Int8BlockCodec",
    "PBitCodec",
    "SignCodec",
    "TernaryCodec",
    "check_packed_structure",
    "get_codec",
]

_FP16_MAX = 65504.0


def _vector(x: torch.Tensor, codec: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"codec {codec!r} encodes torch tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise CodecError(f"codec {codec!r} encodes float tensors, got dtype {x.dtype}")
    if x.dim() != 1:
        raise CodecError(
            f"codec {codec!r} encodes 1-D tensors, got shape {tuple(x.shape)}; pass x.reshape(-1)"
        )
    return x


def _as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a byte slice as ``dtype`` (copying when misaligned)."""
    if data.storage_offset() % dtype.itemsize or data.stride(0) != 1:
        data = data.clone()
    return data.view(dtype)


def _read_header(data: torch.Tensor, fmt: str) -> float:
    (value,) = struct.unpack(fmt, data[: struct.calcsize(fmt)].cpu().numpy().tobytes())
    return float(value)


def _header(raw: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


class SignCodec(Codec):
    """One bit per element: the sign. ``"sign1"``.

    Layout: ``ceil(numel / 8)`` bytes; element ``i`` is bit ``i % 8`` of byte ``i // 8``; the bit is 1
    iff ``x >= 0``, so ``+0.0`` and ``-0.0`` both encode as +1 (a fixed choice: the encoding never
    depends on how a zero happened to be signed). Padding bits are 0. Decodes to ``+1.0`` / ``-1.0``.
    """

    spec = CodecSpec("sign1", 1.0, lossless_for_signs=True)

    def encoded_nbytes(self, numel: int) -> int:
        return bp.nbytes_for(numel)

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        return Encoded(self.name, x.numel(), pack_nonnegative(x))

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.check(enc)
        if not bp.padding_is_zero(enc.data, enc.numel):
            raise CodecError("sign1 payload has nonzero padding bits")
        return bp.unpack_signs(enc.data, enc.numel, dtype)


class PBitCodec(Codec):
    """Lion-Cub p-bit quantizer with an L1 scale. ``f"pbit{s}"``, ``1 <= s <= 127``.

    ``q = clip(round(x / scale * s / 2), -s, s)`` (round half to even, in float32) with
    ``scale = mean|x|`` (accumulated in float64, stored as float32); ``scale == 0`` gives all ``q = 0``.
    Layout: float32 ``scale`` (4 bytes), then ``q + s`` as ``b = ceil(log2(2s + 1))`` bit planes,
    plane-major. Decodes to ``q * (2 / s * scale)``.
    """

    def __init__(self, s: int = 1) -> None:
        if not 1 <= s <= 127:
            raise ValueError(f"p-bit levels s must be in [1, 127], got {s}")
        self.s = s
        self.level_bits = (2 * s).bit_length()
        self.spec = CodecSpec(f"pbit{s}", float(self.level_bits))

    def encoded_nbytes(self, numel: int) -> int:
        return 4 + self.level_bits * bp.nbytes_for(numel)

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        scale64 = float(x.abs().mean(dtype=torch.float64)) if x.numel() else 0.0
        if not math.isfinite(scale64):
            raise non_finite_error(x)
        scale = torch.tensor(scale64, dtype=torch.float32, device=x.device)
        if float(scale) > 0:
            q = torch.round(x.float() / scale * (self.s / 2)).clamp_(-self.s, self.s).to(torch.int64)
        else:
            q = torch.zeros(x.numel(), dtype=torch.int64, device=x.device)
        head = scale.reshape(1).view(torch.uint8)
        data = torch.cat([head, bp.pack_planes(q + self.s, self.level_bits)])
        return Encoded(self.name, x.numel(), data)

    def _levels(self, enc: Encoded) -> tuple[torch.Tensor, float]:
        self.check(enc)
        scale = _read_header(enc.data, "<f")
        if not (math.isfinite(scale) and scale >= 0):
            raise CodecError(f"{self.name} payload has an invalid scale {scale}")
        levels = bp.unpack_planes(enc.data[4:], enc.numel, self.level_bits)
        if enc.numel and int(levels.max()) > 2 * self.s:
            raise CodecError(f"{self.name} payload has a level above {2 * self.s}")
        q = (levels - self.s).to(torch.int32)
        if scale == 0 and enc.numel and bool(q.any()):
            raise CodecError(f"{self.name} payload has nonzero levels with a zero scale")
        return q, scale

    def decode_levels(self, enc: Encoded) -> torch.Tensor:
        """The integer levels ``q`` in ``[-s, s]`` as an ``int32`` tensor."""
        return self._levels(enc)[0]

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, scale = self._levels(enc)
        step = torch.tensor(scale, dtype=torch.float32) * (2.0 / self.s)
        return (q.to(torch.float32) * step.to(q.device)).to(dtype)


class FP16Codec(Codec):
    """IEEE half precision. ``"fp16"``.

    Layout: ``2 * numel`` bytes, element ``i`` as a little-endian binary16 at offset ``2i``. Values
    whose magnitude rounds past the fp16 range (``|x| >= 65520``) are refused, never sent as Inf.
    """

    spec = CodecSpec("fp16", 16.0)

    def encoded_nbytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        half = x.to(torch.float16, copy=True).contiguous()
        if half.numel() and not bool(torch.isfinite(half).all()):
            if not bool(torch.isfinite(x).all()):
                raise non_finite_error(x)
            peak = float(x.abs().max())
            raise CodecError(
                f"fp16 cannot represent a value of magnitude {peak:.6g} (max {_FP16_MAX:g}); "
                "scale the vector down or use an int8 codec"
            )
        return Encoded(self.name, x.numel(), half.view(torch.uint8))

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.check(enc)
        half = _as(enc.data, torch.float16)
        if half.numel() and not bool(torch.isfinite(half).all()):
            raise CodecError("fp16 payload contains NaN/Inf")
        return bp.empty(half.numel(), dtype, half.device).copy_(half)


class FP32Codec(Codec):
    """Lossless IEEE single precision. ``"fp32"``: the data-parallel baseline and state downloads.

    Layout: ``4 * numel`` bytes, element ``i`` as a little-endian binary32 at offset ``4i``.
    """

    spec = CodecSpec("fp32", 32.0)

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        single = x.to(torch.float32, copy=True).contiguous()
        if single.numel() and not bool(torch.isfinite(single).all()):
            raise non_finite_error(x)
        return Encoded(self.name, x.numel(), single.view(torch.uint8))

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.check(enc)
        single = _as(enc.data, torch.float32)
        if single.numel() and not bool(torch.isfinite(single).all()):
            raise CodecError("fp32 payload contains NaN/Inf")
        return bp.empty(single.numel(), dtype, single.device).copy_(single)


class Int8BlockCodec(Codec):
    """Blockwise absmax int8. ``"int8"`` for 256-element blocks, ``f"int8b{block}"`` otherwise.

    The vector is cut into ``k = ceil(numel / block)`` blocks (the last may be short). Layout: ``k``
    float32 scales (``scale = max |x|`` over the block), then ``numel`` int8 values
    ``q = round(x / scale * 127)`` (half to even, in float32; 0 where ``scale == 0``), so
    ``|q| <= 127``. Decodes to ``q * (scale / 127)``.
    """

    def __init__(self, block: int = 256) -> None:
        if block < 1:
            raise ValueError(f"int8 block size must be >= 1, got {block}")
        self.block = block
        name = "int8" if block == 256 else f"int8b{block}"
        self.spec = CodecSpec(name, 8.0 + 32.0 / block)

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * self._blocks(numel) + numel

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        n, k = x.numel(), self._blocks(x.numel())
        padded = torch.zeros(k * self.block, dtype=torch.float32, device=x.device)
        padded[:n] = x
        rows = padded.view(k, self.block)
        scale = rows.abs().amax(dim=1) if k else torch.zeros(0, device=x.device)
        if k and not bool(torch.isfinite(scale).all()):
            raise non_finite_error(x)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        q = torch.round(rows / safe * 127).clamp_(-127, 127).to(torch.int8).view(-1)[:n]
        return Encoded(self.name, n, torch.cat([scale.view(torch.uint8), q.view(torch.uint8)]))

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.check(enc)
        n, k = enc.numel, self._blocks(enc.numel)
        scale = _as(enc.data[: 4 * k], torch.float32)
        if k and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise CodecError(f"{self.name} payload has a negative or non-finite block scale")
        q = enc.data[4 * k :].view(torch.int8)
        if n and int(q.min()) < -127:
            raise CodecError(f"{self.name} payload has the value -128, outside [-127, 127]")
        step, full = scale / 127, n // self.block * self.block
        out = bp.empty(n, torch.float32, q.device)
        torch.mul(
            q[:full].view(-1, self.block), step[: n // self.block, None], out=out[:full].view(-1, self.block)
        )
        torch.mul(q[full:], step[-1:], out=out[full:])
        return out.to(dtype)


class TernaryCodec(Codec):
    """Values in {-1, 0, +1}: the result of a vote. ``"tern"``.

    Layout: one flag byte (0: no zero present; 1: zeros present), the sign plane (``ceil(numel / 8)``
    bytes, bit 1 means +1), then, only when the flag is 1, the nonzero plane (bit 1 means the value is
    not 0). A zero element has sign bit 0, and the flag is 1 only when some element is 0, so the size is
    ``1 + ceil(numel / 8)`` without ties and ``1 + 2 * ceil(numel / 8)`` with them;
    :meth:`encoded_nbytes` gives the larger. ``encode`` stores ``sign(x)`` (both zeros give 0).
    """

    spec = CodecSpec("tern", 1.0, lossless_for_signs=True)

    def encoded_nbytes(self, numel: int) -> int:
        return 1 + 2 * bp.nbytes_for(numel)

    def valid_nbytes(self, numel: int) -> tuple[int, ...]:
        width = bp.nbytes_for(numel)
        return (1 + width, 1 + 2 * width) if width else (1,)

    def from_planes(self, sign: torch.Tensor, nonzero: torch.Tensor | None, numel: int) -> Encoded:
        """Assemble a payload from packed planes; pass ``nonzero=None`` when no element is 0."""
        flag = torch.tensor([0 if nonzero is None else 1], dtype=torch.uint8, device=sign.device)
        planes = [flag, sign] if nonzero is None else [flag, sign, nonzero]
        return Encoded(self.name, numel, torch.cat(planes))

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise non_finite_error(x)
        zero = x == 0
        nonzero = bp.pack_bool(~zero) if bool(zero.any()) else None
        return self.from_planes(bp.pack_bool(x > 0), nonzero, x.numel())

    def has_zeros(self, enc: Encoded) -> bool:
        """The flag byte of a payload whose size :meth:`check` accepted: whether a nonzero plane follows.

        :class:`CodecError` when the flag does not match the size (a flag other than 0 or 1 included).
        """
        flag = int(enc.data[0])
        if flag != int(enc.nbytes > 1 + bp.nbytes_for(enc.numel)):
            raise CodecError(f"tern payload of {enc.nbytes} bytes for {enc.numel} elements has flag {flag}")
        return bool(flag)

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.check(enc)
        width = bp.nbytes_for(enc.numel)
        flag = self.has_zeros(enc)
        sign = enc.data[1 : 1 + width]
        if not bp.padding_is_zero(sign, enc.numel):
            raise CodecError("tern sign plane has nonzero padding bits")
        values = bp.unpack_signs(sign, enc.numel, dtype)
        if flag:
            nonzero = enc.data[1 + width :]
            if not bp.padding_is_zero(nonzero, enc.numel):
                raise CodecError("tern nonzero plane has nonzero padding bits")
            if bool((sign & ~nonzero).any()):
                raise CodecError("tern payload has a sign bit set on a zero element")
            if bp.all_set(nonzero, enc.numel):
                raise CodecError("tern payload has flag 1 but no zero element")
            values.masked_fill_(~bp.unpack_bits(nonzero, enc.numel), 0)
        return values


class CountsCodec(Codec):
    """Vote tallies for the ``avg`` reduction. ``f"counts{bits}"``, ``1 <= bits <= 32``.

    Layout: uint32 total weight ``W`` (``1 <= W < 2**bits``), then the per-element weighted count
    of +1 votes ``c`` (``0 <= c <= W``) as ``bits`` bit planes, plane-major. Decodes to ``(2c - W) / W``
    in [-1, 1]. ``encode`` quantizes ``x`` in [-1, 1] on the grid of ``W = 2**bits - 1``.
    """

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 32:
            raise ValueError(f"counts width must be in [1, 32] bits, got {bits}")
        self.bits = bits
        self.spec = CodecSpec(f"counts{bits}", float(bits))

    def encoded_nbytes(self, numel: int) -> int:
        return 4 + self.bits * bp.nbytes_for(numel)

    def from_planes(self, planes: torch.Tensor, numel: int, total: int) -> Encoded:
        """Assemble a payload from ``bits`` packed count planes (concatenated, least significant first)."""
        if not 1 <= total < 1 << self.bits:
            raise CodecError(f"{self.name}: total weight {total} outside [1, {(1 << self.bits) - 1}]")
        enc = Encoded(self.name, numel, torch.cat([_header(struct.pack("<I", total), planes.device), planes]))
        self.check(enc)
        return enc

    def encode_counts(self, counts: torch.Tensor, total: int) -> Encoded:
        """Encode integer counts ``0 <= c <= total``."""
        if counts.numel() and not (int(counts.min()) >= 0 and int(counts.max()) <= total):
            raise CodecError(f"{self.name}: counts must lie in [0, {total}]")
        return self.from_planes(bp.pack_planes(counts.to(torch.int64), self.bits), counts.numel(), total)

    def encode(self, x: torch.Tensor) -> Encoded:
        x = _vector(x, self.name)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise non_finite_error(x)
        if x.numel() and float(x.abs().max()) > 1:
            raise CodecError(f"{self.name} encodes values in [-1, 1]; got magnitude {float(x.abs().max())}")
        total = (1 << self.bits) - 1
        return self.encode_counts(torch.round((x.double() + 1) * (total / 2)).to(torch.int64), total)

    def total_weight(self, enc: Encoded) -> int:
        """The header ``W`` of a payload whose size :meth:`check` accepted; :class:`CodecError` if out of range."""
        total = int(_read_header(enc.data, "<I"))
        if not 1 <= total < 1 << self.bits:
            raise CodecError(
                f"{self.name} payload has total weight {total} outside [1, {(1 << self.bits) - 1}]"
            )
        return total

    def decode_counts(self, enc: Encoded) -> tuple[torch.Tensor, int]:
        """The ``int64`` counts and the total weight ``W``."""
        self.check(enc)
        total = self.total_weight(enc)
        counts = bp.unpack_planes(enc.data[4:], enc.numel, self.bits)
        if enc.numel and int(counts.max()) > total:
            raise CodecError(f"{self.name} payload has a count above the total weight {total}")
        return counts, total

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        counts, total = self.decode_counts(enc)
        return ((2 * counts - total).to(torch.float64) / total).to(dtype)


CODEC_NAMES: tuple[str, ...] = ("sign1", "tern", "fp16", "fp32", "int8")
"""Wire names with no parameter."""

CODEC_PATTERNS: tuple[str, ...] = (
    "pbit{s} (1 <= s <= 127)",
    "counts{bits} (1 <= bits <= 32)",
    "int8b{block}",
)
"""Parameterised wire names (decimal, no leading zeros; ``int8b256`` is spelled ``int8``)."""

_FIXED: dict[str, type[Codec]] = {
    "sign1": SignCodec,
    "tern": TernaryCodec,
    "fp16": FP16Codec,
    "fp32": FP32Codec,
}
_PATTERN = re.compile(r"(pbit|counts|int8b)([1-9][0-9]{0,5})")


@functools.lru_cache(maxsize=128)
def get_codec(name: str) -> Codec:
    """The codec whose wire name is ``name``; :class:`CodecError` (listing the names) if unknown."""
    known = ", ".join(CODEC_NAMES + CODEC_PATTERNS)
    if name in _FIXED:
        return _FIXED[name]()
    if name == "int8":
        return Int8BlockCodec()
    match = _PATTERN.fullmatch(name)
    if match is not None:
        kind, value = match.group(1), int(match.group(2))
        try:
            if kind == "pbit":
                return PBitCodec(value)
            if kind == "counts":
                return CountsCodec(value)
            if value != 256:
                return Int8BlockCodec(value)
        except ValueError as err:
            raise CodecError(f"bad codec name {name!r}: {err}; known: {known}") from None
    raise CodecError(f"unknown codec name {name!r}; known: {known}")


def check_packed_structure(enc: Encoded) -> None:
    """O(1) checks of a sign1 / tern / counts payload whose size the codec already accepted.

    Bit planes are ``ceil(numel / 8)`` bytes whose unused high bits of the last byte are zero; tern
    has a flag byte saying whether its nonzero plane follows (:meth:`TernaryCodec.has_zeros`);
    counts has a uint32 total ``1 <= W < 2**bits`` before its ``bits`` planes
    (:meth:`CountsCodec.total_weight`). Raises :class:`CodecError`.
    """
    width = bp.nbytes_for(enc.numel)
    if enc.codec == "sign1":
        starts = [0]
    elif enc.codec == "tern":
        starts = [1, 1 + width] if TernaryCodec().has_zeros(enc) else [1]
    elif enc.codec.startswith("counts"):
        counts = CountsCodec(int(enc.codec[len("counts") :]))
        counts.total_weight(enc)
        starts = [4 + j * width for j in range(counts.bits)]
    else:
        raise CodecError(f"{enc.codec!r} is not a packed sign codec")
    if not all(bp.padding_is_zero(enc.data[start : start + width], enc.numel) for start in starts):
        raise CodecError(f"{enc.codec} payload has nonzero padding bits")
