"""Update rules: the per-shard math of each optimizer of the family, one small module each.

A rule is declarative and pure. It knows nothing of ranks, buffers, param groups or the base
optimizer's features: the engine unscales and accumulates the gradients, clips them (clipnorm,
clipvalue, global_clipnorm), applies Keras's weight decay (``w -= w * weight_decay * lr``, before
the update, so a rule receives the decayed weights), skips elements without a gradient, keeps
the EMA and the fp32 master copies, and shards everything. Every tensor a rule sees is one flat
1-D shard in the compute dtype (float32, or float64 for float64 parameters).

A rule module defines:

``NAME``
    Keras 3's class name (``"SGD"``); also the optimizer's default ``name``.
``LEARNING_RATE``
    Keras 3's default ``learning_rate`` for it.
``HYPERPARAMETERS``
    Its own Keras 3 arguments (not the base optimizer's) with Keras 3's defaults, in Keras's
    order: ``{"momentum": 0.0, "nesterov": False}``.
``check(hp, where="")``
    Validate a dict holding every key of ``HYPERPARAMETERS``: raise ``ValueError`` (a bad
    value) or ``TypeError`` (a bad type) naming the argument with Keras's name, followed by
    ``where`` (e.g. ``" (param group 1)"``), the value given, and the allowed values. Refuse
    what Keras refuses, and what would give NaNs or silently wrong steps.
``slots(hp)``
    The per-element state Keras creates for these hyperparameters: ``{Keras variable name:
    initial value}`` in Keras's creation order (``{"momentum": 0.0}``; Adagrad's
    ``{"accumulator": initial_accumulator_value}``); ``{}`` when there is none.
``static(hp)``
    A hashable tuple of whatever changes the structure of the update (``(nesterov,)``); the
    engine compiles one kernel per distinct value. Values that only change numbers are scalars.
``scalars(hp, learning_rate, step, dtype)``
    This step's scalars, packed in a 1-D tensor of ``dtype``, formed with torch ops in that
    dtype exactly as Keras 3 forms them (Note [Keras scalars] in ``functional``):
    ``learning_rate`` is a 0-d tensor of ``dtype``, ``step`` the 1-based count of applied
    updates (Keras's ``iterations + 1``). A NamedTuple gives the fields their names.
``update(weights, grad, slots, scalars, static)``
    Pure and out of place: ``(new_weights, new_slots)``, ``new_slots`` a tuple in the order of
    ``slots(hp)``. No reads of tensor values on the host and no branches on them, so that
    ``torch.compile(fullgraph=True, dynamic=True)`` fuses the engine's whole step into one pass.
``update_(weights, grad, slots, host_scalars, static)``
    The same math in place, for eager mode (``jit_compile=False``): ``host_scalars`` are the
    packed scalars as Python floats; in-place ops only, ``grad`` may be used as scratch.

A rule whose update divides by the learning rate (Ftrl) also defines
``check_learning_rate(value, where="")``, which the engine calls with each step's value before
anything changes.

A per-tensor rule, whose update needs statistics of each whole tensor (Lamb's trust ratio from
``||w||`` and ``||u||``), also defines (Note [per-tensor statistics] in ``functional``):

``TENSOR_STATS``
    The names of the per-tensor sums it needs, e.g. ``("weight_sq", "update_sq")``.
``tensor_terms(weights, grad, slots, scalars, static)``
    Pure: the elementwise terms ``[len(TENSOR_STATS), n]`` whose sums over each tensor it needs,
    from the same inputs as ``update``. The engine sums them over each tensor on every rank
    (a shard boundary may cut a tensor) with one small all-reduce per step.
``TENSOR_FACTORS``
    The names of the per-tensor values ``tensor_factors`` gives, e.g. ``("trust_ratio",)``.
``tensor_factors(sums, sizes, scalars, static)``
    Pure, on small tensors: from the sums ``[len(TENSOR_STATS), tensors]`` (``sizes``: each
    tensor's element count, for means), the values
    ``[len(TENSOR_FACTORS), tensors]`` its update reads per tensor (Lamb: the trust ratio).
``update`` and ``update_`` then take a sixth argument, ``factors`` (``[j, n]``: each element's
values of its own tensor; 0 on padding).

A factored rule (Adafactor), whose state of each tensor of 2+ dims is one value per row and
one per column of its last two axes (Note [factored state] in ``factored``), also defines:

``FACTORED_SLOTS = ("r", "c")``
    The names of its row state (shape[:-1]) and column state (shape[:-2] + shape[-1:]), 0 at
    the start. The engine keeps on each rank the entries its shard's elements touch, flat.
``row_col_terms(weights, grad, slots, scalars, static)``
    Pure: the elementwise values ``[n]`` whose means over each row and each column it needs.
``factored_state(r, c, row_means, col_means, scalars, static)``
    Pure, on small tensors: the new ``(r, c)`` from those means (the engine's, whole tensors').
``factored_values(r, c, r_matrix_means, scalars, static)``
    Pure: ``(row values, column values)`` whose product is each element's estimate, from the
    new state and each row's mean of r over its matrix's rows.
It is per-tensor too: its ``tensor_terms`` and ``update`` receive the estimate and a 0/1 mask
of the factored elements as the first two rows of ``factors`` (``[2, n]`` for the terms; the
update's ``factors`` are those two rows followed by ``tensor_factors``'s). A step costs three
small all-reduces: the row and column sums, the matrix means of r, the per-tensor sums.

A rule with optimizer-wide state (Nadam's ``u_product``) also defines ``CARRY = {name: initial
float}``; its ``scalars`` then takes a fifth argument, ``carry`` (``{name: 0-d tensor of
dtype}``), and returns ``(packed, new_carry)``. The engine keeps, checkpoints and advances the
carry once per applied update, never on a skipped one.
"""
