"""One Byzantine peer of eight in the in-process simulator: each defence on, and each off.

With every defence on, each adversary mode leaves the final validation loss within 5% of the
clean run; turning the defence that answers a mode off lets that mode do measurable harm.
"""

from __future__ import annotations

import functools

import pytest

from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import StrategyConfig
from lioncub.peer.adversary import ADVERSARY_MODES
from lioncub.peer.simulate import Defences, SimConfig, SimResult, simulate

BYZANTINE = 7
ALL_ON = Defences()


def _run(
    mode: str | None,
    *,
    defences: Defences = ALL_ON,
    reduction: str = "clipped",
    group_size: int = 0,
    rounds: int = 20,
) -> SimResult:
    return simulate(
        SimConfig(
            peers=8,
            rounds=rounds,
            strategy=StrategyConfig(local_steps=4, outer_lr=3e-3),
            group_size=group_size,
            momentum_sync=SyncSchedule(every=4, reduction=reduction),
            averaging=SyncSchedule(every=4, reduction=reduction),
            eval_every=rounds,
            adversaries={} if mode is None else {BYZANTINE: mode},
            defences=defences,
        )
    )


@functools.cache
def _clean() -> float:
    return _run(None).final_val_loss


@pytest.mark.parametrize("mode", ADVERSARY_MODES)
def test_one_byzantine_peer_of_eight_costs_under_five_percent(mode: str) -> None:
    res = _run(mode)
    assert res.final_val_loss < 0.7 * res.initial_val_loss  # it trained
    assert res.final_val_loss <= 1.05 * _clean(), (mode, res.final_val_loss, _clean())
    if mode in ("sign-flip", "all-ones", "random", "wrong-group", "impersonate"):
        assert all(BYZANTINE in evicted for evicted in res.evicted.values()), res.evicted
    if mode == "momentum-poison-nan":
        assert res.rejected_non_finite > 0


def test_a_clean_run_evicts_nobody_and_robust_syncs_cost_nothing() -> None:
    res = _run(None)
    assert all(not evicted for evicted in res.evicted.values()), res.evicted
    plain = _run(None, reduction="mean", defences=Defences(trust=None))
    assert res.final_val_loss == pytest.approx(plain.final_val_loss, rel=0.01)


@pytest.mark.parametrize("verify", [True, False], ids=["defence-on", "defence-off"])
def test_identity_checks_stop_impersonation(verify: bool) -> None:
    # Trust off too: without identity checks the liar's forged votes sit under honest ids.
    res = _run("impersonate", defences=Defences(verify_identity=verify, trust=None))
    if verify:
        assert res.final_val_loss <= 1.05 * _clean()
    else:  # seven forged votes plus its own outvote the seven honest peers
        assert res.final_val_loss > 2 * _clean(), res.final_val_loss


@pytest.mark.parametrize("reduction", ["clipped", "median", "mean"])
def test_robust_float_syncs_stop_huge_momentum(reduction: str) -> None:
    res = _run("momentum-poison-huge", reduction=reduction)
    if reduction == "mean":
        assert not res.final_val_loss < 10 * _clean(), res.final_val_loss  # NaN or exploded
    else:
        assert res.final_val_loss <= 1.05 * _clean()


@pytest.mark.parametrize("reject", [True, False], ids=["defence-on", "defence-off"])
def test_dropping_nan_contributions_keeps_gossip_groups_averaging(reject: bool) -> None:
    """Without the drop, one NaN contribution voids every shard of its group's sync: anchors drift."""
    kwargs = {"group_size": 4, "rounds": 24}
    res = _run("momentum-poison-nan", defences=Defences(reject_non_finite=reject), **kwargs)  # type: ignore[arg-type]
    clean = _run(None, **kwargs)  # type: ignore[arg-type]
    # The spread between the honest anchors right after each averaging (runs are deterministic).
    drift, clean_drift = (sum(r.consensus_distance for r in x.records if r.averaged) for x in (res, clean))
    if reject:
        assert res.rejected_non_finite > 0
        assert drift < 1.15 * clean_drift, (drift, clean_drift)
    else:
        assert res.rejected_non_finite == 0
        assert drift > 1.3 * clean_drift, (drift, clean_drift)
