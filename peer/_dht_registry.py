"""The swarm's peer registry: one validated :class:`PeerRecord` per peer, as subkeys of ``<run_id>.peers``."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lioncub.peer._dht_calls import (
    DEFAULT_CALL_TIMEOUT,
    Pending,
    check_name,
    check_peer_id,
    skip_entry,
    subkey_entries,
    submit_get,
    submit_store,
)

logger = logging.getLogger(__name__)

_ENDPOINT_RE = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2}){0,1024}")
_VERSION_RE = re.compile(r"[\x21-\x7e]{1,64}")
_MAX_FIELDS = 64
_INT_FIELDS = ("round", "bytes_sent", "bytes_received")
_FLOAT_LIMITS = {"throughput": 1e12, "bandwidth_mbps": 1e9, "bytes_per_s": 1e12, "last_seen": 1e11}


def _check_endpoint(endpoint: str, client_mode: bool) -> None:
    if client_mode:
        if endpoint:
            raise ValueError(f"a client-mode peer has no endpoint; got {endpoint!r:.80}")
        return
    match = _ENDPOINT_RE.fullmatch(endpoint)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"endpoint must be 'host:port' (IPv6 as '[addr]:port'); got {endpoint!r:.80}")


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite; got {result}")
    return result


@dataclass(frozen=True)
class PeerRecord:
    """What a peer tells the swarm about itself. Validated on construction.

    ``endpoint`` is the ``host:port`` of the peer's gRPC server, ``""`` for a client-mode peer;
    ``public_key`` is hex (may be empty); ``throughput`` in samples/s; ``last_seen`` in DHT time
    (set by :meth:`SwarmRegistry.announce`).
    """

    peer_id: str
    endpoint: str
    public_key: str
    version: str
    throughput: float
    bandwidth_mbps: float
    round: int
    client_mode: bool
    loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_per_s: float = 0.0
    last_seen: float = 0.0

    def __post_init__(self) -> None:
        check_peer_id(self.peer_id)
        if not isinstance(self.client_mode, bool):
            raise ValueError(f"client_mode must be a bool; got {type(self.client_mode).__name__}")
        if not isinstance(self.endpoint, str):
            raise ValueError(f"endpoint must be a str; got {type(self.endpoint).__name__}")
        _check_endpoint(self.endpoint, self.client_mode)
        if not isinstance(self.public_key, str) or _HEX_RE.fullmatch(self.public_key) is None:
            raise ValueError("public_key must be lowercase hex of at most 1024 bytes")
        if not isinstance(self.version, str) or _VERSION_RE.fullmatch(self.version) is None:
            raise ValueError(f"version must be 1-64 printable ASCII characters; got {self.version!r:.80}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise ValueError(f"{name} must be an int in [0, 2**63); got {value!r:.40}")
        for name, limit in _FLOAT_LIMITS.items():
            value = _as_float(name, getattr(self, name))
            if not 0.0 <= value <= limit:
                raise ValueError(f"{name} must be in [0, {limit:g}]; got {value}")
            object.__setattr__(self, name, value)
        if self.loss is not None:
            object.__setattr__(self, "loss", _as_float("loss", self.loss))

    def to_value(self) -> dict[str, Any]:
        """The record as plain msgpack-able data (what goes into the DHT)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: object) -> PeerRecord:
        """Rebuild a record read from the DHT; raises ``ValueError`` on anything malformed.

        Unknown keys are ignored (newer peers may add fields); missing or ill-typed ones are errors.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"a peer record must be a dict; got {type(value).__name__}")
        if len(value) > _MAX_FIELDS:
            raise ValueError(f"a peer record has {len(value)} fields; at most {_MAX_FIELDS} are accepted")
        fields = {}
        for field in dataclasses.fields(cls):
            if field.name in value:
                fields[field.name] = value[field.name]
            elif field.default is dataclasses.MISSING:
                raise ValueError(f"a peer record lacks the field {field.name!r}")
        return cls(**fields)


def _parse_peers(key: str, answers: list[Any]) -> list[PeerRecord]:
    records = []
    for subkey, value in subkey_entries(answers[0], key, get_dht_time()):
        if value is None:
            continue  # a tombstone left by withdraw()
        try:
            record = PeerRecord.from_value(value)
            if record.peer_id != subkey:
                raise ValueError(f"stored under subkey {subkey!r:.80} but names peer {record.peer_id!r}")
        except (ValueError, TypeError) as e:
            skip_entry(f"{key}[{subkey!r:.80}]: {e}")
            continue
        records.append(record)
    return sorted(records, key=lambda r: r.peer_id)


class SwarmRegistry:
    """Announce, list and withdraw the peers of one run.

    Each peer is a subkey (its peer id) of the DHT key ``<run_id>.peers`` whose entry expires
    ``ttl`` seconds after its last announce: re-announce well within ``ttl`` (e.g. every ttl/3).
    Every method has an ``*_async`` twin that does not block the event loop; all of them raise
    :class:`DHTError` if the DHT does not answer within ``timeout`` seconds.

    hivemind keeps, per subkey, the entry with the *latest* expiration and rejects older ones, so a
    short-lived entry cannot replace a live one. :meth:`withdraw` therefore stores a tombstone
    (``None``) that outlives the record it replaces; :meth:`peers` skips tombstones.
    """

    def __init__(self, dht: DHT, run_id: str, ttl: float = 30.0, *, timeout: float = DEFAULT_CALL_TIMEOUT):
        if not ttl > 0:
            raise ValueError(f"ttl must be positive; got {ttl}")
        self.dht, self.ttl, self.timeout = dht, ttl, timeout
        self.key = f"{check_name(run_id, 'run id')}.peers"
        self._expirations: dict[str, float] = {}
        self._lock = threading.Lock()

    def _next_expiration(self, peer_id: str) -> float:
        # Strictly later than anything this registry stored for the peer, or hivemind drops it.
        with self._lock:
            expiration = max(float(get_dht_time()) + self.ttl, self._expirations.get(peer_id, 0.0) + 1e-3)
            self._expirations[peer_id] = expiration
        return expiration

    def _announce(self, record: PeerRecord) -> Pending[bool]:
        stamped = dataclasses.replace(record, last_seen=get_dht_time())
        expiration = self._next_expiration(record.peer_id)
        future = submit_store(self.dht, self.key, stamped.to_value(), expiration, subkey=record.peer_id)
        return Pending([future], lambda a: bool(a[0]), self.timeout, f"announcing {record.peer_id}")

    def _withdraw(self, peer_id: str) -> Pending[bool]:
        expiration = self._next_expiration(check_peer_id(peer_id))
        future = submit_store(self.dht, self.key, None, expiration, subkey=peer_id)
        return Pending([future], lambda a: bool(a[0]), self.timeout, f"withdrawing {peer_id}")

    def _peers(self) -> Pending[list[PeerRecord]]:
        future = submit_get(self.dht, self.key)
        return Pending([future], lambda a: _parse_peers(self.key, a), self.timeout, f"reading {self.key}")

    def announce(self, record: PeerRecord) -> bool:
        """Store ``record`` (``last_seen`` set to now) until now + ttl; True if a DHT node took it."""
        return self._announce(record).wait()

    async def announce_async(self, record: PeerRecord) -> bool:
        return await self._announce(record).wait_async()

    def peers(self) -> list[PeerRecord]:
        """Live, well-formed records sorted by peer id; malformed entries are logged and skipped."""
        return self._peers().wait()

    async def peers_async(self) -> list[PeerRecord]:
        return await self._peers().wait_async()

    def withdraw(self, peer_id: str) -> bool:
        """Replace the peer's record with a tombstone, so that it drops out of :meth:`peers` at once."""
        return self._withdraw(peer_id).wait()

    async def withdraw_async(self, peer_id: str) -> bool:
        return await self._withdraw(peer_id).wait_async()
