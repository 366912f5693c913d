"""The per-shard math of ShardedAdam, as Keras 3 computes it.

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
from typing import NamedTuple

import torch
from torch import Tensor


class UpdateScalars(NamedTuple):
    """Per-step scalars of one flat buffer, packed in this order into one 1-D tensor."""

    alpha: Tensor
    beta_1: Tensor
    one_minus_beta_1: Tensor
    beta_2: Tensor
    one_minus_beta_2: Tensor
    epsilon: Tensor
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


def update_scalars(
    learning_rate: float | Tensor,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    weight_decay: float,
    step: int,
    grad_scale: Tensor | float = 1.0,
    clip_value: float | None = None,
    ema_momentum: float = 0.0,
    ema_overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The packed UpdateScalars for Adam step ``step`` (1-based); see Note [Keras scalars]."""

    def scalar(value: float | Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value.detach().to(device="cpu", dtype=dtype).reshape(())
        return torch.tensor(value, dtype=dtype)  # straight from the Python double

    lr = scalar(learning_rate)
    t = torch.tensor(float(step), dtype=dtype)
    beta_1_power = torch.pow(torch.tensor(beta_1, dtype=dtype), t)
    beta_2_power = torch.pow(torch.tensor(beta_2, dtype=dtype), t)
    alpha = lr * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    decay = 1 - torch.tensor(weight_decay, dtype=dtype) * lr

    return torch.stack(
        UpdateScalars(
            alpha=alpha,
            beta_1=scalar(beta_1),
            one_minus_beta_1=scalar(1.0 - beta_1),
            beta_2=scalar(beta_2),
            one_minus_beta_2=scalar(1.0 - beta_2),
            epsilon=scalar(epsilon),
            decay=decay,
            grad_scale=scalar(grad_scale),
            clip_value=scalar(math.inf if clip_value is None else clip_value),
            ema_momentum=scalar(ema_momentum),
            ema_overwrite=scalar(1.0 if ema_overwrite else 0.0),
        )
    )


def adam_shard_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_max: Tensor | None,
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
) -> Tensor:
    """One Keras Adam step over a flat shard, in place: clip, decay, moments, update, EMA.

    ``master`` is the fp32 copy of a low-precision ``param`` (the update runs on it and
    ``param`` receives the rounded result). ``decay_mask`` is True where weight decay applies
    (None: everywhere); ``grad_mask`` is True where the parameter had a gradient this step
    (None: everywhere): elsewhere parameter and moments keep their values, the EMA advances.
    Returns the sum of squares of ``grad`` as given (before clipping), which the compiled
    kernel reduces in the same pass over the gradient.

    Written out of place so that torch.compile fuses it into one pass; see
    ``adam_shard_step_inplace_`` for the eager formulation.
    """
    s = UpdateScalars(*scalars.unbind(0))
    weights = param if master is None else master
    raw = grad.to(weights.dtype)
    g = torch.clamp(raw * s.grad_scale, -s.clip_value, s.clip_value)
    if decay_mask is None:
        decayed = weights * s.decay
    else:
        decayed = weights * torch.where(decay_mask, s.decay, torch.ones_like(s.decay))
    m = exp_avg * s.beta_1 + g * s.one_minus_beta_1
    v = exp_avg_sq * s.beta_2 + g * g * s.one_minus_beta_2
    v_max = None if exp_avg_sq_max is None else torch.maximum(exp_avg_sq_max, v)
    denom = torch.sqrt(v if v_max is None else v_max) + s.epsilon
    new_weights = decayed - m * s.alpha / denom
    if grad_mask is not None:
        new_weights = torch.where(grad_mask, new_weights, weights)
        m = torch.where(grad_mask, m, exp_avg)
        v = torch.where(grad_mask, v, exp_avg_sq)
        if v_max is not None:
            v_max = torch.where(grad_mask, v_max, exp_avg_sq_max)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if v_max is not None:
        exp_avg_sq_max.copy_(v_max)
    if ema is not None:
        new_ema = s.ema_momentum * ema + (1 - s.ema_momentum) * new_weights
        new_weights = torch.where(s.ema_overwrite > 0, new_ema, new_weights)
        ema.copy_(new_ema)
    if master is not None:
        master.copy_(new_weights)
    param.copy_(new_weights)
    # Reduced last: inductor then fuses it into the update's loop instead of a pass of its own.
    return (raw * raw).sum()


def adam_shard_step_inplace_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_max: Tensor | None,
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    grad_mask: Tensor | None,
    scalars: Tensor,
    host_scalars: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """``adam_shard_step_`` for eager mode: the same operations, in place.

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
    s = UpdateScalars(*host_scalars.tolist())  # host memory: no device sync
    weights = param if master is None else master
    state = [t for t in (weights, exp_avg, exp_avg_sq, exp_avg_sq_max, ema) if t is not None]
    kept = []
    if grad_mask is not None:
        kept = [(run, [t[run].clone() for t in state]) for run in _runs_without_grad(grad_mask)]
    grad_sq = _adam_inplace_(param, grad, exp_avg, exp_avg_sq, exp_avg_sq_max, ema, master,
                             decay_mask, s, grad_scale)  # fmt: skip
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


def _adam_inplace_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_max: Tensor | None,
    ema: Tensor | None,
    master: Tensor | None,
    decay_mask: Tensor | None,
    s: UpdateScalars,
    grad_scale: Tensor | None,
) -> Tensor:
    """The in-place update of every element, with the scalars as Python floats (and
    ``grad_scale``, where given, as a tensor: Note [no host sync in the step])."""
    weights = param if master is None else master
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
    exp_avg.mul_(s.beta_1).add_(g, alpha=s.one_minus_beta_1)
    exp_avg_sq.mul_(s.beta_2).addcmul_(g, g, value=s.one_minus_beta_2)
    if exp_avg_sq_max is not None:
        torch.maximum(exp_avg_sq_max, exp_avg_sq, out=exp_avg_sq_max)
    denom = torch.sqrt(exp_avg_sq if exp_avg_sq_max is None else exp_avg_sq_max, out=g)
    weights.addcdiv_(exp_avg, denom.add_(s.epsilon).div_(s.alpha), value=-1.0)
    if ema is not None:
        ema.lerp_(weights, 1.0 - s.ema_momentum)  # exact at weight 1 (the first step)
        if s.ema_overwrite:
            weights.copy_(ema)
    if master is not None:
        param.copy_(master)
    return grad_sq


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
