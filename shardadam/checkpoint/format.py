"""The on-disk format: the manifest, the rank files' records, and the errors of reading them."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "shardadam.checkpoint"
VERSION = 2
"""2: tuples and numpy arrays in ``extra`` (Note [extra's encoding]); 1 reads as before."""
MANIFEST = "manifest.json"
_RANK_FILE = re.compile(r"rank-(\d{5})\.bin")
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: incomplete, corrupt, or for another model."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``load`` restored."""

    path: Path
    step: int
    world_size: int
    """The world size the checkpoint was saved at."""
    extra: dict[str, Any]
    missing_keys: tuple[str, ...] = ()
    """``load(strict=False)``: the model's keys the checkpoint lacks, left as they were."""
    unexpected_keys: tuple[str, ...] = ()
    """``load(strict=False)``: the checkpoint's model keys that this model lacks, not loaded."""
    mismatched_keys: tuple[str, ...] = ()
    """``load(strict=False)``: the keys of another shape in the checkpoint, left as they were."""


class Reader:
    """Reads elements of the checkpoint's tensors, checking sizes and checksums."""

    def __init__(self, directory: Path, body: dict[str, Any]) -> None:
        self.directory = directory
        self.tensors = body["tensors"]
        self._files: dict[str, Any] = {}
        _check_file_names(directory / MANIFEST, body)
        for name, nbytes in body["files"].items():
            try:
                size = (directory / name).stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{directory / name} is missing") from None
            if size != nbytes:
                raise CheckpointError(
                    f"{directory / name} holds {size} bytes but the manifest records {nbytes}: "
                    "the file was truncated or changed after the checkpoint was saved"
                )

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for file in self._files.values():
            file.close()

    def numel(self, key: str) -> int:
        return math.prod(self.tensors[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        dtype = _DTYPES.get(self.tensors[key]["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"tensor {key!r} has an unknown dtype {self.tensors[key]['dtype']!r}"
            )
        return dtype

    def read(self, key: str, start: int = 0, end: int | None = None) -> Tensor:
        """Elements [start, end) of the flattened tensor ``key`` (all by default), 1-D."""
        meta = self.tensors.get(key)
        if meta is None:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}")
        dtype = self.dtype(key)
        end = self.numel(key) if end is None else end
        out = torch.empty(end - start, dtype=dtype)
        covered = 0
        for chunk in meta["chunks"]:
            lo, hi = max(start, chunk["start"]), min(end, chunk["end"])
            if lo < hi:
                values = self._read_chunk(key, chunk, dtype)
                out[lo - start : hi - start] = values[lo - chunk["start"] : hi - chunk["start"]]
                covered += hi - lo
        if covered != end - start:
            raise CheckpointError(
                f"elements [{start}, {end}) of {key!r} are not each in exactly one chunk of the "
                "checkpoint's files"
            )
        return out

    def _read_chunk(self, key: str, chunk: dict[str, Any], dtype: torch.dtype) -> Tensor:
        values = torch.empty(chunk["end"] - chunk["start"], dtype=dtype)
        raw = raw_bytes(values)
        if chunk["file"] not in self._files:
            self._files[chunk["file"]] = open(self.directory / chunk["file"], "rb")  # noqa: SIM115
        file = self._files[chunk["file"]]
        file.seek(chunk["offset"])
        if file.readinto(raw) != raw.nbytes or zlib.crc32(raw) != chunk["crc32"]:
            raise CheckpointError(
                f"elements [{chunk['start']}, {chunk['end']}) of {key!r} in "
                f"{self.directory / chunk['file']} fail their checksum: the file is corrupt"
            )
        return values


def _check_file_names(manifest: Path, body: dict[str, Any]) -> None:
    """Every file the manifest names is one of the checkpoint's own rank files, so that a
    crafted manifest cannot make a load read outside the checkpoint (``../``, absolute paths)."""
    world_size = body["world_size"]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{manifest} records an invalid world_size {world_size!r}")
    for name in body["files"]:
        match = _RANK_FILE.fullmatch(name)
        if match is None or int(match.group(1)) >= world_size:
            raise CheckpointError(
                f"{manifest} names {name!r}, but the checkpoint was saved by "
                f"{world_size} rank(s), whose files are rank-00000.bin to "
                f"rank-{world_size - 1:05d}.bin"
            )
    listed = sorted(body["files"])
    for key, meta in body["tensors"].items():
        for chunk in meta["chunks"]:
            if not isinstance(chunk["file"], str) or chunk["file"] not in body["files"]:
                raise CheckpointError(
                    f"{manifest}: tensor {key!r} has a chunk in {chunk['file']!r}, which is not "
                    f"one of this checkpoint's rank files {listed}; shardadam.checkpoint.save "
                    "never writes such a manifest"
                )


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: not a published checkpoint"
        ) from None
    except ValueError as error:  # not UTF-8, or not JSON
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if not isinstance(document, dict) or set(document) != {"body", "crc32"}:
        raise CheckpointError(f"{path} is not a shardadam checkpoint manifest")
    body = document["body"]
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardadam checkpoint manifest")
    if json_crc(body) != document["crc32"]:
        raise CheckpointError(f"{path} fails its checksum: it was changed after it was saved")
    if body["version"] > VERSION:
        raise CheckpointError(
            f"{path} has format version {body['version']}; this shardadam reads versions up to "
            f"{VERSION}: upgrade shardadam"
        )
    return body


def raw_bytes(values: Tensor) -> Any:
    """The bytes of a 1-D tensor as a writable numpy array sharing its memory (CPU)."""
    flat = values.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy()


def json_crc(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def json_value(value: Any, where: str) -> Any:
    """A hyperparameter or counter as JSON (0-d tensors as numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [json_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: json_value(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}; a checkpoint stores JSON values (numbers, "
        "strings, lists, dicts) and 0-d tensors there"
    )
