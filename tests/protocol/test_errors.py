from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from lioncub.protocol import (
    AdmissionDenied,
    BadSignature,
    ChunkOrderError,
    DigestMismatch,
    FutureRound,
    NonFinitePayload,
    NotAllowListed,
    NotAMember,
    ProtocolError,
    SizeError,
    StaleRound,
    TooLarge,
    Unavailable,
    UnknownCodec,
    UnknownGroup,
    UnsupportedVersion,
    WrongRun,
    abort_rpc,
    to_grpc_status,
)

S = grpc.StatusCode


@pytest.mark.parametrize(
    "exc,code",
    [
        (UnknownCodec("x"), S.INVALID_ARGUMENT), (UnsupportedVersion("x"), S.INVALID_ARGUMENT),
        (SizeError("x"), S.INVALID_ARGUMENT), (ChunkOrderError("x"), S.INVALID_ARGUMENT),
        (DigestMismatch("x"), S.INVALID_ARGUMENT), (NonFinitePayload("x"), S.INVALID_ARGUMENT),
        (BadSignature("x"), S.UNAUTHENTICATED), (AdmissionDenied("x"), S.UNAUTHENTICATED),
        (NotAMember("x"), S.PERMISSION_DENIED), (NotAllowListed("x"), S.PERMISSION_DENIED),
        (StaleRound("x"), S.FAILED_PRECONDITION), (FutureRound("x"), S.FAILED_PRECONDITION),
        (WrongRun("x"), S.FAILED_PRECONDITION), (UnknownGroup("x"), S.FAILED_PRECONDITION),
        (TooLarge("x"), S.RESOURCE_EXHAUSTED), (Unavailable("x"), S.UNAVAILABLE),
        (ProtocolError("x"), S.INVALID_ARGUMENT),
    ],
)  # fmt: skip
def test_status_mapping(exc: ProtocolError, code: grpc.StatusCode) -> None:
    assert to_grpc_status(exc) == (code, "x")
    assert exc.status == code


def test_other_exceptions_are_internal_without_details() -> None:
    code, details = to_grpc_status(KeyError("/home/secret/path"))
    assert code == S.INTERNAL and "secret" not in details


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_abort_rpc_uses_the_mapping() -> None:
    ctx = _Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(abort_rpc(ctx, StaleRound("chunk is for round 3")))
    assert ctx.aborted == (S.FAILED_PRECONDITION, "chunk is for round 3")
