"""Votes on packed payloads: agreement with naive numpy, weights, ties, validation, golden bytes.

Golden results live in ``fixtures/votes.json``; regenerate them (only after an intended change)
with ``LIONCUB_REGEN_FIXTURES=1 pytest tests/optim/test_vote.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lioncub.optim.codec import CodecError, Encoded
from lioncub.optim.codecs import CountsCodec, PBitCodec, SignCodec, TernaryCodec
from lioncub.optim.vote import (
    majority_vote,
    majority_vote_reference,
    pbit_sum_sign,
    vote_counts,
    vote_counts_reference,
)

SIGN, TERN = SignCodec(), TernaryCodec()
FIXTURES = Path(__file__).parent / "fixtures" / "votes.json"
REGEN = os.environ.get("LIONCUB_REGEN_FIXTURES") == "1"
LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 127, 129, 200, 1000]


def random_parts(count: int, numel: int, seed: int) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    return [SIGN.encode(torch.randn(numel, generator=gen)) for _ in range(count)]


def naive(parts: list[Encoded], weights: list[int] | None) -> tuple[np.ndarray, int]:
    """Weighted +1 counts and total weight from decoded floats, with no gcd reduction."""
    ws = weights if weights is not None else [1] * len(parts)
    counts = np.zeros(parts[0].numel, dtype=object)
    for part, w in zip(parts, ws, strict=True):
        counts = counts + (SIGN.decode(part).numpy() > 0).astype(np.int64).astype(object) * w
    return counts, sum(ws)


def check_against_naive(parts: list[Encoded], weights: list[int] | None) -> None:
    counts, total = naive(parts, weights)
    result = majority_vote(parts, weights)
    assert result.to_bytes() == majority_vote_reference(parts, weights).to_bytes()
    want = np.sign(2 * counts - total).astype(np.float32) if len(counts) else np.zeros(0, np.float32)
    assert np.array_equal(TERN.decode(result).numpy(), want)
    tally = vote_counts(parts, weights)
    assert tally.codec == vote_counts_reference(parts, weights).codec
    assert tally.to_bytes() == vote_counts_reference(parts, weights).to_bytes()
    codec = CountsCodec(int(tally.codec.removeprefix("counts")))
    got, reduced_total = codec.decode_counts(tally)
    divisor = total // reduced_total
    assert [int(c) for c in got] == [c // divisor for c in counts]
    assert codec.decode(tally, torch.float64).tolist() == pytest.approx(
        [(2 * c - total) / total for c in counts]
    )


@pytest.mark.parametrize("numel", LENGTHS)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 16, 17])
def test_unweighted_matches_naive(numel: int, count: int) -> None:
    check_against_naive(random_parts(count, numel, seed=numel * 31 + count), None)


@given(
    numel=st.sampled_from(LENGTHS),
    count=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    weights=st.one_of(st.none(), st.lists(st.integers(0, 2**20), min_size=40, max_size=40)),
)
@settings(max_examples=80, deadline=None)
def test_weighted_matches_naive(numel: int, count: int, seed: int, weights: list[int] | None) -> None:
    if weights is not None:
        weights = weights[:count]
        if not any(weights):
            weights[0] = 1
    check_against_naive(random_parts(count, numel, seed), weights)


@given(numel=st.sampled_from(LENGTHS), half=st.integers(1, 20), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_even_groups_tie(numel: int, half: int, seed: int) -> None:
    """Voters paired with their exact opposite tie everywhere: the result is all zeros."""
    parts = random_parts(half, numel, seed)
    opposite = [SIGN.encode(-SIGN.decode(p)) for p in parts]
    for p, q in zip(parts, opposite, strict=True):  # x >= 0 flips exactly since no element is 0
        assert torch.equal(SIGN.decode(p), -SIGN.decode(q))
    result = majority_vote(parts + opposite)
    assert bool((TERN.decode(result) == 0).all())
    assert result.nbytes == (1 + 2 * ((numel + 7) // 8) if numel else 1)
    check_against_naive(parts + opposite, None)


@pytest.mark.parametrize("count", [254, 255, 256])
def test_many_voters(count: int) -> None:
    parts = random_parts(count, 333, seed=count)
    check_against_naive(parts, None)
    check_against_naive(parts, [2**20 - (i % 7) for i in range(count)])


def test_large_weights_and_gcd() -> None:
    parts = random_parts(6, 100, seed=7)
    for weights in ([2**20] * 6, [2**20, 2**19, 2**20 - 1, 1, 0, 2**20], [3, 5, 7, 11, 13, 17]):
        check_against_naive(parts, weights)
    assert majority_vote(parts, [4] * 6).to_bytes() == majority_vote(parts).to_bytes()
    assert vote_counts(parts, [6] * 6).to_bytes() == vote_counts(parts).to_bytes()
    assert (
        vote_counts(parts, [4, 6, 2, 2, 8, 10]).to_bytes()
        == vote_counts(parts, [2, 3, 1, 1, 4, 5]).to_bytes()
    )
    assert vote_counts(parts).codec == "counts3"


def test_zero_weight_voter_is_ignored() -> None:
    a, b, c = random_parts(3, 77, seed=3)
    assert majority_vote([a, b, c], [1, 0, 1]).to_bytes() == majority_vote([a, c]).to_bytes()


def test_single_voter_is_its_sign() -> None:
    (part,) = random_parts(1, 70, seed=1)
    assert torch.equal(TERN.decode(majority_vote([part])), SIGN.decode(part))


def test_validation() -> None:
    parts = random_parts(3, 20, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])
    with pytest.raises(ValueError, match="3 weights"):
        majority_vote(parts[:2], [1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        majority_vote(parts, [1, -1, 1])
    with pytest.raises(ValueError, match="positive"):
        vote_counts(parts, [0, 0, 0])
    with pytest.raises(ValueError, match="integers"):
        majority_vote(parts, [1, 1.5, 1])  # type: ignore[list-item]
    with pytest.raises(CodecError, match="elements"):
        majority_vote([*parts, *random_parts(1, 21, seed=0)])
    fp16 = Encoded("fp16", 20, torch.zeros(40, dtype=torch.uint8))
    with pytest.raises(CodecError, match="fp16"):
        majority_vote([*parts, fp16])
    bad = parts[0].data.clone()
    bad[-1] |= 0xF0  # elements 20..23 do not exist
    with pytest.raises(CodecError, match="padding"):
        majority_vote([parts[1], Encoded("sign1", 20, bad)])
    with pytest.raises(CodecError, match="bytes"):
        vote_counts([Encoded("sign1", 20, bad[:-1])])
    with pytest.raises(ValueError, match="uint32"):
        vote_counts(random_parts(2, 8, seed=0), [2**32 - 1, 2**32 - 2])


def pbit_parts(s: int, count: int, numel: int, seed: int) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    return [PBitCodec(s).encode(torch.randn(numel, generator=gen)) for _ in range(count)]


@given(
    s=st.sampled_from([1, 2, 3]),
    numel=st.sampled_from(LENGTHS),
    count=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    weights=st.one_of(st.none(), st.lists(st.integers(0, 50), min_size=12, max_size=12)),
)
@settings(max_examples=40, deadline=None)
def test_pbit_sum_sign(s: int, numel: int, count: int, seed: int, weights: list[int] | None) -> None:
    parts = pbit_parts(s, count, numel, seed)
    ws = weights[:count] if weights is not None else [1] * count
    if not any(ws):
        ws[0] = 1
    total = sum(
        (w * PBitCodec(s).decode_levels(p).long() for p, w in zip(parts, ws, strict=True)),
        torch.zeros(numel, dtype=torch.long),
    )
    result = pbit_sum_sign(parts, ws if weights is not None else None)
    assert torch.equal(TERN.decode(result), torch.sign(total).float())


def test_pbit_sum_sign_validation() -> None:
    with pytest.raises(CodecError, match="pbit2"):
        pbit_sum_sign(pbit_parts(1, 1, 10, 0) + pbit_parts(2, 1, 10, 0))
    with pytest.raises(CodecError, match="pbit"):
        pbit_sum_sign(random_parts(2, 10, 0))


def _fixture_results() -> dict[str, Encoded]:
    rows = [[math.sin(0.9 * i + j) for i in range(21)] for j in range(5)]
    parts = [SIGN.encode(torch.tensor(row)) for row in rows]
    levels = [PBitCodec(2).encode(torch.tensor(row)) for row in rows]
    return {
        "majority-5": majority_vote(parts),
        "majority-weighted": majority_vote(parts, [3, 1, 1, 2, 2]),
        "majority-4-ties": majority_vote(parts[:4]),
        "counts-5": vote_counts(parts),
        "counts-weighted": vote_counts(parts, [30, 10, 10, 20, 20]),
        "pbit2-sum-sign": pbit_sum_sign(levels, [1, 2, 1, 1, 3]),
    }


def test_golden_fixtures() -> None:
    results = _fixture_results()
    if REGEN:
        out: dict[str, Any] = {
            key: {"codec": e.codec, "numel": e.numel, "hex": e.to_bytes().hex()} for key, e in results.items()
        }
        FIXTURES.parent.mkdir(parents=True, exist_ok=True)
        FIXTURES.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    stored = json.loads(FIXTURES.read_text())
    assert sorted(stored) == sorted(results), "fixture set changed; regenerate with LIONCUB_REGEN_FIXTURES=1"
    for key, enc in results.items():
        assert (enc.codec, enc.numel, enc.to_bytes().hex()) == (
            stored[key]["codec"],
            stored[key]["numel"],
            stored[key]["hex"],
        ), key
