"""The Lion optimizer (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

One step, per parameter θ with gradient g and momentum m (decoupled weight decay λ, learning rate η)::

    c = β1·m + (1 − β1)·g
    θ ← θ·(1 − η·λ) − η·sign(c)
    m ← β2·m + (1 − β2)·g

``sign`` is :func:`torch.sign`, so a coordinate whose ``c`` is exactly zero is left unchanged by the
sign term.

There are two implementations behind one signature, :func:`lion_update_`:

* the per-parameter reference path (``foreach=False``): a plain loop, one tensor at a time;
* the multi-tensor path (``foreach=True``): the same operations, in the same order, expressed with
  ``torch._foreach_*`` kernels over all tensors of one device and dtype at once.

Because both paths perform the same floating-point operations in the same order they agree
bit for bit on CPU; the tests lock that in. :class:`Lion` picks the multi-tensor path by default
when every parameter of a group lives on a CUDA device (where it saves many kernel launches) and the
reference path otherwise (on CPU ``_foreach_*`` is a loop in C++ and buys little).

Precision: the momentum ``exp_avg`` is kept in the parameter's dtype. With bf16/fp16 parameters the
momentum is therefore bf16/fp16 too, which is usually fine for Lion (only the sign of ``c`` is
used) but loses small gradient contributions; keep fp32 master weights if that matters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["Lion", "lion_update_"]


def _check_hyperparameters(lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """Raise ``ValueError`` unless the hyperparameters describe a valid Lion step."""
    if isinstance(lr, Tensor):
        raise TypeError("Lion: lr must be a Python float, not a Tensor")
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Lion: invalid learning rate {lr!r}; it must be a finite number >= 0")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"Lion: invalid {name} {beta!r}; it must satisfy 0 <= {name} < 1")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Lion: invalid weight_decay {weight_decay!r}; it must be a finite number >= 0")


def _single_tensor_lion_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Reference path: one parameter at a time."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
        param.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


def _multi_tensor_lion_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Multi-tensor path: the reference operations, batched per (device, dtype) group."""
    groups: defaultdict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]]
    groups = defaultdict(lambda: ([], [], []))
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bucket = groups[(param.device, param.dtype)]
        bucket[0].append(param)
        bucket[1].append(grad)
        bucket[2].append(exp_avg)
    for ps, gs, ms in groups.values():
        if weight_decay != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        updates = torch._foreach_mul(ms, beta1)
        torch._foreach_add_(updates, gs, alpha=1.0 - beta1)
        torch._foreach_sign_(updates)
        torch._foreach_add_(ps, updates, alpha=-lr)
        torch._foreach_mul_(ms, beta2)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta2)


def lion_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """Apply one Lion step in place to ``params`` and their momenta ``exp_avgs``.

    Args:
        params: tensors to update in place (any float dtype, any device).
        grads: one dense gradient per parameter, same shape, dtype and device.
        exp_avgs: one momentum tensor per parameter, same shape, dtype and device; updated in place.
        lr: learning rate η (>= 0).
        beta1: interpolation factor β1 for the update direction (0 <= β1 < 1).
        beta2: momentum decay β2 (0 <= β2 < 1).
        weight_decay: decoupled weight decay λ (>= 0); θ is scaled by ``1 - lr * weight_decay``.
        foreach: use the multi-tensor ``torch._foreach_*`` path instead of the per-tensor loop.

    Raises:
        ValueError: on invalid hyperparameters or mismatched lists/shapes/dtypes/devices.
        RuntimeError: on sparse gradients.
    """
    _check_hyperparameters(lr, beta1, beta2, weight_decay)
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError(
            f"lion_update_: got {len(params)} params, {len(grads)} grads and {len(exp_avgs)} exp_avgs; "
            "the three lists must have the same length"
        )
    for i, (param, grad, exp_avg) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        if grad.is_sparse or exp_avg.is_sparse:
            raise RuntimeError("Lion does not support sparse gradients; use dense gradients instead")
        if not torch.is_floating_point(param):
            raise ValueError(
                f"lion_update_: params[{i}] has dtype {param.dtype}; Lion needs a real float dtype"
            )
        for what, other in (("grads", grad), ("exp_avgs", exp_avg)):
            if other.shape != param.shape or other.dtype != param.dtype or other.device != param.device:
                raise ValueError(
                    f"lion_update_: {what}[{i}] is {tuple(other.shape)}/{other.dtype}/{other.device} but "
                    f"params[{i}] is {tuple(param.shape)}/{param.dtype}/{param.device}; they must match"
                )
    _apply(
        params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, foreach=foreach
    )


def _apply(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    foreach: bool,
) -> None:
    """Dispatch to one of the two paths; inputs are already validated."""
    step = _multi_tensor_lion_ if foreach else _single_tensor_lion_
    step(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


class Lion(Optimizer):
    """Lion with decoupled weight decay, as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (>= 0). Lion wants 3-10x smaller rates than AdamW.
        betas: ``(β1, β2)``, each in ``[0, 1)``.
        weight_decay: decoupled weight decay (>= 0). Lion wants 3-10x larger values than AdamW.
        foreach: ``True`` for the multi-tensor path, ``False`` for the per-parameter path, ``None``
            (default) for multi-tensor when every parameter of the group is on CUDA.

    State per parameter: ``exp_avg`` (the momentum m), same dtype and device as the parameter.
    Parameters whose ``grad`` is ``None`` are skipped; sparse gradients raise ``RuntimeError``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        if len(betas) != 2:
            raise ValueError(f"Lion: betas must be a pair (beta1, beta2), got {betas!r}")
        _check_hyperparameters(lr, betas[0], betas[1], weight_decay)
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    @staticmethod
    def _use_foreach(foreach: bool | None, params: Iterable[Tensor]) -> bool:
        if foreach is not None:
            return foreach
        params = list(params)
        return bool(params) and all(p.device.type == "cuda" for p in params)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it runs
                with gradients enabled before the update.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss: float | None = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients; use dense gradients instead")
                if not torch.is_floating_point(param):
                    raise ValueError(
                        f"Lion: a parameter has dtype {param.dtype}; Lion needs a real float dtype"
                    )
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                params.append(param)
                grads.append(param.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            # Gradients come from autograd, so shapes, dtypes and devices already match: only the
            # (possibly scheduler-modified) hyperparameters need checking on this hot path.
            _check_hyperparameters(group["lr"], beta1, beta2, group["weight_decay"])
            _apply(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                foreach=self._use_foreach(group["foreach"], params),
            )
        return loss
