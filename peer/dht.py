"""lioncub's layer over the hivemind DHT: nodes, the peer registry, run configs and matchmaking keys.

Nodes: :func:`start_dht` / :func:`shutdown_dht`, :func:`visible_maddrs`, :func:`run_bootstrap`
(a long-lived bootstrap node with a stable identity, see :func:`ensure_identity`).

Data (plain msgpack values, validated when read back; nothing read is executed or unpickled):
:class:`SwarmRegistry` of :class:`PeerRecord`, :func:`publish_run_config` / :func:`fetch_run_config`
/ :func:`list_runs`, and the matchmaking primitives :func:`post_ready` / :func:`get_ready` and
:func:`post_group` / :func:`get_group` / :func:`get_groups`.

Threads and asyncio: every DHT request is handed to the hivemind DHT process without waiting and
its answer is awaited with a timeout (:class:`DHTError` when it does not come). The plain functions
block the calling thread for one DHT round trip (a few ms to tens of ms on a healthy swarm); each has
an ``*_async`` twin that awaits the same request with ``asyncio.wrap_future`` and never blocks the
event loop. :func:`start_dht_async` runs the ~0.5 s start in a worker thread. Calls are safe from
several threads at once.

Clocks: expirations are absolute DHT times (``hivemind.utils.get_dht_time()``, i.e. wall clock);
hivemind refuses peers whose clocks differ by more than 3 s, so volunteers need NTP.
"""

from lioncub.peer._dht_calls import DEFAULT_CALL_TIMEOUT, DHTError
from lioncub.peer._dht_node import (
    DEFAULT_STARTUP_TIMEOUT,
    ensure_identity,
    run_bootstrap,
    shutdown_dht,
    start_dht,
    start_dht_async,
    visible_maddrs,
)
from lioncub.peer._dht_registry import PeerRecord, SwarmRegistry
from lioncub.peer._dht_runs import (
    MAX_CONFIG_BYTES,
    MAX_GROUP_BYTES,
    MAX_READY_INFO_BYTES,
    RUNS_KEY,
    fetch_run_config,
    fetch_run_config_async,
    get_group,
    get_group_async,
    get_groups,
    get_groups_async,
    get_ready,
    get_ready_async,
    list_runs,
    list_runs_async,
    post_group,
    post_group_async,
    post_ready,
    post_ready_async,
    publish_run_config,
    publish_run_config_async,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_STARTUP_TIMEOUT",
    "MAX_CONFIG_BYTES",
    "MAX_GROUP_BYTES",
    "MAX_READY_INFO_BYTES",
    "RUNS_KEY",
    "DHTError",
    "PeerRecord",
    "SwarmRegistry",
    "ensure_identity",
    "fetch_run_config",
    "fetch_run_config_async",
    "get_group",
    "get_group_async",
    "get_groups",
    "get_groups_async",
    "get_ready",
    "get_ready_async",
    "list_runs",
    "list_runs_async",
    "post_group",
    "post_group_async",
    "post_ready",
    "post_ready_async",
    "publish_run_config",
    "publish_run_config_async",
    "run_bootstrap",
    "shutdown_dht",
    "start_dht",
    "start_dht_async",
    "visible_maddrs",
]
