"""Tests for lioncub.optim.lion: closed form, path parity, reference parity, state, edge cases."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lioncub.optim.lion import Lion, lion_update_


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.LayerNorm(13), nn.Linear(13, 3)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 7, generator=gen).to(dtype)
        y = torch.randn(16, 3, generator=gen).to(dtype)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()


def _reference_lion(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor]],
    lr: float,
    beta1: float,
    beta2: float,
    wd: float,
) -> list[torch.Tensor]:
    """The paper's update written out of place, independently of the module under test."""
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            c = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] * (1 - lr * wd) - lr * torch.sign(c)
            m[i] = beta2 * m[i] + (1 - beta2) * g
    return theta


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "learning rate"),
        ({"lr": math.nan}, "learning rate"),
        ({"lr": math.inf}, "learning rate"),
        ({"betas": (1.0, 0.99)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"betas": (0.9, 0.99, 0.5)}, "pair"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion(_model().parameters(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("foreach", [False, True])
def test_one_step_closed_form(foreach: bool) -> None:
    lr, beta1, beta2, wd = 0.01, 0.9, 0.99, 0.1
    theta0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g = torch.tensor([0.3, -0.7, 0.0, 2.0])
    p = nn.Parameter(theta0.clone())
    opt = Lion([p], lr=lr, betas=(beta1, beta2), weight_decay=wd, foreach=foreach)
    p.grad = g.clone()
    opt.step()
    expected = theta0 * (1 - lr * wd) - lr * torch.sign((1 - beta1) * g)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - beta2) * g, rtol=0, atol=1e-8)
    # sign(0) = 0: the coordinate with zero gradient only decays.
    assert p[2].item() == pytest.approx(0.5 * (1 - lr * wd), abs=1e-7)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_foreach_and_reference_paths_agree(wd: float) -> None:
    a, b = _model(3), _model(3)
    opt_a = Lion(a.parameters(), lr=3e-3, weight_decay=wd, foreach=False)
    opt_b = Lion(b.parameters(), lr=3e-3, weight_decay=wd, foreach=True)
    _train(a, opt_a, steps=8)
    _train(b, opt_b, steps=8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_out_of_place_reference(foreach: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads_per_step = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    lr, beta1, beta2, wd = 1e-2, 0.9, 0.99, 0.1
    expected = _reference_lion(params, grads_per_step, lr, beta1, beta2, wd)
    live = [nn.Parameter(p.clone()) for p in params]
    opt = Lion(live, lr=lr, betas=(beta1, beta2), weight_decay=wd, foreach=foreach)
    for grads in grads_per_step:
        for p, g in zip(live, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(live, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5),
    lr=st.floats(min_value=0.0, max_value=0.1),
    beta1=st.floats(min_value=0.0, max_value=0.999),
    beta2=st.floats(min_value=0.0, max_value=0.999),
    wd=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_functional_paths_agree_property(
    sizes: list[int], lr: float, beta1: float, beta2: float, wd: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in sizes]
    momenta = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    out = []
    for foreach in (False, True):
        ps = [p.clone() for p in params]
        ms = [m.clone() for m in momenta]
        lion_update_(ps, grads, ms, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, foreach=foreach)
        out.append((ps, ms))
    for x, y in zip(out[0][0] + out[0][1], out[1][0] + out[1][1], strict=True):
        assert torch.equal(x, y)


def test_state_dict_round_trip_resumes_identically() -> None:
    model = _model(1)
    opt = Lion(model.parameters(), lr=1e-3, weight_decay=0.01)
    _train(model, opt, steps=3, seed=10)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, steps=3, seed=11)

    resumed = _model(99)
    resumed.load_state_dict(saved_model)
    resumed_opt = Lion(resumed.parameters(), lr=0.5)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 1e-3
    _train(resumed, resumed_opt, steps=3, seed=11)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_gradient_and_zero_momentum_leave_parameter_unchanged() -> None:
    p = nn.Parameter(torch.tensor([1.5, -0.25]))
    opt = Lion([p], lr=0.1)
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.5, -0.25]))


def test_params_without_grad_are_skipped() -> None:
    used = nn.Parameter(torch.ones(3))
    unused = nn.Parameter(torch.ones(3))
    opt = Lion([used, unused], lr=0.1)
    used.grad = torch.ones(3)
    opt.step()
    assert torch.equal(unused.detach(), torch.ones(3))
    assert unused not in opt.state
    assert torch.allclose(used.detach(), torch.full((3,), 0.9))


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Lion(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()  # type: ignore[no-untyped-call]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(dtype: torch.dtype) -> None:
    a, b = _model(2, dtype), _model(2, dtype)
    before = [p.detach().clone() for p in a.parameters()]
    opt_a = Lion(a.parameters(), lr=1e-2, foreach=False)
    opt_b = Lion(b.parameters(), lr=1e-2, foreach=True)
    _train(a, opt_a, steps=3)
    _train(b, opt_b, steps=3)
    for p, q, p0 in zip(a.parameters(), b.parameters(), before, strict=True):
        assert p.dtype == dtype
        assert opt_a.state[p]["exp_avg"].dtype == dtype
        assert torch.equal(p, q)
        assert not torch.equal(p, p0)


def test_closure_is_evaluated_with_grad_and_returned() -> None:
    model = _model(4)
    opt = Lion(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 7), torch.randn(8, 3)

    def closure() -> float:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.detach())

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert opt.step() is None


def test_param_groups_use_their_own_hyperparameters() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    groups: list[dict[str, Any]] = [{"params": [a], "lr": 0.1}, {"params": [b]}]
    opt = Lion(groups, lr=0.01)
    a.grad, b.grad = torch.ones(2), -torch.ones(2)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.01))


def test_default_path_choice_is_reference_on_cpu() -> None:
    params = list(_model().parameters())
    assert Lion._use_foreach(None, params) is False
    assert Lion._use_foreach(True, params) is True


def test_functional_validates_inputs() -> None:
    p, g, m = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="same length"):
        lion_update_([p], [g, g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match="must match"):
        lion_update_([p], [torch.zeros(4)], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match="must match"):
        lion_update_([p], [g.double()], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match="float dtype"):
        lion_update_(
            [torch.zeros(3, dtype=torch.int64)], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0
        )
    with pytest.raises(ValueError, match="beta1"):
        lion_update_([p], [g], [m], lr=0.1, beta1=1.5, beta2=0.99, weight_decay=0.0)
