"""Packing the signs of a float vector (``x >= 0`` -> 1), refusing NaN/Inf: the sign1 hot path.

Three implementations behind :func:`pack_nonnegative`, which the tests hold to the same bytes:

* :func:`pack_nonnegative_exact`: the plain definition in torch (any dtype, layout and device).
* :func:`pack_nonnegative_numpy`: CPU float32/float64. numpy over cache-sized chunks: a finiteness
  check (the chunk's dot product with itself), the comparison and ``np.packbits``, each reading the
  chunk from cache. numpy's comparison is several times faster than torch's on CPU and, unlike
  torch's thread pool, does not stall when the machine's other cores are busy.
* :func:`pack_nonnegative_high_bytes`: other devices and dtypes, contiguous input. One pass copies the
  byte holding each element's sign bit; cheap byte-wide reductions then rule out NaN/Inf and ``-0.0``
  (the only values whose sign bit disagrees with ``x >= 0``) or defer to the exact path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._bitpack import empty, nbytes_for, pack_bool, pack_top_bits
from .codec import CodecError

__all__ = [
    "non_finite_error",
    "pack_nonnegative",
    "pack_nonnegative_exact",
    "pack_nonnegative_high_bytes",
    "pack_nonnegative_numpy",
]

_CHUNK = 1 << 18  # elements per numpy chunk: 1 MiB of float32, about one core's L2
# Per dtype, the smallest ``high byte & 0x7F`` whose exponent bits could all be ones (NaN/Inf).
_EXP_LIMIT = {torch.float32: 0x7F, torch.bfloat16: 0x7F, torch.float64: 0x7F, torch.float16: 0x7C}


def non_finite_error(x: torch.Tensor) -> CodecError:
    """The error for an input with NaN/Inf values (counted in the message)."""
    bad = int((~torch.isfinite(x)).sum())
    return CodecError(
        f"input has {bad} NaN/Inf value(s) among {x.numel()}; only finite values can be encoded"
    )


def pack_nonnegative(x: torch.Tensor) -> torch.Tensor:
    """Packed flags of ``x >= 0`` for a 1-D float tensor (both zeros give 1).

    Raises :class:`CodecError` if ``x`` has a NaN or an Inf.
    """
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return pack_nonnegative_numpy(x)
    if x.dtype in _EXP_LIMIT and x.stride(0) == 1:
        packed = pack_nonnegative_high_bytes(x)
        if packed is not None:
            return packed
    return pack_nonnegative_exact(x)


def pack_nonnegative_exact(x: torch.Tensor) -> torch.Tensor:
    """Reference implementation, straight from the definition."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise non_finite_error(x)
    return pack_bool(x >= 0)


def pack_nonnegative_numpy(x: torch.Tensor) -> torch.Tensor:
    """CPU float32/float64 path (numpy, chunked)."""
    values = x.detach().numpy()
    n = len(values)
    out = empty(nbytes_for(n), torch.uint8, x.device)
    out_np = out.numpy()
    flags = np.empty(min(n, _CHUNK), dtype=np.bool_)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, n, _CHUNK):
            chunk = values[start : start + _CHUNK]
            # x . x is finite iff every x is, unless a square overflows: then look closer.
            if not math.isfinite(float(np.dot(chunk, chunk))) and not np.isfinite(chunk).all():
                raise non_finite_error(x)
            hits = flags[: len(chunk)]
            np.greater_equal(chunk, 0, out=hits)
            out_np[start // 8 : start // 8 + nbytes_for(len(chunk))] = np.packbits(hits, bitorder="little")
    return out


def pack_nonnegative_high_bytes(x: torch.Tensor) -> torch.Tensor | None:
    """Contiguous float16/bfloat16/float32/float64 path; ``None`` when the exact path must decide.

    The high byte of each element is its sign plus the top exponent bits. A NaN/Inf needs those
    exponent bits all one, and ``-0.0`` (sign set, yet ``>= 0``) needs them all zero; values that
    merely share such a high byte (huge or tiny magnitudes) are rare, so when any is present the
    caller falls back to the exact path.
    """
    limit = _EXP_LIMIT[x.dtype]
    n, size = x.numel(), x.element_size()
    buf = torch.empty(nbytes_for(n) * 8, dtype=torch.uint8, device=x.device)
    head = buf[:n]
    head.copy_(x.view(torch.uint8).view(n, size)[:, size - 1])
    buf[n:].fill_(0x80)  # sign set: packed as 0 after the final inversion
    s_min, s_max = torch.aminmax(head.view(torch.int8))
    suspicious = torch.stack([s_max >= limit, head.max() >= (0x80 | limit), s_min <= -1 - limit])
    if bool(suspicious.any()):
        return None
    return pack_top_bits(buf).bitwise_not_()
