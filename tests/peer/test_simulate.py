"""The in-process simulator: every strategy trains `tiny`, runs are deterministic, bytes are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lioncub.optim.codecs import get_codec
from lioncub.optim.partition import shard_bounds
from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import StrategyConfig
from lioncub.peer.cli import main
from lioncub.peer.simulate import SimConfig, simulate

STRATEGIES = [
    StrategyConfig(name="lioncub", local_steps=4, outer_lr=3e-3),
    StrategyConfig(name="lioncub", local_steps=4, outer_lr=3e-3, reduction="avg"),
    StrategyConfig(name="lioncub", local_steps=0, outer_lr=1e-3),
    StrategyConfig(name="lioncub-l1", local_steps=4, outer_lr=3e-3),
    StrategyConfig(name="diloco", local_steps=4, outer_lr=0.7),
    StrategyConfig(name="allreduce", local_steps=0, outer_lr=1e-3),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: f"{s.name}-{s.reduction}-H{s.local_steps}")
def test_tiny_converges_for_every_strategy(strategy: StrategyConfig) -> None:
    rounds = 40 if strategy.local_steps == 0 else 15
    res = simulate(SimConfig(peers=4, rounds=rounds, strategy=strategy, eval_every=rounds))
    assert res.final_val_loss < 0.7 * res.initial_val_loss, (res.initial_val_loss, res.final_val_loss)
    # Everyone is in every group, so the anchors never drift apart.
    assert res.records[-1].consensus_distance == pytest.approx(0.0, abs=1e-7)


def test_runs_are_deterministic() -> None:
    cfg = SimConfig(peers=3, rounds=4, strategy=StrategyConfig(local_steps=2), eval_every=2, seed=7)
    a = [r.val_loss for r in simulate(cfg).records]
    b = [r.val_loss for r in simulate(cfg).records]
    assert a == b


def test_sign_bytes_are_exact() -> None:
    """Reduce-scatter + all-gather payload bytes: n−1 shards up, n−1 results down, per peer."""
    peers, rounds = 4, 3
    cfg = SimConfig(peers=peers, rounds=rounds, strategy=StrategyConfig(local_steps=1), eval_every=rounds)
    res = simulate(cfg)
    numel = res.num_params
    bounds = shard_bounds(numel, [1.0] * peers)
    sign, tern = get_codec("sign1"), get_codec("tern")
    up = [sign.encoded_nbytes(hi - lo) for lo, hi in bounds]
    total_up = sum(up)
    # Each peer sends its shards to the other owners and, as owner, n−1 copies of its result.
    sent_without_results = sum(total_up - up[m] for m in range(peers)) / peers
    sent = res.records[-1].bytes_sent_per_peer / rounds
    result_bytes = (sent - sent_without_results) * peers / (peers - 1)
    # A tern result is 1 bit/param plus a flag byte, or 2 bits/param when some vote tied.
    low = sum(tern.encoded_nbytes(hi - lo) for lo, hi in bounds) / 2
    assert low <= result_bytes <= sum(tern.encoded_nbytes(hi - lo) for lo, hi in bounds)
    assert res.records[-1].bytes_sent_per_peer == pytest.approx(res.records[-1].bytes_received_per_peer)


def test_gossip_groups_drift_and_averaging_pulls_back() -> None:
    base = {
        "peers": 6,
        "rounds": 12,
        "group_size": 2,
        "strategy": StrategyConfig(local_steps=2),
        "eval_every": 12,
    }
    drift = simulate(SimConfig(**base)).records  # type: ignore[arg-type]
    avg = simulate(SimConfig(**base, averaging=SyncSchedule(every=4))).records  # type: ignore[arg-type]
    assert max(r.consensus_distance for r in drift) > 0
    # Averaging runs inside each (gossip) group, so it shrinks the spread without erasing it.
    assert avg[3].averaged and avg[3].consensus_distance < avg[2].consensus_distance
    assert avg[-1].consensus_distance < drift[-1].consensus_distance


def test_momentum_sync_is_logged_on_schedule() -> None:
    cfg = SimConfig(
        peers=2, rounds=6, strategy=StrategyConfig(local_steps=1), momentum_sync=SyncSchedule(every=3)
    )
    recs = simulate(cfg).records
    assert [r.round for r in recs if r.momentum_synced] == [3, 6]


def test_cli_simulate_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    code = main(
        ["simulate", "--peers", "2", "--rounds", "3", "--local-steps", "2", "--json", str(out), "--quiet"]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["peers"] == 2 and len(doc["records"]) == 3
    assert doc["bytes_sent_per_peer"] > 0


def test_cli_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--strategy", "allreduce", "--local-steps", "3", "--quiet"])
    assert code == 2
    assert "local_steps=0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--peers", "0"])
    assert exc.value.code == 2
