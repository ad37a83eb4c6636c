"""Run config documents, the list of runs, and the matchmaking keys of each round.

Keys (all values plain msgpack data, checked again when read back):

- ``lioncub.runs``: subkey per run id -> ``{"published": <dht time>}``, expiring with the config;
- ``<run_id>.config``: the run config document (a dict, at most 64 KiB encoded);
- ``<run_id>.round<r>.ready``: subkey per peer id -> that peer's ready info (dict, at most 4 KiB);
- ``<run_id>.round<r>.groups``: subkey per leader id -> the group it assembled (dict, at most 64 KiB).

Each function has an ``*_async`` twin that does not block the event loop. All raise
:class:`DHTError` if the DHT does not answer within ``timeout`` seconds and ``ValueError`` on bad
arguments; malformed entries read back are logged and skipped, never raised.
"""

from __future__ import annotations

import logging
from typing import Any

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lioncub.peer._dht_calls import (
    DEFAULT_CALL_TIMEOUT,
    Pending,
    check_name,
    check_peer_id,
    check_plain,
    check_round,
    skip_entry,
    subkey_entries,
    submit_get,
    submit_store,
)

logger = logging.getLogger(__name__)

RUNS_KEY = "lioncub.runs"
MAX_CONFIG_BYTES = 64 * 1024
MAX_READY_INFO_BYTES = 4 * 1024
MAX_GROUP_BYTES = 64 * 1024


def _config_key(run_id: str) -> str:
    return f"{check_name(run_id, 'run id')}.config"


def _round_key(run_id: str, round: int, what: str) -> str:
    return f"{check_name(run_id, 'run id')}.round{check_round(round)}.{what}"


