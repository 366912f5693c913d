"""Weights out: a checkpoint's model weights (or their EMA), or a live model's, as one plain
state dict file that torch or safetensors read without shardadam.

    python -m shardadam.export CHECKPOINT --out model.safetensors [--ema] [--format FORMAT]

CHECKPOINT is a checkpoint directory or a root of several (the highest step is taken); FORMAT
is ``safetensors`` or ``torch`` (``torch.save``), by default told by the suffix of ``--out``
(``.safetensors``; ``.pt``, ``.pth``, ``.bin``). No model object is needed: the weights are
read from the checkpoint's manifest (``checkpoint.read_weights``). The file is keyed by the
model's ``state_dict`` keys, buffers included, so ``model.load_state_dict(...,
strict=True)`` takes it. safetensors files are written by the small writer below (the format
is an 8-byte little-endian header length, a JSON header, then raw little-endian bytes), so
writing needs no safetensors installed.

Note [plain tensors]
    A parameter that ShardedAdam optimizes is a view into the optimizer's flat buffer, and
    ``torch.save`` writes a view's whole storage: a 17 KB head of a model saves as the 8 MB
    buffer it lives in, and safetensors refuses tensors that share memory. A plain state dict
    gives each key its own contiguous tensor with its own storage; tied weights become one
    copy per key, as ``load_state_dict`` and other libraries' loaders expect.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from .checkpoint import CheckpointError, read_weights
from .checkpoint.format import raw_bytes

FORMATS = ("safetensors", "torch")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}
"""The format ``save_weights`` writes for each suffix of ``out`` when ``format`` is None."""
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_METADATA = "__metadata__"


def plain_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every tensor an independent contiguous copy, detached, on
    its device (Note [plain tensors]): small to ``torch.save``, accepted by safetensors, and
    unchanged by later training. Entries that are not tensors (extra state) are passed as
    they are."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return {
        key: value.detach().clone(memory_format=torch.contiguous_format)
        if isinstance(value, Tensor)
        else value
        for key, value in module.state_dict().items()
    }


def export_weights(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ema: bool = False,
    format: str | None = None,
) -> Path:
    """Write the model weights saved in ``checkpoint`` (a checkpoint or a root of several: the
    highest step) to ``out``; returns its path. ``ema=True`` writes the EMA of the optimized
    parameters in their place (``checkpoint.read_weights``). ``format``: see ``save_weights``.
    """
    out = Path(out)
    format = _format_of(out, format)  # before the reading, which may take long
    return save_weights(read_weights(checkpoint, ema=ema), out, format=format)


def save_weights(
    state_dict: Mapping[str, Tensor], out: str | os.PathLike, *, format: str | None = None
) -> Path:
    """Write ``state_dict`` (key -> tensor) to ``out`` as ``format``, ``"safetensors"`` or
    ``"torch"`` (``torch.save``), by default told by the suffix of ``out`` (``SUFFIXES``);
    returns its path. Tensors go to the CPU; views (of a flat buffer, of each other) are
    copied first (Note [plain tensors]). The file appears whole or not at all: it is written
    under a temporary name beside ``out`` and renamed."""
    out = Path(out)
    format = _format_of(out, format)
    tensors = _plain_tensors(state_dict)
    if format == "safetensors":
        _check_safetensors(tensors)
        _write_atomically(out, lambda file: _write_safetensors(tensors, file))
    else:
        _write_atomically(out, lambda file: torch.save(tensors, file))
    return out


def _format_of(out: Path, format: str | None) -> str:
    if format is None:
        format = SUFFIXES.get(out.suffix.lower())
        if format is None:
            raise ValueError(
                f"Invalid out: {str(out)!r} (cannot tell the format from its suffix "
                f"{out.suffix!r}; expected one of {', '.join(SUFFIXES)}, or pass format= one "
                f"of {', '.join(FORMATS)})"
            )
    if format not in FORMATS:
        raise ValueError(f"Invalid format: {format!r} (expected one of {', '.join(FORMATS)})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"Invalid out: {str(out)!r} (its directory does not exist)")
    return format


def _plain_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors that each own their storage (Note [plain tensors]), copying only those that
    do not, so that exporting a checkpoint holds each tensor in memory once."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    plain: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"state_dict entry {key!r} is a {type(value).__name__} under a "
                f"{type(key).__name__} key; a weights file holds tensors under string keys"
            )
        value = value.detach().cpu()
        storage = value.untyped_storage()
        owns_storage = (
            value.is_contiguous()
            and value.storage_offset() == 0
            and storage.nbytes() == value.numel() * value.element_size()
            and (storage.data_ptr() not in storages or value.numel() == 0)
        )
        if not owns_storage:
            value = value.clone(memory_format=torch.contiguous_format)
        storages.add(value.untyped_storage().data_ptr())
        plain[key] = value
    return plain


def _check_safetensors(tensors: dict[str, Tensor]) -> None:
    if sys.byteorder != "little":
        raise RuntimeError(
            "safetensors files are little-endian and this machine is big-endian: use format='torch'"
        )
    if _METADATA in tensors:
        raise ValueError(f"a safetensors file cannot hold a tensor named {_METADATA!r}")
    for key, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(
                f"state_dict entry {key!r} has dtype {tensor.dtype}, which safetensors does not "
                f"store (it stores {', '.join(str(d) for d in _SAFETENSORS_DTYPES)}); use "
                "format='torch'"
            )


def _write_safetensors(tensors: dict[str, Tensor], file: BinaryIO) -> None:
    """The safetensors format: the header's byte length (u64, little-endian), the header (a
    JSON object: for each tensor its dtype, shape and [begin, end) byte offsets into the data
    that follows; ``__metadata__``: string pairs), then the tensors' bytes, in order."""
    header: dict[str, Any] = {_METADATA: {"format": "pt"}}  # transformers wants "pt"
    offset = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data 8-byte aligned, as safetensors writes it
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for tensor in tensors.values():
        file.write(raw_bytes(tensor))


def _write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary file beside ``out``, then rename it to ``out``: a failure or
    a crash leaves ``out`` as it was (absent, or the previous file)."""
    temporary = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shardadam.export",
        description="Write a shardadam checkpoint's model weights (or their EMA) as a plain "
        "state dict file, readable without shardadam.",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory, or a root of several (the highest step is taken)",
    )
    parser.add_argument("--out", required=True, help="the file to write, e.g. model.safetensors")
    parser.add_argument(
        "--ema",
        action="store_true",
        help="write the optimizer's EMA of the "
        "parameters in their place (the checkpoint must hold one)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="default: from the suffix of --out "
        f"({', '.join(f'{s} {f}' for s, f in SUFFIXES.items())})",
    )
    args = parser.parse_args(argv)
    try:
        out = export_weights(args.checkpoint, args.out, ema=args.ema, format=args.format)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
