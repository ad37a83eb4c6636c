"""Bit packing primitives shared by the codecs and the votes (any torch device).

Bit order everywhere: element ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``;
bits past the last element ("padding") are zero. A multi-bit unsigned vector is stored plane-major:
plane ``j`` holds bit ``j`` of every element in that order, planes least significant first, each
``ceil(numel / 8)`` bytes.

Packing 8 flags into a byte uses one multiply per 64-bit word: with the flag of element ``j`` at bit
``8j + 7`` of a word (the top bit of byte ``j``), multiplying by ``sum_j 2**(49 - 7j)`` moves it to bit
``56 + j`` with no two partial products meeting, so the top byte of the product is the packed byte.
The integer layouts assume a little-endian host (every CPU and GPU torch supports today).
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from .codec import CodecError

if sys.byteorder != "little":  # pragma: no cover - no big-endian torch host exists to test on
    raise ImportError("lioncub codecs require a little-endian host")

__all__ = [
    "all_set",
    "empty",
    "nbytes_for",
    "pack_bool",
    "pack_planes",
    "pack_top_bits",
    "padding_is_zero",
    "unpack_bits",
    "unpack_planes",
    "unpack_signs",
    "words_of",
]

_TOP_BITS = int.from_bytes(b"\x80" * 8, "little") - (1 << 64)  # 0x8080...80 as a signed int64
_GATHER = sum(1 << (49 - 7 * j) for j in range(8))  # bit 8j+7 -> bit 56+j
_LARGE = 1 << 22  # bytes from which a CPU buffer is worth a huge-page allocation


def nbytes_for(numel: int) -> int:
    """Bytes needed for ``numel`` one-bit flags."""
    return (numel + 7) // 8


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor for an output that will be written once.

    Large CPU buffers are allocated by numpy, which advises Linux to back them with transparent huge
    pages; the first touch of a fresh buffer then costs several times less than with torch's default
    allocation (a page fault per 4 KiB), which otherwise dominates decoding. The result is an ordinary
    tensor that owns its memory (it only cannot be resized in place).
    """
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < _LARGE:
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype)


def pack_top_bits(buf: torch.Tensor) -> torch.Tensor:
    """Pack bit 7 of every byte of ``buf`` (length a multiple of 8; consumed as scratch)."""
    words = buf.view(torch.int64)
    words.bitwise_and_(_TOP_BITS)
    words.mul_(_GATHER)  # wraps modulo 2**64; only the top byte is kept
    top = words.view(torch.uint8).view(-1, 8)[:, 7]
    return torch.empty(top.shape, dtype=torch.uint8, device=buf.device).copy_(top)


def pack_bool(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ``nbytes_for(len)`` bytes (zero padding)."""
    n = bits.numel()
    buf = torch.zeros(nbytes_for(n) * 8, dtype=torch.uint8, device=bits.device)
    buf[:n].masked_fill_(bits, 0x80)
    return pack_top_bits(buf)


@functools.lru_cache(maxsize=64)
def _table(device: torch.device, dtype: torch.dtype, low: float, high: float) -> torch.Tensor:
    """256 x 8 table: row b holds ``high`` where bit j of b is set, else ``low``."""
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    bits = (byte >> torch.arange(8, dtype=torch.int32)) & 1
    return torch.where(bits.bool(), high, low).to(device=device, dtype=dtype)


def _lookup(data: torch.Tensor, numel: int, dtype: torch.dtype, low: float, high: float) -> torch.Tensor:
    table = _table(data.device, dtype, low, high)
    out = empty(data.numel() * 8, dtype, data.device)
    torch.index_select(table, 0, data.to(torch.int32), out=out.view(-1, 8))
    return out[:numel]


def unpack_bits(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bool`: a bool tensor of ``numel`` flags."""
    return _lookup(data, numel, torch.bool, 0.0, 1.0)


def unpack_signs(data: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode packed flags to ``+1`` (bit set) / ``-1`` (bit clear) in ``dtype``."""
    return _lookup(data, numel, dtype, -1.0, 1.0)


def padding_is_zero(data: torch.Tensor, numel: int) -> bool:
    """Whether the unused high bits of the last byte of one packed plane are zero."""
    used = numel % 8
    if used == 0:
        return True
    return int(data[nbytes_for(numel) - 1]) >> used == 0


def all_set(data: torch.Tensor, numel: int) -> bool:
    """Whether all ``numel`` flags of one packed plane are set."""
    full, used = divmod(numel, 8)
    if not bool((data[:full] == 0xFF).all()):
        return False
    return used == 0 or int(data[full]) == (1 << used) - 1


def pack_planes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` plane-major (``bits * nbytes_for(numel)`` bytes)."""
    planes = [pack_bool(((values >> j) & 1).bool()) for j in range(bits)]
    return torch.cat(planes) if planes else torch.empty(0, dtype=torch.uint8, device=values.device)


def unpack_planes(data: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: an ``int64`` tensor; :class:`CodecError` on nonzero padding."""
    width = nbytes_for(numel)
    out = torch.zeros(numel, dtype=torch.int64, device=data.device)
    for j in range(bits):
        plane = data[j * width : (j + 1) * width]
        if not padding_is_zero(plane, numel):
            raise CodecError(f"bit plane {j} has nonzero padding bits")
        out.add_(_lookup(plane, numel, torch.int64, 0.0, float(1 << j)))
    return out


def words_of(data: torch.Tensor) -> torch.Tensor:
    """View packed bytes as int64 words (zero-padded copy when the length or offset is unaligned)."""
    if data.numel() % 8 == 0 and data.storage_offset() % 8 == 0 and data.stride(0) == 1:
        return data.view(torch.int64)
    buf = torch.zeros((data.numel() + 7) // 8 * 8, dtype=torch.uint8, device=data.device)
    buf[: data.numel()] = data
    return buf.view(torch.int64)
