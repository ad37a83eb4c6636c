"""Fuzz campaign: thousands of malformed messages at every RPC of a live peer, then check nothing changed.

A real :class:`~lioncub.peer.server.PeerServer` on 127.0.0.1 (port 0) with an exchange hub holding open
slots, a state service, a matchmaker on a real DHT node and a dial-back handler
(:mod:`bench._fuzz_peer`) receives ``--count`` cases drawn from :mod:`bench._fuzz_cases` (malformed,
truncated, oversized, invalid fields, wrong codec, wrong round, replayed, unsigned, wrongly signed,
wrong run / group, impersonated), for at most ``--budget-s`` seconds. Targets, checked afterwards:

* no ``INTERNAL`` / ``UNKNOWN`` status, no hang (``DEADLINE_EXCEEDED``), no accepted bad message:
  every case gets an error status, except in-band refusals (``JoinGroup``: a ``REJECTED`` reply;
  ``CheckReachable``: ``reachable = false``; ``Health`` is open to anyone);
* Health still answers; the peer's state digest (slots, contributions, results, state snapshot,
  matchmaking) is unchanged, no push bytes stay buffered, and the round then completes with results
  byte-identical to the reference reduction of the legit parts;
* RSS growth of the process (server and client share it) is reported.

Every case that misses a target is written to ``--corpus`` (JSON: seed, index, RPC, category, the
request bytes) and replayed by ``tests/hardening/test_fuzz_corpus.py``. ``--flood`` adds the memory
flood of :mod:`bench._fuzz_flood`.

Usage: ``python bench/fuzz.py [--seed S] [--count N] [--budget-s T] [--json OUT] [--corpus DIR]
[--seed-corpus] [--flood]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import psutil

from bench._fuzz_cases import METHODS, Case, draw_case
from bench._fuzz_peer import SERVICE, FuzzPeer
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["ACCEPTABLE_ERRORS", "IN_BAND", "acceptable", "load_corpus", "run_campaign", "send", "write_case"]

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus"
#: Error statuses a refused message may get (never INTERNAL, UNKNOWN, or a client-side timeout).
ACCEPTABLE_ERRORS = frozenset(
    {
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
)
#: Successful answers that still refuse (or are harmless), per RPC.
IN_BAND = {"JoinGroup": "OK:REJECTED", "CheckReachable": "OK:UNREACHABLE", "Health": "OK:HEALTH"}
CALL_TIMEOUT_S = 10.0


def _code(exc: grpc.RpcError) -> str:
    return str(exc.code().name)  # type: ignore[attr-defined]


def send(channel: grpc.Channel, case: Case) -> str:
    """Send ``case`` as raw bytes; the status name, or ``OK`` / ``OK:<what the reply says>``."""
    path = SERVICE + case.method
    try:
        if case.method == "PushShard":
            channel.stream_unary(path)(iter(case.messages), timeout=CALL_TIMEOUT_S)
            return "OK"
        if case.method in ("Health", "CheckReachable"):
            raw = channel.unary_unary(path)(case.messages[0], timeout=CALL_TIMEOUT_S)
            if case.method == "Health":
                return "OK:HEALTH"
            reply = pb.ReachabilityReply.FromString(raw)
            return "OK:REACHABLE" if reply.reachable else "OK:UNREACHABLE"
        replies = list(channel.unary_stream(path)(case.messages[0], timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        return _code(exc)
    if case.method == "JoinGroup":
        statuses = {pb.JoinGroupReply.FromString(r).status for r in replies}
        return "OK:REJECTED" if statuses == {pb.JoinGroupReply.STATUS_REJECTED} else "OK"
    return "OK"


def acceptable(case: Case, outcome: str) -> bool:
    """Whether ``outcome`` refuses ``case`` properly (see the module docstring)."""
    return outcome in ACCEPTABLE_ERRORS or IN_BAND.get(case.method) == outcome


def write_case(corpus: Path, seed: int, index: int, case: Case, outcome: str) -> Path:
    """Store a case as JSON (request bytes in base64), named by its content."""
    doc = {
        "seed": seed,
        "index": index,
        "method": case.method,
        "category": case.category,
        "variant": case.variant,
        "outcome": outcome,
        "messages_b64": [base64.b64encode(m).decode() for m in case.messages],
    }
    digest = hashlib.sha256(json.dumps(doc["messages_b64"]).encode()).hexdigest()[:12]
    corpus.mkdir(parents=True, exist_ok=True)
    path = corpus / f"{case.method}-{case.category}-{digest}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_corpus(corpus: Path) -> list[tuple[int, Case]]:
    """Every stored case with the seed of the peer it was made against."""
    out = []
    for path in sorted(corpus.glob("*.json")):
        doc = json.loads(path.read_text())
        messages = tuple(base64.b64decode(m) for m in doc["messages_b64"])
        out.append((int(doc["seed"]), Case(doc["method"], doc["category"], doc["variant"], messages)))
    return out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def run_campaign(
    seed: int,
    count: int,
    budget_s: float,
    *,
    corpus: Path | None = None,
    seed_corpus: bool = False,
) -> dict[str, Any]:
    """Run the campaign (see the module docstring) and return its report as plain data."""
    with FuzzPeer.start(seed) as peer:
        return _campaign(peer, seed, count, budget_s, corpus, seed_corpus)


def _campaign(
    peer: FuzzPeer, seed: int, count: int, budget_s: float, corpus: Path | None, seed_corpus: bool
) -> dict[str, Any]:
    rng = random.Random(seed)
    closed_port = _closed_port()
    before = peer.digest()
    rss_before = _rss()
    by_status: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    by_method: dict[str, Counter[str]] = defaultdict(Counter)
    failures: list[dict[str, Any]] = []
    written: list[str] = []
    seen_pairs: set[tuple[str, str]] = set()
    grpc_messages = 0
    rss_peak = rss_before
    start = time.monotonic()
    sent = 0
    for index in range(count):
        if time.monotonic() - start > budget_s:
            break
        case = draw_case(rng, peer, closed_port)
        outcome = send(peer.channel, case)
        sent += 1
        grpc_messages += max(1, len(case.messages))
        by_status[outcome] += 1
        by_category[case.category][outcome] += 1
        by_method[case.method][outcome] += 1
        if not acceptable(case, outcome):
            failures.append({"index": index, "method": case.method, "category": case.category,
                             "variant": case.variant, "outcome": outcome})  # fmt: skip
            if corpus is not None:
                written.append(str(write_case(corpus, seed, index, case, outcome)))
        elif (
            seed_corpus
            and corpus is not None
            and (case.method, case.category) not in seen_pairs
            and sum(map(len, case.messages)) <= 64 << 10  # keep the committed corpus small
        ):
            seen_pairs.add((case.method, case.category))
            written.append(str(write_case(corpus, seed, index, case, outcome)))
        if index % 250 == 0:
            rss_peak = max(rss_peak, _rss())
    seconds = time.monotonic() - start
    health = peer.health()
    after = peer.digest()
    rss_after = _rss()
    exchange = peer.finish_exchange()
    coverage = {m: sorted(c for c in cats if by_category[c]) for m, cats in METHODS.items()}
    return {
        "bench": "fuzz",
        "seed": seed,
        "count_requested": count,
        "budget_s": budget_s,
        "cases": sent,
        "grpc_messages": grpc_messages,
        "seconds": round(seconds, 2),
        "cases_per_s": round(sent / seconds, 1) if seconds else None,
        "by_status": dict(sorted(by_status.items())),
        "by_category": {k: dict(sorted(v.items())) for k, v in sorted(by_category.items())},
        "by_method": {k: dict(sorted(v.items())) for k, v in sorted(by_method.items())},
        "categories_per_method": coverage,
        "forbidden_statuses": sum(by_status[s] for s in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")),
        "failures": len(failures),
        "failing_cases": failures[:20],
        "health_after": bool(health.alive and health.peer_id == peer.owner.peer_id),
        "state_unchanged": before == after,
        "state_digest_before": FuzzPeer.digest_hash(before),
        "state_digest_after": FuzzPeer.digest_hash(after),
        "state_diff": {k: [before[k], after[k]] for k in before if before[k] != after.get(k)},
        "exchange_after_exact": exchange,
        "hub_peak_buffered_bytes": peer.hub.peak_buffered_bytes,
        "hub_buffered_bytes_limit": peer.hub.config.max_buffered_bytes,
        "rss_mib_before": round(rss_before / 2**20, 1),
        "rss_mib_peak_sampled": round(max(rss_peak, rss_after) / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
        "rss_mib_growth": round((rss_after - rss_before) / 2**20, 1),
        "corpus_written": written,
    }


def passed(report: dict[str, Any]) -> bool:
    """Whether a campaign report meets every target."""
    return bool(
        report["failures"] == 0
        and report["forbidden_statuses"] == 0
        and report["health_after"]
        and report["state_unchanged"]
        and all(report["exchange_after_exact"].values())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the peer and of the cases")
    parser.add_argument("--count", type=int, default=10_000, help="cases to send at most")
    parser.add_argument("--budget-s", type=float, default=600.0, help="seconds to send cases for at most")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="where failing cases go")
    parser.add_argument(
        "--seed-corpus", action="store_true", help="also store one passing case per RPC+category"
    )
    parser.add_argument(
        "--flood", action="store_true", help="also run the memory flood (bench/_fuzz_flood.py)"
    )
    args = parser.parse_args()
    if args.count < 1 or args.budget_s <= 0:
        parser.error("--count and --budget-s must be positive")
    logging.basicConfig(level=logging.ERROR)
    report = run_campaign(
        args.seed, args.count, args.budget_s, corpus=args.corpus, seed_corpus=args.seed_corpus
    )
    report["passed"] = passed(report)
    if args.flood:
        from bench._fuzz_flood import run_flood

        report["flood"] = run_flood(args.seed)
        report["passed"] = report["passed"] and report["flood"]["passed"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
