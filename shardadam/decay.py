"""Which parameters weight decay skips (Keras's ``exclude_from_weight_decay``), as masks over
each buffer's owned shard."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor

from .buffers import FlatBuffer


class DecayExclusions:
    """Exclusions by tensor and by name pattern, and the per-buffer masks they give.

    Parameters are identified by their index in optimizer order (over all groups), as in
    ``state_dict``; name patterns apply to parameters added later too.
    """

    def __init__(self, buffers: list[FlatBuffer]) -> None:
        self.buffers = buffers  # the optimizer's list
        self.excluded_indices: set[int] = set()
        self.patterns: list[str] = []
        self.masks: list[Tensor | None] = []  # per buffer, as of the last rebuild_masks()

    @property
    def any(self) -> bool:
        return bool(self.excluded_indices or self.patterns)

    def replace(
        self,
        var_list: Iterable[Tensor] | None,
        var_names: Iterable[str] | None,
        index_of: dict[int, int],
        has_names: bool,
    ) -> None:
        """Keras's ``exclude_from_weight_decay``: replace the exclusions, checking them first
        (``index_of``: id(parameter) -> index in optimizer order)."""
        excluded = set()
        for p in var_list or []:
            if id(p) not in index_of:
                raise ValueError(
                    "Invalid var_list: it holds a tensor of shape "
                    f"{tuple(p.shape)} that this optimizer does not optimize"
                )
            excluded.add(index_of[id(p)])
        patterns = list(var_names or [])
        if patterns:
            if isinstance(var_names, str):
                raise TypeError(f"Invalid var_names: {var_names!r} (expected a list of strings)")
            if not has_names:
                raise ValueError(
                    "exclude_from_weight_decay(var_names=...) needs parameter names: create "
                    "the optimizer from model.named_parameters()"
                )
            try:
                re.compile("|".join(patterns))  # matched later, against every parameter
            except re.error as error:
                raise ValueError(f"Invalid var_names: {patterns} ({error})") from error
        self.excluded_indices, self.patterns = excluded, patterns

    def excluded(self, names: list[str]) -> set[int]:
        """Indices of the parameters weight decay skips (``names``: in optimizer order)."""
        excluded = set(self.excluded_indices)
        if self.patterns:
            pattern = re.compile("|".join(self.patterns))
            excluded.update(i for i, n in enumerate(names) if pattern.search(n))
        return excluded

    def mask(self, buffer_index: int) -> Tensor | None:
        """True where weight decay applies in the buffer's owned shard (None: everywhere)."""
        return self.masks[buffer_index] if buffer_index < len(self.masks) else None

    def rebuild_masks(self, index_of: dict[int, int], names: list[str]) -> None:
        excluded = self.excluded(names)
        self.masks = []
        for buffer in self.buffers:
            decayed = [
                span.index
                for span, p in zip(buffer.layout.params, buffer.params)
                if index_of[id(p)] not in excluded
            ]
            all_decayed = len(decayed) == len(buffer.params)
            self.masks.append(None if all_decayed else buffer.shard_mask(decayed))
