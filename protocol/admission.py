"""Closed swarms: HMAC admission with a shared swarm key, and an allow-list of public keys.

A joining peer proves it knows the swarm key with
``HMAC-SHA256(swarm_key, canonical("lioncub.v1/admission", run_id, peer_id, public_key,
timestamp_ms, nonce))`` in the :class:`~lioncub.protocol.lioncub_pb2.Admission` message it sends
with ``JoinGroup`` and ``DownloadState``. The receiver recomputes it and compares in constant
time, and rejects a timestamp more than ``max_clock_skew_s`` away from its own clock. The proof
is bound to the peer's public key, and the request around it is signed with that key, so a
captured proof is useless to anyone else; within the skew window the same peer may reuse it.

Swarm key file: the secret as text (``lioncub-peer`` writes 64 hex characters), surrounding
whitespace ignored, at least 16 bytes; like identity keys, it must not be group/world readable.

Allow-list file: one Ed25519 public key per line, as 64 hex characters or standard base64 of the
32 raw bytes; blank lines and ``#`` comments are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from . import lioncub_pb2 as pb
from .canonical import encode_values
from .errors import AdmissionDenied, NotAllowListed
from .identity import Identity, KeyFilePermissionError, check_peer_id
from .limits import NONCE_BYTES, PUBLIC_KEY_BYTES

__all__ = [
    "AdmissionPolicy",
    "admission_proof",
    "check_admission",
    "generate_swarm_key",
    "load_allow_list",
    "load_swarm_key",
    "make_admission",
    "parse_allow_list",
]

_DOMAIN = "lioncub.v1/admission"
MIN_SWARM_KEY_BYTES = 16


@dataclass(frozen=True)
class AdmissionPolicy:
    """Who may join. The default policy admits every peer whose id matches its key.

    Attributes:
        swarm_key: shared secret of a closed swarm; None for an open swarm.
        allow_list: raw public keys allowed in; None for no allow-list.
        max_clock_skew_s: largest accepted difference between the proof's timestamp and our clock.
    """

    swarm_key: bytes | None = None
    allow_list: frozenset[bytes] | None = None
    max_clock_skew_s: float = 60.0

    def __post_init__(self) -> None:
        if self.swarm_key is not None and len(self.swarm_key) < MIN_SWARM_KEY_BYTES:
            raise ValueError(f"swarm key must have at least {MIN_SWARM_KEY_BYTES} bytes")
        if not self.max_clock_skew_s > 0:
            raise ValueError(f"max_clock_skew_s must be > 0, got {self.max_clock_skew_s}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def admission_proof(
    swarm_key: bytes, *, run_id: str, peer_id: str, public_key: bytes, timestamp_ms: int, nonce: bytes
) -> bytes:
    """The HMAC-SHA256 proof described in the module docstring."""
    message = encode_values(_DOMAIN, run_id, peer_id, public_key, timestamp_ms, nonce)
    return hmac.new(swarm_key, message, "sha256").digest()


def make_admission(
    swarm_key: bytes | None, identity: Identity, *, run_id: str, now_ms: int | None = None
) -> pb.Admission:
    """A fresh admission for ``identity`` (empty proof when the swarm is open)."""
    timestamp_ms = _now_ms() if now_ms is None else now_ms
    nonce = secrets.token_bytes(NONCE_BYTES)
    proof = b""
    if swarm_key is not None:
        proof = admission_proof(
            swarm_key,
            run_id=run_id,
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            timestamp_ms=timestamp_ms,
            nonce=nonce,
        )
    return pb.Admission(timestamp_ms=timestamp_ms, nonce=nonce, swarm_proof=proof)


def check_admission(
    policy: AdmissionPolicy,
    peer: pb.PeerInfo,
    admission: pb.Admission,
    *,
    run_id: str,
    now_ms: int | None = None,
) -> None:
    """Admit ``peer`` or raise (``UNAUTHENTICATED`` / ``PERMISSION_DENIED``, see errors)."""
    check_peer_id(peer.peer_id, peer.public_key)
    if policy.allow_list is not None and peer.public_key not in policy.allow_list:
        raise NotAllowListed(f"peer {peer.peer_id}'s public key is not on this swarm's allow-list")
    if policy.swarm_key is None:
        return
    if not admission.swarm_proof:
        raise AdmissionDenied("this swarm is closed: the request carries no swarm key proof")
    now = _now_ms() if now_ms is None else now_ms
    skew_s = abs(now - admission.timestamp_ms) / 1000.0
    if skew_s > policy.max_clock_skew_s:
        raise AdmissionDenied(
            f"admission timestamp is {skew_s:.1f} s away from this peer's clock"
            f" (at most {policy.max_clock_skew_s:.0f} s; check NTP)"
        )
    if len(admission.nonce) != NONCE_BYTES:
        raise AdmissionDenied(f"admission nonce has {len(admission.nonce)} bytes, need {NONCE_BYTES}")
    want = admission_proof(
        policy.swarm_key,
        run_id=run_id,
        peer_id=peer.peer_id,
        public_key=peer.public_key,
        timestamp_ms=admission.timestamp_ms,
        nonce=admission.nonce,
    )
    if not hmac.compare_digest(want, admission.swarm_proof):
        raise AdmissionDenied("swarm key proof is wrong: the peer does not hold this swarm's key")


def generate_swarm_key() -> str:
    """A new random swarm key, as the text to store in a swarm key file."""
    return secrets.token_hex(32)


def load_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Read a swarm key file (see the module docstring)."""
    path = Path(path)
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFilePermissionError(
            f"swarm key file {path} has mode {stat.S_IMODE(mode):04o}: run `chmod 600 {path}`"
        )
    key = path.read_bytes().strip()
    if len(key) < MIN_SWARM_KEY_BYTES:
        raise ValueError(f"swarm key in {path} is shorter than {MIN_SWARM_KEY_BYTES} bytes")
    return key


def parse_allow_list(text: str, source: str = "allow-list") -> frozenset[bytes]:
    """Parse allow-list text (see the module docstring); raise ``ValueError`` naming a bad line."""
    keys: set[bytes] = set()
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        key = _decode_public_key(line)
        if key is None:
            raise ValueError(
                f"{source} line {number}: expected a 32-byte Ed25519 public key as 64 hex characters"
                f" or base64, got {line[:80]!r}"
            )
        keys.add(key)
    return frozenset(keys)


def load_allow_list(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """Read an allow-list file."""
    return parse_allow_list(Path(path).read_text(encoding="utf-8"), source=str(path))


def _decode_public_key(text: str) -> bytes | None:
    if len(text) == 2 * PUBLIC_KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == PUBLIC_KEY_BYTES else None