def _check_dict(value: object, max_bytes: int, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict; got {type(value).__name__}")
    check_plain(value, max_bytes, what)
    return value


def _check_expiration(expiration: float) -> float:
    if not expiration > get_dht_time():
        raise ValueError(
            f"expiration {expiration} is not in the future (DHT time is absolute: now + seconds)"
        )
    return expiration


def _bool_answers(answers: list[Any]) -> bool:
    return all(bool(a) for a in answers)


def _dict_entries(key: str, answers: list[Any], max_bytes: int) -> dict[str, dict[str, Any]]:
    """Live subkey entries of ``key`` whose subkey is a peer id and whose value is a small plain dict."""
    entries = {}
    for subkey, value in subkey_entries(answers[0], key, get_dht_time()):
        try:
            entries[check_peer_id(subkey, "subkey")] = _check_dict(value, max_bytes, "value")
        except ValueError as e:
            skip_entry(f"{key}[{subkey!r:.80}]: {e}")
    return entries


# --- run config -------------------------------------------------------------------------------


def _publish_run_config(
    dht: DHT, run_id: str, doc: dict[str, Any], ttl: float, timeout: float
) -> Pending[bool]:
    key = _config_key(run_id)
    _check_dict(doc, MAX_CONFIG_BYTES, "run config")
    if not ttl > 0:
        raise ValueError(f"ttl must be positive; got {ttl}")
    now = get_dht_time()
    futures = [
        submit_store(dht, key, doc, now + ttl),
        submit_store(dht, RUNS_KEY, {"published": now}, now + ttl, subkey=run_id),
    ]
    return Pending(futures, _bool_answers, timeout, f"publishing the config of run {run_id}")


def publish_run_config(
    dht: DHT, run_id: str, doc: dict[str, Any], ttl: float, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> bool:
    """Store ``doc`` under ``<run_id>.config`` and list the run in ``lioncub.runs``, both until now + ttl.

    The document must be plain data (see ``check_plain``) of at most 64 KiB encoded. Re-publish well
    within ``ttl`` while the run lives (any peer holding the config may do it). True if both stored.
    """
    return _publish_run_config(dht, run_id, doc, ttl, timeout).wait()


async def publish_run_config_async(
    dht: DHT, run_id: str, doc: dict[str, Any], ttl: float, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> bool:
    return await _publish_run_config(dht, run_id, doc, ttl, timeout).wait_async()


def _parse_config(key: str, answers: list[Any]) -> dict[str, Any] | None:
    result = answers[0]
    if result is None or getattr(result, "expiration_time", 0.0) <= get_dht_time():
        return None
    try:
        return _check_dict(getattr(result, "value", None), MAX_CONFIG_BYTES, "run config")
    except ValueError as e:
        skip_entry(f"{key}: {e}")
        return None


def _fetch_run_config(dht: DHT, run_id: str, timeout: float) -> Pending[dict[str, Any] | None]:
    key = _config_key(run_id)
    return Pending([submit_get(dht, key)], lambda a: _parse_config(key, a), timeout, f"reading {key}")


def fetch_run_config(
    dht: DHT, run_id: str, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, Any] | None:
    """The run's config document, or None if there is none (or only a malformed one, which is logged)."""
    return _fetch_run_config(dht, run_id, timeout).wait()


async def fetch_run_config_async(
    dht: DHT, run_id: str, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, Any] | None:
    return await _fetch_run_config(dht, run_id, timeout).wait_async()


def _parse_runs(answers: list[Any]) -> list[str]:
    published: dict[str, float] = {}
    for subkey, value in subkey_entries(answers[0], RUNS_KEY, get_dht_time()):
        try:
            run_id = check_name(subkey, "run id")
            when = value.get("published") if isinstance(value, dict) else None
            if isinstance(when, bool) or not isinstance(when, (int, float)):
                raise ValueError("value must be {'published': <dht time>}")
        except ValueError as e:
            skip_entry(f"{RUNS_KEY}[{subkey!r:.80}]: {e}")
            continue
        published[run_id] = float(when)
    return sorted(published, key=lambda r: (-published[r], r))


def list_runs(dht: DHT, *, timeout: float = DEFAULT_CALL_TIMEOUT) -> list[str]:
    """Ids of the runs with a live config, most recently published first."""
    return Pending([submit_get(dht, RUNS_KEY)], _parse_runs, timeout, "listing runs").wait()


async def list_runs_async(dht: DHT, *, timeout: float = DEFAULT_CALL_TIMEOUT) -> list[str]:
    return await Pending([submit_get(dht, RUNS_KEY)], _parse_runs, timeout, "listing runs").wait_async()


# --- matchmaking: ready peers and assembled groups -------------------------------------------


def _post(
    dht: DHT, key: str, subkey: str, value: dict[str, Any], max_bytes: int, expiration: float, timeout: float
) -> Pending[bool]:
    check_peer_id(subkey)
    _check_dict(value, max_bytes, f"value for {key}")
    future = submit_store(dht, key, value, _check_expiration(expiration), subkey=subkey)
    return Pending([future], _bool_answers, timeout, f"posting {subkey} to {key}")


def _get_entries(dht: DHT, key: str, max_bytes: int, timeout: float) -> Pending[dict[str, dict[str, Any]]]:
    return Pending(
        [submit_get(dht, key)], lambda a: _dict_entries(key, a, max_bytes), timeout, f"reading {key}"
    )


def post_ready(
    dht: DHT,
    run_id: str,
    round: int,
    peer_id: str,
    info: dict[str, Any],
    expiration: float,
    *,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> bool:
    """Declare ``peer_id`` ready for ``round`` with ``info`` (plain dict, at most 4 KiB) until ``expiration``.

    ``expiration`` is absolute DHT time (``hivemind.utils.get_dht_time() + seconds``). Posting again
    with a later expiration replaces the earlier info; an earlier expiration is rejected (False).
    """
    key = _round_key(run_id, round, "ready")
    return _post(dht, key, peer_id, info, MAX_READY_INFO_BYTES, expiration, timeout).wait()


async def post_ready_async(
    dht: DHT,
    run_id: str,
    round: int,
    peer_id: str,
    info: dict[str, Any],
    expiration: float,
    *,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> bool:
    key = _round_key(run_id, round, "ready")
    return await _post(dht, key, peer_id, info, MAX_READY_INFO_BYTES, expiration, timeout).wait_async()


def get_ready(
    dht: DHT, run_id: str, round: int, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, dict[str, Any]]:
    """Peer id -> info of every peer currently declared ready for ``round``."""
    key = _round_key(run_id, round, "ready")
    return _get_entries(dht, key, MAX_READY_INFO_BYTES, timeout).wait()


async def get_ready_async(
    dht: DHT, run_id: str, round: int, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, dict[str, Any]]:
    key = _round_key(run_id, round, "ready")
    return await _get_entries(dht, key, MAX_READY_INFO_BYTES, timeout).wait_async()


def post_group(
    dht: DHT,
    run_id: str,
    round: int,
    leader_id: str,
    group: dict[str, Any],
    expiration: float,
    *,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> bool:
    """Publish the group ``leader_id`` assembled for ``round`` (members, shard plan: plain dict <= 64 KiB)."""
    key = _round_key(run_id, round, "groups")
    return _post(dht, key, leader_id, group, MAX_GROUP_BYTES, expiration, timeout).wait()


async def post_group_async(
    dht: DHT,
    run_id: str,
    round: int,
    leader_id: str,
    group: dict[str, Any],
    expiration: float,
    *,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> bool:
    key = _round_key(run_id, round, "groups")
    return await _post(dht, key, leader_id, group, MAX_GROUP_BYTES, expiration, timeout).wait_async()


def get_groups(
    dht: DHT, run_id: str, round: int, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, dict[str, Any]]:
    """Leader id -> group of every live group published for ``round``."""
    key = _round_key(run_id, round, "groups")
    return _get_entries(dht, key, MAX_GROUP_BYTES, timeout).wait()


async def get_groups_async(
    dht: DHT, run_id: str, round: int, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, dict[str, Any]]:
    key = _round_key(run_id, round, "groups")
    return await _get_entries(dht, key, MAX_GROUP_BYTES, timeout).wait_async()


def get_group(
    dht: DHT, run_id: str, round: int, leader_id: str, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, Any] | None:
    """The group ``leader_id`` published for ``round``, or None."""
    return get_groups(dht, run_id, round, timeout=timeout).get(check_peer_id(leader_id, "leader id"))


async def get_group_async(
    dht: DHT, run_id: str, round: int, leader_id: str, *, timeout: float = DEFAULT_CALL_TIMEOUT
) -> dict[str, Any] | None:
    groups = await get_groups_async(dht, run_id, round, timeout=timeout)
    return groups.get(check_peer_id(leader_id, "leader id"))
