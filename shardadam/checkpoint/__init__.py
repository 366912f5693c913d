"""Sharded checkpoints: every rank writes and reads its own part, and any world size loads them.

A checkpoint is a directory ``<root>/step-<step, 8 digits>/`` holding

    rank-<r, 5 digits>.bin   raw tensor bytes written by rank r, one record after another
    manifest.json            written last, by rank 0

Tensors are flattened and cut into chunks; a chunk is elements [start, end) of one tensor, and
the manifest records for every tensor its shape and dtype and for every chunk its file, byte
offset and CRC-32, together with the optimizer's hyperparameters, counters and weight-decay
exclusions, the step, and the caller's ``extra``. Tensor names say what they hold, by parameter
name (never by position in a flat buffer): ``model/<key>`` (the model's ``state_dict`` keys),
``optimizer/<kind>/<parameter>`` (``momentum``, ``velocity``, ``velocity_hat``, ``average``,
``master``), ``accumulator/<rank>/<parameter>`` (mid-accumulation only) and ``extra/<path>``.

Each rank writes what it owns: its shard of the optimizer state and the same elements of the
optimized parameters; rank 0 writes every other model tensor (Note [tensors from rank 0]) and
``extra``. A loading rank reads the elements its own shard needs, from whichever chunks hold
them, so a checkpoint written at one world size, bucket size or stage loads at any other.
Nothing is pickled: a checkpoint is JSON and raw numbers and cannot hold code.

Note [atomic publication]
    A save writes into ``<root>/.partial-step-<step>-<random>/``. Once every rank has written
    and fsync'ed its file, rank 0 checks the files, writes and fsyncs the manifest and renames
    the directory to ``step-<step>`` (one atomic rename). A checkpoint is published iff its
    ``step-`` directory holds a manifest, and it exists only complete; a killed save leaves a
    hidden ``.partial-`` directory that loading never looks at and the next save removes.
    Removal (``keep_last``, or the old copy of a re-saved step) renames a checkpoint out of
    sight (``.removing-``) before deleting it.

Note [re-saving a step]
    A directory cannot be renamed over another that is not empty, and deleting the old copy of
    a step before publishing the new one leaves a moment with neither. So a save of a step that
    exists publishes its complete copy as ``step-<step>.new`` (one rename), renames the old
    ``step-<step>`` aside to ``.removing-...`` (one rename), renames ``step-<step>.new`` to
    ``step-<step>`` (one rename) and deletes the old copy, fsyncing the root between renames so
    that they reach the disk in this order. ``published``, ``latest`` and ``load`` take
    ``step-<step>.new`` for the step while it exists (it is always complete), so at every
    instant the step has a loadable copy: the old until the first rename, the new from then on.
    A crash between the renames leaves ``step-<step>.new``; the next save finishes the swap
    before it starts (rank 0), so ``keep_last`` and later saves see one copy per step.
    Every file-system operation of a save is one call through a seam a test can stop
    (Note [crash points] in ``fs``); tests/unit/test_checkpoint_crash.py stops a re-save
    before each.

Note [tensors from rank 0]
    A model tensor the optimizer does not update (buffers such as BatchNorm's running
    statistics and batch counter, frozen parameters, and every tensor of a save without an
    optimizer) is saved whole from rank 0, and every loading rank gets rank 0's values. Such
    tensors may differ between ranks (nothing synchronises buffers); cutting them across the
    saving ranks would stitch one tensor together from several ranks' values, a state no rank
    ever had.

Note [agree before acting]
    Any rank can fail alone (a disk error, a chunk whose checksum fails on the rank that reads
    it). Each phase of a save or load runs on every rank, then the ranks exchange whether it
    succeeded, and all raise the same error if one failed. So no rank waits in a collective
    that another left, and a load changes the model and optimizer only after every rank has
    read and checked all it needs.

The modules: ``saving`` and ``loading`` (the two collectives), ``format`` (the manifest, the
records and the errors), ``extra`` (Note [extra's encoding]: tuples, tensors and numpy arrays
in ``extra``), ``reading`` (a checkpoint read in one process without a model: its weights or
their EMA as a plain state dict, for ``shardadam.export``, and its ``extra``), ``directory``
(finding, publishing, re-saving and removing checkpoints in a root), ``fs`` (the file-system
operations of a save: Note [crash points]), ``collective`` (Note [agree before acting]) and
``names`` (parameters by name).
"""

from .directory import checkpoint_path, latest, published
from .format import FORMAT, MANIFEST, VERSION, CheckpointError, CheckpointInfo
from .loading import load
from .reading import read_extra, read_weights
from .saving import save

# The public names, where the public import path says (tracebacks, pickles).
CheckpointError.__module__ = CheckpointInfo.__module__ = __name__

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "checkpoint_path",
    "latest",
    "load",
    "published",
    "read_extra",
    "read_weights",
    "save",
]
