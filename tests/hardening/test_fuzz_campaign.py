"""The fuzz campaign of ``bench/fuzz.py`` at a smaller count, with a fixed seed: every target holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._fuzz_cases import METHODS
from bench.fuzz import passed, run_campaign

pytestmark = [pytest.mark.network, pytest.mark.slow]

SEED = 20240607
COUNT = 1500


def test_campaign_meets_every_target(tmp_path: Path) -> None:
    report = run_campaign(SEED, COUNT, budget_s=600.0, corpus=tmp_path / "corpus")
    assert report["cases"] == COUNT  # bounded by count, not by the time budget
    assert report["failing_cases"] == [], report["failing_cases"]
    assert report["forbidden_statuses"] == 0
    assert report["health_after"]
    assert report["state_unchanged"], report["state_diff"]
    assert report["exchange_after_exact"] == {"update": True, "momentum": True}
    assert report["corpus_written"] == []
    assert passed(report)
    # Every RPC got every category that applies to it, and every refusal was counted.
    assert report["categories_per_method"] == {m: sorted(c) for m, c in METHODS.items()}
    assert sum(report["by_status"].values()) == COUNT
    assert set(report["by_method"]) == set(METHODS)
    # Nothing stays buffered after the garbage, and what was held stayed within the stated bound.
    assert report["hub_peak_buffered_bytes"] <= report["hub_buffered_bytes_limit"]
