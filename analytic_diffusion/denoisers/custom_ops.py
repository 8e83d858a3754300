"""The optimal denoiser's retrieval as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)``
of a sampler step that calls it traces without a graph break.

``analytic_diffusion::optimal_mean(x, sigma, labels, handle)`` is the posterior mean and
``analytic_diffusion::optimal_jvp(x, sigma, labels, v, handle)`` its exact Jacobian product (the backward of the
first; see :mod:`.gradients`). The training set does not travel through the graph: ``handle`` is an integer that
names the denoiser in a registry of weak references, so the compiled graph holds a constant, the kernels keep the
dataset's cached constants, and ``.to(device)`` still applies. The fake (meta) implementations give the output's
shape and dtype (the denoiser's working precision) without touching data.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

__all__ = ["handle_of", "needs_op", "optimal_jvp", "optimal_mean"]

_REGISTRY: dict[int, weakref.ref[Any]] = {}
_NEXT = itertools.count(1)


def handle_of(denoiser: object) -> int:
    """The registry handle of ``denoiser`` (registered on first use; a copy gets its own).

    Denoisers that use the ops register at construction and on unpickling / deepcopy, so that inside
    torch.compile the handle is a plain attribute read (a constant of the graph).
    """
    if torch.compiler.is_compiling():
        return denoiser.__dict__["_op_handle"]
    h: int | None = denoiser.__dict__.get("_op_handle")
    if h is None or _REGISTRY.get(h, lambda: None)() is not denoiser:
        h = next(_NEXT)
        _REGISTRY[h] = weakref.ref(denoiser, lambda _, h=h: _REGISTRY.pop(h, None))  # type: ignore[misc, unused-ignore]
        denoiser.__dict__["_op_handle"] = h
    return h


def needs_op(x: torch.Tensor) -> bool:
    """Whether a call must go through the op: under torch.compile, or when autograd records it. An eager call
    without grad skips the op's dispatch (same function, same bits), whose first use imports torch._dynamo
    (about 1.4 s of a fresh process)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)


def _lookup(handle: int) -> Any:
    den = _REGISTRY.get(handle, lambda: None)()
    if den is None:
        raise RuntimeError(f"analytic_diffusion custom op: denoiser handle {handle} is gone (the denoiser was freed)")
    return den


@torch.library.custom_op("analytic_diffusion::optimal_mean", mutates_args=())
def optimal_mean(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, handle: int) -> torch.Tensor:
    # The optimal posterior itself, also for subclasses that compose it (smoothed averages it over perturbed x).
    return _lookup(handle)._optimal_posterior(x, sigma, labels).mean.clone()


@optimal_mean.register_fake
def _(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_lookup(handle).dtype)


@torch.library.custom_op("analytic_diffusion::optimal_jvp", mutates_args=())
def optimal_jvp(
    x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor, handle: int
) -> torch.Tensor:
    return _lookup(handle)._optimal_jvp(x, sigma, labels, v).clone()


@optimal_jvp.register_fake
def _(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_lookup(handle).dtype)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, sigma, labels, handle = inputs
    ctx.save_for_backward(x, sigma)
    ctx.labels, ctx.handle = labels, handle


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
    x, sigma = ctx.saved_tensors
    # The Jacobian is symmetric (Cov[x0 | x] / σ²T), so the vector-Jacobian product is the Jacobian product.
    g = optimal_jvp(x, sigma, ctx.labels, grad, ctx.handle)
    return g.to(grad.dtype), None, None, None


optimal_mean.register_autograd(_backward, setup_context=_setup)
