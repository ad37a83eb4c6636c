"""Field-level checks shared by every message: versions, ids, rounds, peer infos, codecs, floats.

Each check raises a :class:`~lioncub.protocol.errors.ProtocolError` subclass whose message names
the field and the value; none of them returns a flag to be forgotten.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from lioncub.optim.codec import Codec, CodecError, Encoded
from lioncub.optim.codecs import check_packed_structure, get_codec

from . import lioncub_pb2 as pb
from .errors import (
    FutureRound,
    InvalidMessage,
    InvalidPayload,
    NonFinitePayload,
    StaleRound,
    TooLarge,
    UnknownCodec,
    UnsupportedVersion,
    WrongRun,
)
from .identity import check_peer_id
from .limits import MAX_CONFIG_JSON_BYTES, MAX_ID_CHARS, PROTOCOL_VERSION

__all__ = [
    "CodecLookup",
    "check_finite",
    "check_id",
    "check_peer_info",
    "check_round",
    "check_run",
    "check_version",
    "check_weight",
    "parse_config_json",
    "registry_codec",
    "resolve_codec",
    "show",
]

#: Resolves a codec id to a codec instance; raises ``KeyError`` / ``ValueError`` for unknown ids.
CodecLookup = Callable[[str], Codec]

_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_MAX_ENDPOINT_CHARS = 256
_MAX_JSON_DEPTH = 32
#: Codec families whose payload holds only integers (sign bits, ternary planes, vote counts):
#: nothing to check for NaN/Inf, and decoding them at wire speed would cost more than receiving
#: them, so only their O(1) structure is checked here (flag byte, count header, zero padding bits:
#: :func:`~lioncub.optim.codecs.check_packed_structure`) and the rest is left to the consumer's decoder / vote. Every
#: other codec (fp16, int8 blockwise, p-bit: they carry floats or float scales) is decoded once.
_INTEGER_ONLY_CODECS = ("sign1", "tern", "counts")


def show(value: object, limit: int = 64) -> str:
    """``repr`` of a received value, shortened so that error messages stay bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def registry_codec(name: str) -> Codec:
    """The codec registered under ``name`` in :mod:`lioncub.optim.codecs` (the default lookup)."""
    return get_codec(name)


def check_version(version: int, what: str = "message") -> None:
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"{what} uses protocol version {version}; this peer speaks version {PROTOCOL_VERSION}"
        )


def check_id(field: str, value: str, *, allow_empty: bool = False) -> None:
    """Ids and names: at most MAX_ID_CHARS of ``A-Za-z0-9._:@/+=-``."""
    if not value:
        if allow_empty:
            return
        raise InvalidMessage(f"{field} is empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidMessage(f"{field} has {len(value)} characters, at most {MAX_ID_CHARS} allowed")
    if _ID_RE.fullmatch(value) is None:
        raise InvalidMessage(f"{field} {show(value)} has characters outside A-Za-z0-9._:@/+=-")


def check_run(got: str, expected: str, what: str = "message") -> None:
    if got != expected:
        raise WrongRun(f"{what} is for run {show(got)}, this peer is in run {show(expected)}")


def check_round(got: int, expected: int, what: str = "message") -> None:
    """Exactly ``expected``: earlier is stale (or a replay), later is from the future."""
    if got < expected:
        raise StaleRound(f"{what} is for round {got}, this peer is at round {expected} (stale or replayed)")
    if got > expected:
        raise FutureRound(f"{what} is for round {got}, this peer is only at round {expected}")


def check_weight(field: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidMessage(f"{field} must be finite and >= 0, got {value!r}")


def check_peer_info(info: pb.PeerInfo, what: str = "peer") -> None:
    """Id matches key (UNAUTHENTICATED otherwise), endpoint present unless in client mode."""
    check_id(f"{what}.peer_id", info.peer_id)
    check_peer_id(info.peer_id, info.public_key)
    if info.client_mode:
        if info.endpoint:
            raise InvalidMessage(
                f"{what} {info.peer_id} is in client mode but has endpoint {show(info.endpoint)}"
            )
    else:
        _check_endpoint(f"{what}.endpoint", info.endpoint)
    check_weight(f"{what}.bandwidth_mbps", info.bandwidth_mbps)
    if len(info.software_version) > MAX_ID_CHARS:
        raise InvalidMessage(f"{what}.software_version is longer than {MAX_ID_CHARS} characters")


def _check_endpoint(field: str, endpoint: str) -> None:
    host, sep, port = endpoint.rpartition(":")
    if (
        not sep
        or not host
        or len(endpoint) > _MAX_ENDPOINT_CHARS
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c.isspace() for c in endpoint)
    ):
        raise InvalidMessage(f"{field} {show(endpoint)} is not host:port")


def resolve_codec(name: str, lookup: CodecLookup, allowed: frozenset[str] | None = None) -> Codec:
    """The codec for ``name``, if registered and (when ``allowed`` is given) allowed here."""
    check_id("codec", name)
    if allowed is not None and name not in allowed:
        raise UnknownCodec(f"codec {show(name)} is not accepted here (expected one of {sorted(allowed)})")
    try:
        codec = lookup(name)
    except (KeyError, ValueError, LookupError) as exc:
        raise UnknownCodec(f"unknown codec {show(name)}") from exc
    if codec.name != name:
        raise UnknownCodec(f"codec id {show(name)} resolved to codec {codec.name!r}")
    return codec


def check_finite(enc: Encoded, codec: Codec) -> None:
    """Decode a float-carrying payload once; reject what the codec refuses and any NaN/Inf.

    Payloads of integer-only codecs (:data:`_INTEGER_ONLY_CODECS`) are not decoded; their
    structure is checked in O(1) (a payload with nonzero padding bits would be counted, then fail
    the whole reduction: one member could spoil a shard for everyone).
    """
    if enc.codec.startswith(_INTEGER_ONLY_CODECS):
        try:
            check_packed_structure(enc)
        except CodecError as exc:
            raise InvalidPayload(str(exc)) from exc
        return
    try:
        values = codec.decode(enc, dtype=torch.float32)
    except ValueError as exc:  # CodecError is a ValueError
        raise InvalidPayload(f"{enc.codec} payload rejected by its codec: {exc}") from exc
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFinitePayload(f"{enc.codec} payload has {bad} NaN/Inf value(s) out of {enc.numel}")


def parse_config_json(text: str) -> dict[str, Any]:
    """Parse a run configuration document safely: bounded size and depth, a JSON object, no NaN.

    Only parses; what the keys mean is for :mod:`lioncub.peer` to validate.
    """
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_CONFIG_JSON_BYTES:
        raise TooLarge(f"config_json has {size} bytes, at most {MAX_CONFIG_JSON_BYTES} allowed")
    depth = max_depth = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, checked before the recursive parser runs
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
        elif ch in "]}":
            depth -= 1
    if max_depth > _MAX_JSON_DEPTH:
        raise InvalidMessage(f"config_json nests {max_depth} levels deep, at most {_MAX_JSON_DEPTH} allowed")

    def _reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid in a config document")

    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(f"config_json is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage(f"config_json must be a JSON object, got {type(doc).__name__}")
    return doc
