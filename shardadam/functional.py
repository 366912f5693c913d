"""The engine's per-shard math: one step of any update rule with Keras's clipping, weight
decay, masks, EMA and master weights around it, and the clipping helpers.

Pure functions of explicit tensors and scalars: no torch.distributed, no param_groups, no
optimizer state. Every tensor argument is a flat 1-D slice of a rank's shard, so one call
updates all parameters of a buffer; one process and many ranks run the same code.

Note [Keras scalars]
    Keras forms beta^t, 1 - beta^t and the step size alpha with float32 tensor ops (in the
    parameters' dtype) and folds the bias corrections into alpha, adding epsilon to sqrt(v):
        p <- p * (1 - weight_decay * lr)
        m <- m * beta_1 + g * (1 - beta_1)
        v <- v * beta_2 + g^2 * (1 - beta_2)
        p <- p - (m * alpha) / (sqrt(v) + epsilon)
    with alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t).
    Computing the scalars in float64 instead, or using torch's Adam with its own eps placement,
    drifts from Keras by several 1e-6 within 50 steps. ``update_scalars`` therefore computes
    them in the compute dtype and hands them to the kernel as one small tensor, so that a new
    learning rate never recompiles the kernel.

Note [no host sync in the step]
    On CUDA a read of a device tensor's value by Python (``.item()``, ``.tolist()``, ``if t:``,
    ``float(t)``) waits until the GPU has run everything queued before it, draining the
    pipeline of the step. So the kernels never read a device tensor: the compiled one takes the
    scalars as a tensor; the eager one takes its Python floats from the host copy of the
    packed scalars, which ``update_scalars`` builds on the CPU anyway, and multiplies by a
    global-clip factor that lives on the device without reading it. The clipping helpers
    below stay on the device too. Host reads left in the step, all of host memory: the eager
    kernel's floats; the agreement across ranks (Note [host collectives] in ``comm``); a
    schedule's learning rate; and, at the first step with a new mask only, the ranges of
    ``_runs_without_grad``. A learning rate (or beta) given as a device tensor is read to the
    host each step: give a float or a CPU tensor.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor


class EngineScalars(NamedTuple):
    """The engine's per-step scalars of one flat buffer, packed after the rule's own."""

    decay: Tensor
    """Weight-decay factor 1 - weight_decay * lr (1 when there is no decay)."""
    grad_scale: Tensor
    """Global-clip factor applied to the gradient (1 when not clipping by global norm)."""
    clip_value: Tensor
    """Gradients are clamped to [-clip_value, clip_value] (inf when not clipping by value)."""
    ema_momentum: Tensor
    """Weight of the old average; 0 on the first step, as Keras 3 does."""
    ema_overwrite: Tensor
    """1 when the parameters take their averages at the end of this step, else 0."""


ENGINE_SCALARS = len(EngineScalars._fields)
GRAD_SCALE_FROM_END = ENGINE_SCALARS - EngineScalars._fields.index("grad_scale")
"""Where the global-clip factor sits in a packed scalars tensor, counted from its end."""


def host_scalar(value: float | Tensor, dtype: torch.dtype) -> Tensor:
    """A 0-d host tensor of ``dtype``: a float straight from the Python double (as Keras casts
    it), a tensor (a learning rate given as one) detached and copied to the host."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=dtype).reshape(())
    return torch.tensor(value, dtype=dtype)


