"""Codecs: round trips, exact sizes, rejection of bad input and bad payloads, golden bytes.

Golden payloads live in ``fixtures/codecs.json``; regenerate them (only after an intended wire
change) with ``LIONCUB_REGEN_FIXTURES=1 pytest tests/optim/test_codecs.py``.
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

from lioncub.optim._bitsign import (
    pack_nonnegative_exact,
    pack_nonnegative_high_bytes,
    pack_nonnegative_numpy,
)
from lioncub.optim.codec import Codec, CodecError, Encoded
from lioncub.optim.codecs import (
    CODEC_NAMES,
    CountsCodec,
    FP16Codec,
    Int8BlockCodec,
    PBitCodec,
    SignCodec,
    TernaryCodec,
    get_codec,
)

NAMES = [
    "sign1",
    "tern",
    "fp16",
    "int8",
    "int8b8",
    "pbit1",
    "pbit2",
    "pbit3",
    "counts1",
    "counts5",
    "counts32",
]
LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 1000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIXTURES = Path(__file__).parent / "fixtures" / "codecs.json"
REGEN = os.environ.get("LIONCUB_REGEN_FIXTURES") == "1"
HEADER = {"pbit": 4, "counts": 4, "tern": 1}


def sample(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "") -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if name.startswith("counts"):
        x = torch.tanh(x)
    if n > 3:
        x[1], x[3] = 0.0, -0.0
    return x.to(dtype)


def expected(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """The exact decode of ``encode(x)`` where the codec is lossless on its own terms."""
    xf = x.float()
    if name == "sign1":
        return torch.where(xf >= 0, 1.0, -1.0)
    if name == "tern":
        return torch.sign(xf)
    if name == "fp16":
        return x.to(torch.float16).float()
    return None


def check_close(name: str, codec: Codec, x: torch.Tensor, y: torch.Tensor) -> None:
    xf = x.float()
    if isinstance(codec, Int8BlockCodec):
        pad = -len(xf) % codec.block
        blocks = torch.cat([xf, xf.new_zeros(pad)]).view(-1, codec.block)
        step = blocks.abs().amax(1).repeat_interleave(codec.block)[: len(xf)] / 127
        assert bool(((y - xf).abs() <= step * 0.5001 + 1e-30).all())
    elif isinstance(codec, CountsCodec):
        assert bool(((y - xf).abs() <= 1.0001 / ((1 << codec.bits) - 1)).all())
    elif isinstance(codec, PBitCodec):
        enc = codec.encode(x)
        q = codec.decode_levels(enc).double()
        scale = xf.abs().double().mean().item() if len(xf) else 0.0
        if scale > 0:
            target = xf.double() / scale * codec.s / 2
            assert bool(((q - target.clamp(-codec.s, codec.s)).abs() <= 0.5 + 1e-5).all())
        assert bool((q.abs() <= codec.s).all())
        torch.testing.assert_close(y.double(), q * 2 / codec.s * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip(name: str, dtype: torch.dtype, n: int) -> None:
    codec = get_codec(name)
    x = sample(n, dtype, seed=n, name=name)
    enc = codec.encode(x)
    assert enc.codec == name and enc.numel == n and enc.data.dtype == torch.uint8 and enc.data.dim() == 1
    assert enc.nbytes in codec.valid_nbytes(n) and enc.nbytes <= codec.encoded_nbytes(n)
    y = codec.decode(enc)
    assert y.shape == (n,) and y.dtype == torch.float32
    want = expected(name, x)
    if want is not None:
        assert torch.equal(y, want)
    else:
        check_close(name, codec, x, y)
    assert codec.decode(enc, dtype=dtype).dtype == dtype
    assert torch.equal(codec.encode(x[:]).data, enc.data)  # deterministic


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_input_matches_contiguous(name: str) -> None:
    codec = get_codec(name)
    for dtype in DTYPES:
        base = sample(2 * 77, dtype, name=name)
        for x in (base[::2], base.view(2, 77).t().reshape(-1)[1::2], base.view(7, 22).t()[3]):
            assert not x.is_contiguous()
            assert torch.equal(codec.encode(x).data, codec.encode(x.contiguous()).data)


@pytest.mark.parametrize("name", NAMES)
def test_encoded_size_is_exact(name: str) -> None:
    codec = get_codec(name)
    header = HEADER.get(name.rstrip("0123456789"), 0)
    for n in LENGTHS:
        nbytes = len(codec.encode(sample(n, name=name)).to_bytes())
        if name == "tern":
            assert nbytes in (1 + (n + 7) // 8, codec.encoded_nbytes(n))
        else:
            assert nbytes == codec.encoded_nbytes(n)
    n = 2048  # a multiple of every block: nominal bits are exact
    assert codec.encoded_nbytes(n) == header + n * codec.bits_per_param() / 8 * (2 if name == "tern" else 1)


def test_nominal_bits() -> None:
    assert SignCodec().bits_per_param() == 1
    assert [PBitCodec(s).bits_per_param() for s in (1, 2, 3, 4, 127)] == [2, 3, 3, 4, 8]
    assert FP16Codec().bits_per_param() == 16
    assert Int8BlockCodec().bits_per_param() == 8 + 32 / 256
    assert CountsCodec(5).bits_per_param() == 5


@given(st.lists(st.integers(0, 2**32 - 1), max_size=150))
@settings(max_examples=150, deadline=None)
def test_sign1_matches_numpy_on_any_fp32_bits(words: list[int]) -> None:
    """Every fp32 bit pattern region (tiny, huge, both zeros) packs like numpy; non-finite is refused."""
    x = torch.from_numpy(np.array(words, dtype=np.uint32).view(np.float32).copy())
    if not bool(torch.isfinite(x).all()):
        with pytest.raises(CodecError, match="NaN/Inf"):
            SignCodec().encode(x)
        x = torch.where(torch.isfinite(x), x, -0.0)
    want = np.packbits(x.numpy() >= 0, bitorder="little")
    assert SignCodec().encode(x).data.numpy().tobytes() == want.tobytes()


def assert_sign_paths_agree(x: torch.Tensor) -> None:
    """The exact, numpy and high-byte sign packers give the same bytes (or the same refusal)."""
    finite = bool(torch.isfinite(x).all())
    paths = [pack_nonnegative_exact]
    if x.dtype in (torch.float32, torch.float64):
        paths.append(pack_nonnegative_numpy)
    if not finite:
        for path in paths:
            with pytest.raises(CodecError, match="NaN/Inf"):
                path(x)
        assert x.numel() == 0 or pack_nonnegative_high_bytes(x.contiguous()) is None
        return
    want = np.packbits(x.double().numpy() >= 0, bitorder="little").tobytes()
    for path in paths:
        assert path(x).numpy().tobytes() == want, path.__name__
    if x.numel():
        fast = pack_nonnegative_high_bytes(x.contiguous())
        assert fast is None or fast.numpy().tobytes() == want


@given(st.lists(st.integers(0, 2**32 - 1), max_size=150), st.integers(0, 150))
@settings(max_examples=150, deadline=None)
def test_sign_paths_agree_on_fp32_bits(words: list[int], cut: int) -> None:
    x = torch.from_numpy(np.array(words, dtype=np.uint32).view(np.float32).copy())
    assert_sign_paths_agree(x)
    finite = torch.where(torch.isfinite(x), x, 1.0)
    assert_sign_paths_agree(finite)
    assert_sign_paths_agree(finite[cut:])  # storage offset not a multiple of 8 bytes
    assert_sign_paths_agree(finite.double())


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_high_byte_path_handles_ordinary_values(dtype: torch.dtype) -> None:
    x = sample(1001, dtype, seed=9)
    x[3] = 0.5  # drop the -0.0, which (correctly) sends the whole vector to the exact path
    fast = pack_nonnegative_high_bytes(x)
    assert fast is not None
    assert torch.equal(fast, pack_nonnegative_exact(x))
    x[3] = -0.0
    assert pack_nonnegative_high_bytes(x) is None


def test_sign_paths_agree_across_chunks() -> None:
    x = sample((1 << 18) * 2 + 13, seed=5)
    x[::1001] = 0.0
    x[7::1003] = -0.0
    x[3::997] = -1e-42  # subnormal: shares its high byte with -0.0
    x[5::991] = 3e38  # huge: shares its high byte with +Inf
    assert_sign_paths_agree(x)
    assert_sign_paths_agree(x[1::2])
    x[(1 << 18) + 5] = math.nan  # in the second chunk
    assert_sign_paths_agree(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_sign1_matches_numpy_on_any_16bit_pattern(dtype: torch.dtype, data: st.DataObject) -> None:
    raw = data.draw(st.lists(st.integers(0, 2**16 - 1), max_size=100))
    x = torch.tensor(raw, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))
    want = np.packbits(x.float().numpy() >= 0, bitorder="little")
    assert SignCodec().encode(x).data.numpy().tobytes() == want.tobytes()
    assert_sign_paths_agree(x)


@given(
    st.lists(st.floats(-1e4, 1e4, width=16), max_size=300),
    st.sampled_from(NAMES),
    st.sampled_from(DTYPES),
)
@settings(max_examples=120, deadline=None)
def test_round_trip_property(values: list[float], name: str, dtype: torch.dtype) -> None:
    codec = get_codec(name)
    x = torch.tensor(values, dtype=torch.float32)
    if name.startswith("counts"):
        x = torch.tanh(x)
    x = x.to(dtype)
    y = codec.decode(codec.encode(x))
    want = expected(name, x)
    if want is not None:
        assert torch.equal(y, want)
    else:
        check_close(name, codec, x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_refused(name: str, bad: float) -> None:
    codec = get_codec(name)
    for dtype in DTYPES:
        for n, at in ((1, 0), (9, 8), (70, 33)):
            x = sample(n, dtype, name=name)
            x[at] = bad
            with pytest.raises(CodecError, match="NaN/Inf"):
                codec.encode(x)
            with pytest.raises(CodecError, match="NaN/Inf"):
                codec.encode(torch.stack([x, x], dim=1)[:, 0])


def test_fp16_overflow_is_refused_not_inf() -> None:
    codec = FP16Codec()
    assert torch.equal(
        codec.decode(codec.encode(torch.tensor([65504.0, -65504.0]))), torch.tensor([65504.0, -65504.0])
    )
    for big in (65520.0, -1e6, 3e38):
        with pytest.raises(CodecError, match="fp16 cannot represent"):
            codec.encode(torch.tensor([0.5, big]))
    with pytest.raises(CodecError, match="fp16 cannot represent"):
        codec.encode(torch.tensor([1e5], dtype=torch.bfloat16))


def test_bad_input_shape_and_dtype() -> None:
    for name in NAMES:
        codec = get_codec(name)
        with pytest.raises(CodecError, match="1-D"):
            codec.encode(torch.zeros(2, 3))
        with pytest.raises(CodecError, match="float"):
            codec.encode(torch.zeros(4, dtype=torch.int32))


def test_encode_does_not_alias_input() -> None:
    for name in NAMES:
        x = sample(16, torch.float16, name=name)
        enc = get_codec(name).encode(x)
        before = enc.to_bytes()
        x.fill_(0.25)
        assert enc.to_bytes() == before


def test_wrong_codec_or_size_is_refused() -> None:
    for name in NAMES:
        codec = get_codec(name)
        enc = codec.encode(sample(21, name=name))
        with pytest.raises(CodecError, match="expected"):
            codec.decode(Encoded("other", enc.numel, enc.data))
        with pytest.raises(CodecError, match="bytes"):
            codec.decode(Encoded(name, enc.numel, enc.data[:-1]))
        with pytest.raises(CodecError, match="bytes"):
            codec.decode(Encoded(name, enc.numel, torch.cat([enc.data, enc.data[:2]])))
        with pytest.raises(CodecError):
            codec.decode(Encoded(name, enc.numel, enc.data.to(torch.int8)))


def _tampered(enc: Encoded, index: int, value: int) -> Encoded:
    data = enc.data.clone()
    data[index] = value
    return Encoded(enc.codec, enc.numel, data)


def test_garbage_payloads_are_refused() -> None:
    x = torch.tensor([1.0, -2.0, 0.0, 3.0, -0.5, 0.0, 2.0, 1.0, -1.0, 0.25])  # 10 elements: 2 bytes/plane
    tern, pbit, counts = TernaryCodec(), PBitCodec(2), CountsCodec(3)
    cases: list[tuple[Codec, Encoded, str]] = [
        (SignCodec(), _tampered(SignCodec().encode(x), 1, 0xFF), "padding"),
        (tern, _tampered(tern.encode(x), 0, 2), "flag"),
        (tern, _tampered(tern.encode(x), 0, 0), "flag"),
        (tern, _tampered(tern.encode(x.abs() + 1), 0, 1), "flag"),
        (tern, _tampered(tern.encode(x), 2, 0x80), "padding"),
        (tern, _tampered(tern.encode(x), 4, 0xFF), "padding"),
        (tern, _tampered(tern.encode(x), 1, 0xFF), "zero element"),
        (tern, Encoded("tern", 10, torch.tensor([1, 0, 0, 0xFF, 0x03], dtype=torch.uint8)), "no zero"),
        (pbit, _tampered(pbit.encode(x), 0 + 4 + 4, 0x01), "level above"),  # plane 2 set on level 0b100+
        (pbit, _tampered(pbit.encode(x), 5, 0xFF), "padding"),
        (pbit, _tampered(pbit.encode(x), 3, 0xFF), "scale"),  # NaN scale
        (pbit, _tampered(pbit.encode(x), 3, 0x80), "level|scale"),  # negative scale
        (Int8BlockCodec(), _tampered(Int8BlockCodec().encode(x), 4, 0x80), "-128"),
        (Int8BlockCodec(), _tampered(Int8BlockCodec().encode(x), 3, 0xFF), "scale"),
        (FP16Codec(), _tampered(FP16Codec().encode(x), 1, 0x7C), "NaN/Inf"),
        (counts, _tampered(counts.encode(x / 4), 0, 0), "total weight"),
        (counts, _tampered(counts.encode(x / 4), 0, 8), "total weight"),
        (counts, _tampered(counts.encode_counts(torch.full((10,), 2), 5), 4 + 4, 0x03), "above the total"),
        (counts, _tampered(counts.encode(x / 4), 5, 0xFC), "padding"),
    ]
    for codec, enc, message in cases:
        with pytest.raises(CodecError, match=message):
            codec.decode(enc)
    zero_scale = PBitCodec(2).encode(torch.zeros(10))
    with pytest.raises(CodecError, match="zero scale"):
        PBitCodec(2).decode(_tampered(zero_scale, 4, 0x01))


def test_counts_encode_checks_range() -> None:
    with pytest.raises(CodecError, match=r"\[-1, 1\]"):
        CountsCodec(4).encode(torch.tensor([0.5, 1.5]))
    with pytest.raises(CodecError, match="counts must lie"):
        CountsCodec(4).encode_counts(torch.tensor([0, 6]), 5)
    with pytest.raises(CodecError, match="total weight"):
        CountsCodec(4).encode_counts(torch.tensor([0, 6]), 16)
    counts, total = CountsCodec(4).decode_counts(CountsCodec(4).encode_counts(torch.tensor([0, 6, 9]), 9))
    assert counts.tolist() == [0, 6, 9] and total == 9


def test_tern_sizes_depend_on_ties() -> None:
    tern = TernaryCodec()
    assert tern.valid_nbytes(0) == (1,) and tern.valid_nbytes(9) == (3, 5)
    assert tern.encode(torch.tensor([1.0, -2.0, 3.0])).to_bytes() == bytes([0, 0b101])
    assert tern.encode(torch.tensor([1.0, 0.0, -3.0])).to_bytes() == bytes([1, 0b001, 0b101])
    assert tern.encode(torch.zeros(0)).to_bytes() == b"\x00"


def test_registry() -> None:
    for name in [*CODEC_NAMES, *NAMES, "pbit127", "counts17", "int8b1", "int8b4096"]:
        codec = get_codec(name)
        assert codec.name == name and codec.spec.name == name
    assert get_codec("pbit3") is get_codec("pbit3")
    for bad in [
        "",
        "sign",
        "pbit0",
        "pbit128",
        "pbit01",
        "counts0",
        "counts33",
        "int8b256",
        "int8b0",
        "fp64",
    ]:
        with pytest.raises(CodecError, match="sign1") as err:
            get_codec(bad)
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError):
        PBitCodec(0)
    with pytest.raises(ValueError):
        CountsCodec(33)
    with pytest.raises(ValueError):
        Int8BlockCodec(0)


def _fixture_cases() -> dict[str, tuple[str, torch.dtype, list[float]]]:
    wave = [round(math.sin(1.7 * i + 0.3) * 3, 3) for i in range(21)]
    signs = [0.5, -0.0, 0.0, -1.25, 3.0, -7.5, 1e-3, -1e-3, 2.0, -2.0, 0.0, 1.0, -1.0]
    return {
        "sign1-fp32": ("sign1", torch.float32, signs),
        "sign1-bf16": ("sign1", torch.bfloat16, signs[:9]),
        "pbit1": ("pbit1", torch.float32, wave),
        "pbit2": ("pbit2", torch.float32, wave),
        "pbit3-fp16": ("pbit3", torch.float16, wave),
        "fp16": ("fp16", torch.float32, wave[:10]),
        "int8": ("int8", torch.float32, wave),
        "int8b8": ("int8b8", torch.float32, wave),
        "tern-ties": ("tern", torch.float32, signs),
        "tern-noties": ("tern", torch.float32, [v for v in signs if v != 0]),
        "counts3": ("counts3", torch.float32, [round(v / 3, 3) for v in wave]),
    }


def _regenerate(path: Path, cases: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")


def test_golden_fixtures() -> None:
    cases = _fixture_cases()
    if REGEN:
        out: dict[str, Any] = {}
        for key, (name, dtype, values) in cases.items():
            codec = get_codec(name)
            enc = codec.encode(torch.tensor(values).to(dtype))
            decoded = codec.decode(enc).tolist()
            out[key] = {
                "codec": name,
                "dtype": str(dtype),
                "input": values,
                "hex": enc.to_bytes().hex(),
                "decoded": decoded,
            }
        _regenerate(FIXTURES, out)
    stored = json.loads(FIXTURES.read_text())
    assert sorted(stored) == sorted(cases), "fixture set changed; regenerate with LIONCUB_REGEN_FIXTURES=1"
    for key, case in stored.items():
        codec = get_codec(case["codec"])
        dtype = getattr(torch, case["dtype"].removeprefix("torch."))
        enc = codec.encode(torch.tensor(case["input"]).to(dtype))
        assert enc.to_bytes().hex() == case["hex"], f"{key}: encoded bytes changed"
        payload = torch.tensor(list(bytes.fromhex(case["hex"])), dtype=torch.uint8)
        got = codec.decode(Encoded(case["codec"], len(case["input"]), payload))
        assert got.tolist() == case["decoded"], f"{key}: decoded values changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_is_lossless_and_rejects_non_finite(dtype: torch.dtype) -> None:
    codec = get_codec("fp32")
    x = torch.randn(1001).to(dtype)[::2]
    enc = codec.encode(x)
    assert enc.nbytes == codec.encoded_nbytes(x.numel()) == 4 * x.numel()
    assert torch.equal(codec.decode(enc, dtype), x)
    with pytest.raises(CodecError, match=r"NaN|Inf|finite"):
        codec.encode(torch.tensor([1.0, float("inf")]))
