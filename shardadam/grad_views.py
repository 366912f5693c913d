"""One process: ``p.grad`` as views of the flat gradient buffers. Knows buffers, not ranks.

Note [gradients in one process]
    With no process group there is nothing to reduce, and a copy of every ``p.grad`` into the
    flat buffer at ``step()`` cost a second copy of the gradients (+1x their bytes) and a
    third of the step's time. So the same hooks move each gradient into its place in the flat
    buffer as backward produces it and make ``p.grad`` that view (DDP's
    ``gradient_as_bucket_view``): autograd's own tensor is freed at once, a second backward
    adds into the view in place, and ``p.grad`` stays readable and writable until ``step()``
    (clipping by hand works). ``p.grad`` is the truth at ``step()``: one assigned by hand is
    copied in, one set to None counts as no gradient. The update uses the flat gradient as
    scratch, so ``step()`` takes the gradients: afterwards ``p.grad`` is None, as it is
    across ranks. Micro-steps of gradient accumulation keep ``p.grad`` as torch leaves it.
"""

from __future__ import annotations

from torch import Tensor

from .buffers import FlatBuffer


def refuse_sparse_grad(buffer: FlatBuffer, index: int, grad: Tensor) -> None:
    if grad.is_sparse:
        raise ValueError(
            "shardadam's optimizers do not support sparse gradients; got one for parameter "
            f"'{buffer.layout.params[index].name}'"
        )


class GradViews:
    """The gradients of one process's flat buffers, kept in place (Note [gradients in one
    process]).

    ``have`` is the reducer's list, per buffer, of the parameters with a gradient for the
    coming step; this object adds to it and takes from it."""

    def __init__(self, buffers: list[FlatBuffer], have: list[set[int]]) -> None:
        self.buffers = buffers
        self._have = have

    def bind(self, b: int, index: int, param: Tensor) -> None:
        """Post-accumulate-grad hook at the start of a cycle: ``param.grad`` becomes its view
        of the flat gradient buffer, holding the gradient."""
        view = self.buffers[b].grad_views[index]
        if not is_view(param.grad, view):
            self._stage(b, index, param.grad, view, starts_cycle=True)
            param.grad = view
        self._have[b].add(index)

    def collect(self, starts_cycle: bool) -> None:
        """At an update step: take ``p.grad`` as it is now, wherever it is not the view."""
        for b, buffer in enumerate(self.buffers):
            for index, p in enumerate(buffer.params):
                if p.grad is None:
                    self._have[b].discard(index)
                elif not is_view(p.grad, buffer.grad_views[index]):
                    self._stage(b, index, p.grad, buffer.grad_views[index], starts_cycle)
                    self._have[b].add(index)

    def release(self) -> None:
        """After an update: drop the ``p.grad`` views, which the update used as scratch."""
        for buffer in self.buffers:
            for p, view in zip(buffer.params, buffer.grad_views):
                if is_view(p.grad, view):
                    p.grad = None

    def _stage(self, b: int, index: int, grad: Tensor, view: Tensor, starts_cycle: bool) -> None:
        """``grad`` is all of this step's gradient of parameter ``index``."""
        refuse_sparse_grad(self.buffers[b], index, grad)
        if starts_cycle:
            view.copy_(grad)
        else:  # the boundary micro-step of an accumulation cycle
            view.add_(grad)


def is_view(grad: Tensor | None, view: Tensor) -> bool:
    """Whether ``grad`` is ``view`` (the same elements of the flat gradient buffer)."""
    return grad is not None and grad.data_ptr() == view.data_ptr() and grad.shape == view.shape