def engine_scalars(
    learning_rate: Tensor,
    weight_decay: float,
    grad_scale: Tensor | float = 1.0,
    clip_value: float | None = None,
    ema_momentum: float = 0.0,
    ema_overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The packed EngineScalars; ``learning_rate`` a 0-d tensor of ``dtype`` (Note [Keras
    scalars]: Keras decays by ``weight_decay * lr`` formed in the compute dtype)."""
    return torch.stack(
        EngineScalars(
            decay=1 - torch.tensor(weight_decay, dtype=dtype) * learning_rate,
            grad_scale=host_scalar(grad_scale, dtype),
            clip_value=host_scalar(math.inf if clip_value is None else clip_value, dtype),
            ema_momentum=host_scalar(ema_momentum, dtype),
            ema_overwrite=host_scalar(1.0 if ema_overwrite else 0.0, dtype),
        )
    )


def shard_step_(
    rule: Any,
    static: tuple,
    param: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
    factors: Tensor | None = None,
) -> Tensor:
    """One step over a flat shard, in place: clip, decay, the rule's update, EMA.

    ``rule`` is an update-rule module (``shardadam.rules``) and ``static`` its structure;
    ``slots`` its state in the order of ``rule.slots``; ``scalars`` the rule's packed scalars
    followed by the EngineScalars. ``master`` is the fp32 copy of a low-precision ``param``
    (the update runs on it and ``param`` receives the rounded result). ``decay_mask`` is True
    where weight decay applies (None: everywhere); ``grad_mask`` is True where the parameter
    had a gradient this step (None: everywhere): elsewhere parameter and slots keep their
    values, the EMA advances. ``factors``: a per-tensor rule's values of each element's
    tensor (Note [per-tensor statistics]), None for an elementwise rule. Returns the sum of
    squares of ``grad`` as given (before clipping), which the compiled kernel reduces in the
    same pass over the gradient.

    Written out of place so that torch.compile fuses it into one pass; see
    ``shard_step_inplace_`` for the eager formulation.
    """
    s = EngineScalars(*scalars[-ENGINE_SCALARS:].unbind(0))
    weights = param if master is None else master
    raw, g, decayed = _processed(s, weights, grad, decay_mask)
    extra = () if factors is None else (factors,)
    new_weights, new_slots = rule.update(
        decayed, g, slots, scalars[:-ENGINE_SCALARS], static, *extra
    )
    if grad_mask is not None:
        new_weights = torch.where(grad_mask, new_weights, weights)
        new_slots = tuple(torch.where(grad_mask, n, o) for n, o in zip(new_slots, slots))
    for old, new in zip(slots, new_slots):
        old.copy_(new)
    if ema is not None:
        new_ema = s.ema_momentum * ema + (1 - s.ema_momentum) * new_weights
        new_weights = torch.where(s.ema_overwrite > 0, new_ema, new_weights)
        ema.copy_(new_ema)
    if master is not None:
        master.copy_(new_weights)
    param.copy_(new_weights)
    # Reduced last: inductor then fuses it into the update's loop instead of a pass of its own.
    return (raw * raw).sum()


def _processed(
    s: EngineScalars, weights: Tensor, grad: Tensor, decay_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(the gradient in the compute dtype, the clipped gradient, the decayed weights)."""
    raw = grad.to(weights.dtype)
    g = torch.clamp(raw * s.grad_scale, -s.clip_value, s.clip_value)
    if decay_mask is None:
        decayed = weights * s.decay
    else:
        decayed = weights * torch.where(decay_mask, s.decay, torch.ones_like(s.decay))
    return raw, g, decayed


# Note [per-tensor statistics]
#     Some rules scale each tensor's update by a statistic of the whole tensor (Lamb's trust
#     ratio ||w|| / ||u||). A shard holds pieces of several tensors, and a shard boundary may
#     cut a tensor, so such a rule declares ``TENSOR_STATS``: a step first computes its
#     elementwise ``tensor_terms`` on the weights and gradients the update will see
#     (``shard_tensor_terms``, which changes nothing), the engine sums them over each tensor
#     and across ranks with one small all-reduce for all buffers (``tensor_stats``), the rule
#     turns the sums into per-tensor ``factors``, and ``shard_step_`` hands ``rule.update``
#     each element's factors. Elements of padding get factors of 0.


def shard_tensor_terms(
    rule: Any,
    static: tuple,
    param: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
    factors: Tensor | None = None,
) -> Tensor:
    """A per-tensor rule's elementwise terms ``[len(rule.TENSOR_STATS), shard numel]`` for this
    step, on the clipped gradient and the decayed weights as ``shard_step_`` forms them; zero
    where the parameter had no gradient. ``factors``: a factored rule's values of each element
    (Note [factored state] in ``factored``). Pure: nothing changes."""
    extra = () if factors is None else (factors,)
    terms = _rule_terms(
        rule.tensor_terms, static, param, grad, slots, master, decay_mask, scalars, extra
    )
    if grad_mask is not None:
        terms = torch.where(grad_mask, terms, torch.zeros_like(terms))
    return terms


def shard_row_col_terms(
    rule: Any,
    static: tuple,
    param: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
) -> Tensor:
    """A factored rule's elementwise terms ``[shard numel]`` whose means over each row and
    column feed its factored state, formed as ``shard_tensor_terms`` forms its terms. Pure."""
    return _rule_terms(
        rule.row_col_terms, static, param, grad, slots, master, decay_mask, scalars, ()
    )


def _rule_terms(
    terms: Any,
    static: tuple,
    param: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    master: Tensor | None,
    decay_mask: Tensor | None,
    scalars: Tensor,
    extra: tuple,
) -> Tensor:
    s = EngineScalars(*scalars[-ENGINE_SCALARS:].unbind(0))
    weights = param if master is None else master
    _, g, decayed = _processed(s, weights, grad, decay_mask)
    return terms(decayed, g, slots, scalars[:-ENGINE_SCALARS], static, *extra)


def shard_step_inplace_(
    rule: Any,
    static: tuple,
    param: Tensor,
    grad: Tensor,
    slots: tuple[Tensor, ...],
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
    factors: Tensor | None = None,
    host_scalars: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """``shard_step_`` for eager mode: the same operations, in place (``rule.update_``).

    Out of place, every eager operation allocates (and page-faults) a shard-sized tensor,
    which made the eager update 45x slower than torch's fused AdamW; in place it allocates
    nothing. ``grad`` serves as scratch space and holds garbage afterwards. With a
    ``grad_mask`` the whole shard is updated in place too, then the elements without a
    gradient (a few parameters' ranges, kept from before the update) get their old values
    back and their EMA advanced towards them: Note [eager steps without some gradients].

    Note [no host sync in the step]: ``host_scalars`` are ``scalars`` in host memory, whose
    floats the scalar kernels take (None: copied from ``scalars``, a host sync where those are
    on a device); ``grad_scale``, a 0-d tensor on the shard's device, is the global-clip
    factor, multiplied without being read (None: the factor among the scalars).
    """
    if host_scalars is None:
        host_scalars = scalars.cpu()  # called without them: a device sync if scalars are on one
    floats = host_scalars.tolist()  # host memory: no device sync
    s = EngineScalars(*floats[-ENGINE_SCALARS:])
    weights = param if master is None else master
    state = [t for t in (weights, *slots, ema) if t is not None]
    kept = []
    if grad_mask is not None:
        kept = [(run, [t[run].clone() for t in state]) for run in _runs_without_grad(grad_mask)]
    g = grad if grad.dtype == weights.dtype else grad.to(weights.dtype)
    grad_sq = torch.dot(g, g)
    if grad_scale is not None:
        g.mul_(grad_scale)
    elif s.grad_scale != 1.0:
        g.mul_(s.grad_scale)
    if math.isfinite(s.clip_value):
        g.clamp_(-s.clip_value, s.clip_value)
    if decay_mask is not None:
        weights.mul_(torch.where(decay_mask, s.decay, 1.0))
    elif s.decay != 1.0:
        weights.mul_(s.decay)
    extra = () if factors is None else (factors,)
    rule.update_(weights, g, slots, floats[:-ENGINE_SCALARS], static, *extra)
    if ema is not None:
        ema.lerp_(weights, 1.0 - s.ema_momentum)  # exact at weight 1 (the first step)
        if s.ema_overwrite:
            weights.copy_(ema)
    if master is not None:
        param.copy_(master)
    for run, old in kept:
        for now, was in zip(state, old):
            now[run] = was
        if ema is not None:
            ema[run].lerp_(weights[run], 1.0 - s.ema_momentum)
            if s.ema_overwrite:
                weights[run] = ema[run]
        if master is not None:
            param[run] = master[run]
    return grad_sq


# Note [eager steps without some gradients]
#     A parameter without a gradient keeps its value and moments while its EMA advances (as
#     the out-of-place kernel's masks say). Eagerly, masking every tensor costs a shard-sized
#     temporary per operation (a step 9x slower than with every gradient present), though
#     the parameters without gradients (frozen, unused) are usually few. So the eager kernel
#     updates the whole shard in place and puts back the kept ranges, which costs their size.
#     A mask's ranges are found once (one host sync): the buffers cache their masks, so a step
#     reuses the tensor of the step before, and the ranges are remembered per tensor.

_runs_of_mask: dict[int, tuple[weakref.ref, list[slice]]] = {}


def _runs_without_grad(grad_mask: Tensor) -> list[slice]:
    """The contiguous ranges where ``grad_mask`` is False, found once per mask tensor."""
    key = id(grad_mask)
    entry = _runs_of_mask.get(key)
    if entry is not None and entry[0]() is grad_mask:
        return entry[1]
    edge = grad_mask.new_zeros(1)
    missing = torch.cat([edge, ~grad_mask, edge]).to(torch.int8)
    steps = missing.diff()
    starts = (steps == 1).nonzero().flatten().tolist()
    ends = (steps == -1).nonzero().flatten().tolist()
    runs = [slice(a, b) for a, b in zip(starts, ends)]
    _runs_of_mask[key] = (weakref.ref(grad_mask, lambda _: _runs_of_mask.pop(key, None)), runs)
    return runs


def refresh_master_(master: Tensor, param: Tensor) -> None:
    """Re-take the fp32 ``master`` where the low-precision ``param`` no longer equals its
    rounding: the parameter was changed outside the optimizer."""
    changed = param != master.to(param.dtype)
    master.copy_(torch.where(changed, param.to(master.dtype), master))


def ema_shard_step_(
    param: Tensor, ema: Tensor, master: Tensor | None, momentum: float, overwrite: bool
) -> None:
    """The EMA (and its overwrite) alone, for micro-steps that only accumulate gradients."""
    weights = param if master is None else master
    ema.lerp_(weights.to(ema.dtype), 1.0 - momentum)
    if overwrite:
        weights.copy_(ema)
        if master is not None:
            param.copy_(master)


def squared_norm(flat: Tensor) -> Tensor:
    """Sum of squares of a flat tensor, accumulated in float32 or wider."""
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(flat, dtype=dtype).square()


def piece_squared_norms(pieces: list[Tensor]) -> Tensor:
    """Sum of squares of each tensor in ``pieces``, as a 1-D tensor."""
    if not pieces:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(pieces)).float().square()


def clip_by_norm_(pieces: list[Tensor], param_sq_norms: list[Tensor], clipnorm: float) -> None:
    """Keras's per-tensor clip, in place: g <- g * c / max(||g||, c).

    ``param_sq_norms[i]`` is the squared norm of the whole tensor that ``pieces[i]`` belongs to,
    so a tensor cut by a shard boundary is scaled the same on every rank.
    """
    if not pieces:
        return
    norms = torch.stack(param_sq_norms).sqrt()
    denominators = torch.clamp_min(norms, clipnorm).to(pieces[0].dtype)
    torch._foreach_mul_(pieces, clipnorm)
    torch._foreach_div_(pieces, list(denominators.unbind(0)))


def global_clip_scale(global_norm: Tensor, global_clipnorm: float) -> Tensor:
    """Keras's factor for clipping by global norm: 1 below the threshold, NaN for a NaN/inf norm."""
    # A CPU scalar beside a device tensor: the kernel takes its value from host memory.
    inverse = torch.minimum(
        1.0 / global_norm, torch.tensor(1.0 / global_clipnorm, dtype=global_norm.dtype)
    )
    return global_clipnorm * inverse + (global_norm - global_norm)
