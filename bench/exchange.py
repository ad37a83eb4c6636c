"""Wire bytes and latency of the group exchange (lioncub ``mavo``: sign1 up, tern down) over loopback gRPC.

For each group size ``n`` and vector length ``P``, ``n`` peers run in this process, each with its
own grpc.aio server on 127.0.0.1 and its own ``ExchangeHub``, and run :func:`run_exchange` on a
random vector for a few rounds (after one warm-up round that opens the channels). Per config:

* ``bytes_sent_per_peer`` / ``bytes_received_per_peer``: the gRPC message bytes each peer really
  moved (every chunk, pull request, ack: serialized size + the 5-byte gRPC prefix), mean over peers;
* ``nominal_bytes``: ``2 (n-1)/n * P * 1/8``, the design's figure for 1 bit up and 1 bit down;
* ``codec_exact_bytes``: what the payloads themselves needed, per peer: its sign1 slices for the
  other owners' shards plus ``n-1`` copies of its own shard's tern result. tern costs 1 bit + one
  flag byte per shard without ties, 2 bits where a tie exists (equal weights, even ``n``);
* ``wire_overhead``: ``bytes_sent_per_peer / codec_exact_bytes`` (target <= 1.03), with the worst
  peer (sent or received) in ``wire_overhead_worst_peer``;
* ``round_latency_s``: median wall time from starting every member's exchange to the last one
  finishing. All peers share this machine's cores, so it measures CPU cost more than a network.

``weights``: ``equal`` (1 sample each: ties where ``n`` is even) and ``odd`` (total weight odd:
no ties possible). Usage: ``python bench/exchange.py [--quick] [--rounds K] [--json] [--plot PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.peer.exchange import ExchangeHub, SlotKey, run_exchange
from lioncub.peer.groups import announce_group, deadline_ms_after, peer_info
from lioncub.peer.server import PeerServer
from lioncub.protocol import GroupPlan, Identity, check_group_announcement

DEFAULT_PLOT = Path(__file__).resolve().parent / "out" / "exchange.png"
RUN = "bench-exchange"
EXCHANGE = "update"


def _weights(scheme: str, n: int) -> list[int]:
    if scheme == "equal":
        return [1] * n
    return [2] * (n - 1) + [3]  # odd total: a weighted vote can never tie


async def _start(n: int) -> tuple[list[Identity], list[ExchangeHub], list[PeerServer], list[Any]]:
    ids = [Identity.generate() for _ in range(n)]
    hubs = [ExchangeHub(i, RUN) for i in ids]
    servers = []
    for ident, hub in zip(ids, hubs, strict=True):
        server = await PeerServer.start(identity=ident)
        server.exchange = hub
        servers.append(server)
    infos = [peer_info(i, endpoint=s.endpoint) for i, s in zip(ids, servers, strict=True)]
    return ids, hubs, servers, infos


def _plans(ids: list[Identity], infos: list[Any], rnd: int, numel: int) -> list[GroupPlan]:
    announcement = announce_group(
        ids[0], run_id=RUN, round=rnd, members=infos, total_numel=numel, deadline_ms=deadline_ms_after(600)
    )
    return [check_group_announcement(announcement, run_id=RUN, round=rnd, self_id=i.peer_id) for i in ids]


async def measure(n: int, numel: int, rounds: int, scheme: str, seed: int = 0) -> dict[str, Any]:
    strategy = make_strategy(StrategyConfig(name="lioncub", reduction="mavo"))
    gen = torch.Generator().manual_seed(seed)
    vecs = [torch.randn(numel, generator=gen) for _ in range(n)]
    weights = _weights(scheme, n)
    ids, hubs, servers, infos = await _start(n)
    latencies: list[float] = []
    sent: list[list[int]] = []
    received: list[list[int]] = []
    exact_sent: list[list[int]] = []
    exact_received: list[list[int]] = []
    result_bytes = 0
    ties = False
    try:
        for rnd in range(rounds + 1):  # round 0: warm-up (channels connect)
            plans = _plans(ids, infos, rnd, numel)
            deadline = time.time() + 600
            start = time.perf_counter()
            outcomes = await asyncio.gather(
                *(
                    run_exchange(h, p, EXCHANGE, v, strategy, w, deadline=deadline)
                    for h, p, v, w in zip(hubs, plans, vecs, weights, strict=True)
                )
            )
            elapsed = time.perf_counter() - start
            if any(not o.complete or o.left_out for o in outcomes):
                raise RuntimeError(f"incomplete exchange: {[o.failures for o in outcomes]}")
            if rnd == 0:
                continue
            latencies.append(elapsed)
            plan = plans[0]
            results: dict[str, int] = {}
            for s in plan.shards:
                owner = hubs[[i.peer_id for i in ids].index(s.owner_id)]
                slot = owner.slot(SlotKey(rnd, plan.group_id, EXCHANGE, s.index))
                if slot is None or slot.result is None:
                    raise RuntimeError(f"shard {s.index} has no result")
                results[s.owner_id] = slot.result.nbytes
                ties |= slot.result.nbytes > 1 + (s.numel + 7) // 8
            result_bytes = sum(results.values())
            part = {s.owner_id: (s.numel + 7) // 8 for s in plan.shards}  # sign1 slice of that shard
            sent.append([o.bytes_sent for o in outcomes])
            received.append([o.bytes_received for o in outcomes])
            exact_sent.append(
                [
                    sum(b for owner, b in part.items() if owner != i.peer_id)
                    + (n - 1) * results.get(i.peer_id, 0)
                    for i in ids
                ]
            )
            exact_received.append(
                [
                    (n - 1) * part.get(i.peer_id, 0)
                    + sum(b for owner, b in results.items() if owner != i.peer_id)
                    for i in ids
                ]
            )
    finally:
        for server in servers:
            await server.stop(None)
        for hub in hubs:
            await hub.close()

    def mean(rows: list[list[int]]) -> float:
        return statistics.fmean(v for row in rows for v in row)

    worst = max(
        max(s / e for s, e in zip(row_s, row_e, strict=True))
        for rows_s, rows_e in ((sent, exact_sent), (received, exact_received))
        for row_s, row_e in zip(rows_s, rows_e, strict=True)
    )
    nominal = 2 * (n - 1) / n * numel / 8
    return {
        "n": n,
        "numel": numel,
        "weights": scheme,
        "rounds": rounds,
        "ties": ties,
        "bytes_sent_per_peer": round(mean(sent), 1),
        "bytes_received_per_peer": round(mean(received), 1),
        "nominal_bytes": round(nominal, 1),
        "codec_exact_bytes": round(mean(exact_sent), 1),
        "result_bits_per_param": round(8 * result_bytes / numel, 4),
        "wire_overhead": round(mean(sent) / mean(exact_sent), 4),
        "wire_overhead_received": round(mean(received) / mean(exact_received), 4),
        "wire_overhead_worst_peer": round(worst, 4),
        "bytes_vs_nominal": round(mean(sent) / nominal, 4),
        "round_latency_s": round(statistics.median(latencies), 4),
        "round_latency_all_s": [round(x, 4) for x in latencies],
    }


def plot(configs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"n={c['n']}\nP={c['numel'] / 2**20:g}M\n{c['weights']}" for c in configs]
    xs = range(len(configs))
    left.bar(
        [x - 0.2 for x in xs], [c["wire_overhead"] for c in configs], 0.4, label="vs codec-exact payload"
    )
    left.bar(
        [x + 0.2 for x in xs], [c["bytes_vs_nominal"] for c in configs], 0.4, label="vs nominal 2(n-1)/n·P/8"
    )
    left.axhline(1.03, color="k", linestyle="--", linewidth=1, label="1.03 target")
    left.set_xticks(list(xs), labels, fontsize=7)
    left.set_ylabel("bytes sent per peer / theoretical")
    left.set_title("wire bytes per peer and round")
    left.set_ylim(0, 1.9)
    left.legend(fontsize=7, loc="upper left", ncol=3)
    for scheme in sorted({c["weights"] for c in configs}):
        for numel in sorted({c["numel"] for c in configs}):
            rows = [c for c in configs if c["numel"] == numel and c["weights"] == scheme]
            right.plot(
                [c["n"] for c in rows],
                [1000 * c["round_latency_s"] for c in rows],
                marker="o",
                label=f"P={numel / 2**20:g}M, {scheme}",
            )
    right.set_xlabel("group size n")
    right.set_ylabel("round latency, median (ms)")
    right.set_title("one process, loopback, shared CPU")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run_all(
    sizes: list[int], numels: list[int], rounds: int, schemes: list[str]
) -> list[dict[str, Any]]:
    return [await measure(n, numel, rounds, scheme) for numel in numels for n in sizes for scheme in schemes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small vectors and groups (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per config")
    parser.add_argument("--weights", default="equal,odd", help="comma-separated: equal, odd")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG path")
    parser.add_argument("--no-plot", action="store_true", help="skip the chart")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args()
    schemes = [s for s in args.weights.split(",") if s]
    if not schemes or any(s not in ("equal", "odd") for s in schemes):
        parser.error("--weights takes equal and/or odd")
    sizes, numels = ([2, 4], [2**16, 2**20]) if args.quick else ([2, 4, 8], [2**20, 16 * 2**20])
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        configs = runner.run(run_all(sizes, numels, rounds, schemes))
    result = {
        "bench": "exchange",
        "strategy": "lioncub mavo (sign1 up, tern down)",
        "event_loop": "uvloop" if loop_factory else "asyncio",
        "torch_threads": torch.get_num_threads(),
        "max_wire_overhead": max(c["wire_overhead_worst_peer"] for c in configs),
        "configs": configs,
    }
    if not args.no_plot:
        plot(configs, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        for c in configs:
            print(
                f"n={c['n']} P={c['numel']:>9,} {c['weights']:5s} sent/peer {c['bytes_sent_per_peer']:>12,.0f} B"
                f"  exact {c['codec_exact_bytes']:>12,.0f}  nominal {c['nominal_bytes']:>12,.0f}"
                f"  overhead {c['wire_overhead']:.4f} (worst {c['wire_overhead_worst_peer']:.4f})"
                f"  latency {1000 * c['round_latency_s']:8.1f} ms"
            )


if __name__ == "__main__":
    main()
