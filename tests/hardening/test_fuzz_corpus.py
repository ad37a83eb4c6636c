"""Replay the committed fuzz corpus (``tests/fuzz_corpus/``) against a fresh peer of each case's seed.

The corpus holds one case per (RPC, category) from a passing campaign plus every case a campaign
ever failed on (``bench/fuzz.py`` writes them there); each must be refused without a state change.
Admission timestamps in stored JoinGroup / DownloadState cases age, so those replays are refused as
expired at the latest: still an error status, which is what is checked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from bench._fuzz_cases import Case
from bench._fuzz_peer import FuzzPeer
from bench.fuzz import acceptable, load_corpus, send

pytestmark = pytest.mark.network

CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"


def _by_seed() -> dict[int, list[Case]]:
    cases: dict[int, list[Case]] = defaultdict(list)
    for seed, case in load_corpus(CORPUS):
        cases[seed].append(case)
    return dict(cases)


def test_corpus_is_present_and_covers_every_rpc() -> None:
    methods = {case.method for cases in _by_seed().values() for case in cases}
    assert methods == {"Health", "JoinGroup", "PushShard", "PullResult", "DownloadState", "CheckReachable"}


@pytest.mark.parametrize("seed", sorted(_by_seed()))
def test_corpus_replays_are_refused_without_state_change(seed: int) -> None:
    with FuzzPeer.start(seed) as peer:
        before = peer.digest()
        outcomes = [(case, send(peer.channel, case)) for case in _by_seed()[seed]]
        bad = [(c.method, c.category, c.variant, o) for c, o in outcomes if not acceptable(c, o)]
        assert bad == []
        assert peer.digest() == before
        assert peer.finish_exchange() == {"update": True, "momentum": True}
