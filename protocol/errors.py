"""Domain errors of the wire layer and their gRPC status codes, mapped in one place.

Every check in :mod:`lioncub.protocol` raises a subclass of :class:`ProtocolError` whose message
names the problem. A servicer catches ``ProtocolError`` once and calls :func:`abort_rpc`; the
status code comes from :data:`_STATUS_BY_CATEGORY`, the only table that maps errors to codes:

==============================  ======================  ==============================================
category                        gRPC status             raised for
==============================  ======================  ==============================================
:class:`InvalidMessage`         ``INVALID_ARGUMENT``    unknown codec or protocol version, impossible
                                                        sizes, chunks out of order / missing /
                                                        duplicate, digest mismatch, payloads the codec
                                                        rejects, NaN/Inf in float payloads,
                                                        group / shard / purpose / exchange that do not
                                                        match the stream, malformed ids, config JSON or group plans
:class:`NotAuthenticated`       ``UNAUTHENTICATED``     missing or bad signature, peer id that does not
                                                        match its key, missing / wrong / expired swarm
                                                        admission proof
:class:`PermissionDenied`       ``PERMISSION_DENIED``   sender not in the group, public key not on the
                                                        swarm's allow-list
:class:`PreconditionFailed`     ``FAILED_PRECONDITION`` stale or future round, unknown group or run
:class:`TooLarge`               ``RESOURCE_EXHAUSTED``  chunk, payload or message over its size limit
:class:`Unavailable`            ``UNAVAILABLE``         a result that was not ready before the deadline
==============================  ======================  ==============================================
"""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio

__all__ = [
    "AdmissionDenied",
    "BadSignature",
    "ChunkOrderError",
    "DigestMismatch",
    "FutureRound",
    "InvalidMessage",
    "InvalidPayload",
    "NonFinitePayload",
    "NotAMember",
    "NotAllowListed",
    "NotAuthenticated",
    "PermissionDenied",
    "PreconditionFailed",
    "ProtocolError",
    "SizeError",
    "StaleRound",
    "TooLarge",
    "Unavailable",
    "UnknownCodec",
    "UnknownGroup",
    "UnsupportedVersion",
    "WrongRun",
    "abort_rpc",
    "to_grpc_status",
]


class ProtocolError(Exception):
    """Base of every error raised while checking what came from the network."""

    @property
    def status(self) -> grpc.StatusCode:
        """The gRPC status code this error is reported with."""
        return to_grpc_status(self)[0]


# --- the categories: each maps to one gRPC status code --------------------------------------


class InvalidMessage(ProtocolError):
    """The message is malformed or inconsistent (``INVALID_ARGUMENT``)."""


class NotAuthenticated(ProtocolError):
    """The sender could not be authenticated (``UNAUTHENTICATED``)."""


class PermissionDenied(ProtocolError):
    """The sender is authenticated but not allowed to do this (``PERMISSION_DENIED``)."""


class PreconditionFailed(ProtocolError):
    """The message is valid but not for the receiver's current state (``FAILED_PRECONDITION``)."""


class TooLarge(ProtocolError):
    """A size limit was exceeded (``RESOURCE_EXHAUSTED``)."""


class Unavailable(ProtocolError):
    """What was asked for does not exist (yet); the caller may retry (``UNAVAILABLE``)."""


# --- specific errors ------------------------------------------------------------------------


class UnsupportedVersion(InvalidMessage):
    """The message carries a protocol version this peer does not speak."""


class UnknownCodec(InvalidMessage):
    """The codec id is not registered or not allowed for this stream."""


class SizeError(InvalidMessage):
    """Declared sizes are impossible (negative, huge, or not what the codec produces)."""


class ChunkOrderError(InvalidMessage):
    """A chunk arrived out of order, twice, or the stream ended before the last one."""


class DigestMismatch(InvalidMessage):
    """The reassembled payload does not hash to the digest its header announced."""


class InvalidPayload(InvalidMessage):
    """The payload's bytes are not something its codec could have produced."""


class NonFinitePayload(InvalidPayload):
    """A float payload decodes to NaN or Inf."""


class BadSignature(NotAuthenticated):
    """A signature is missing, malformed, or does not verify."""


class AdmissionDenied(NotAuthenticated):
    """The swarm admission proof is missing, wrong, or expired."""


class NotAMember(PermissionDenied):
    """The sender is not a member of the group (or not the peer this stream expects)."""


class NotAllowListed(PermissionDenied):
    """The sender's public key is not on the swarm's allow-list."""


class WrongRun(PreconditionFailed):
    """The message belongs to another training run."""


class UnknownGroup(PreconditionFailed):
    """The message names a group this peer is not (or no longer) part of."""


class StaleRound(PreconditionFailed):
    """The message belongs to an earlier round (a late message or a replay)."""


class FutureRound(PreconditionFailed):
    """The message belongs to a round this peer has not reached."""


_STATUS_BY_CATEGORY: tuple[tuple[type[ProtocolError], grpc.StatusCode], ...] = (
    (InvalidMessage, grpc.StatusCode.INVALID_ARGUMENT),
    (NotAuthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def to_grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details to report ``exc`` with.

    :class:`ProtocolError` subclasses map through the category table; a bare ``ProtocolError``
    is ``INVALID_ARGUMENT``. Any other exception is ``INTERNAL`` with a generic message, so that
    internal details never leak to the remote peer.
    """
    if isinstance(exc, ProtocolError):
        for category, code in _STATUS_BY_CATEGORY:
            if isinstance(exc, category):
                return code, str(exc)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


async def abort_rpc(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the current RPC with the status that :func:`to_grpc_status` gives for ``exc``."""
    code, details = to_grpc_status(exc)
    await context.abort(code, details)
    raise AssertionError("grpc.aio.ServicerContext.abort returned")  # abort always raises
