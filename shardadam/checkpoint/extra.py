"""``extra``: the caller's dict of JSON values, tensors, tuples and numpy arrays.

Note [extra's encoding]
    JSON is the only non-tensor encoding (nothing is pickled). What JSON lacks is written as
    an object with one reserved key, so that it decodes to the type that was saved:

        {"__shardadam_tensor__": <tensor name>}                  a tensor
        {"__shardadam_tuple__": [<items>]}                       a tuple
        {"__shardadam_ndarray__": <tensor name>, "dtype": "<u4",  a numpy array (or, with
         "shape": [624], "scalar": <bool>}                        "scalar", a numpy scalar)

    Tensors and numpy arrays are saved as tensors named ``extra/<path>`` like the model's; a
    numpy array as the uint8 tensor of its little-endian bytes, its dtype and shape in the
    object. So Python's ``random.getstate()`` (nested tuples), ``numpy.random.get_state()``
    (a tuple with a uint32 array) and ``Generator.bit_generator.state`` (a dict, arrays for
    some bit generators) come back as they were and can be set again. A dict of the caller's
    may not use the reserved keys. Version-1 checkpoints (before tuples and arrays) saved
    tuples as lists, and load as they were saved.

numpy stays an optional import: encoding looks for it only if it was imported (an array
cannot exist otherwise), and decoding imports it only for a checkpoint that holds arrays.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from .format import Reader

_TENSOR = "__shardadam_tensor__"
_TUPLE = "__shardadam_tuple__"
_NDARRAY = "__shardadam_ndarray__"
_RESERVED = (_TENSOR, _TUPLE, _NDARRAY)


def encode_extra(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``extra`` (Note [extra's encoding]); the tensors to save go into ``tensors``."""
    if isinstance(value, Tensor):
        tensors[path] = value
        return {_TENSOR: path}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        return _encode_numpy(numpy, value, path, tensors)
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or "/" in key or key in _RESERVED:
                raise TypeError(
                    f"{path} has the key {key!r}; extra's keys must be strings without '/', "
                    f"other than {', '.join(_RESERVED)}"
                )
        return {key: encode_extra(v, f"{path}/{key}", tensors) for key, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [encode_extra(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_extra(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{path} is a {type(value).__name__}; extra holds JSON values (numbers, strings, lists, "
        "dicts), tuples, tensors and numpy arrays"
    )


def _encode_numpy(numpy: Any, value: Any, path: str, tensors: dict[str, Tensor]) -> dict:
    array = numpy.asarray(value)
    if array.dtype.hasobject or array.dtype.kind == "V":
        raise TypeError(
            f"{path} is a numpy array of dtype {array.dtype}; extra holds numpy arrays of "
            "numbers, bools or strings (an object or structured array would need pickling)"
        )
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    raw = numpy.ascontiguousarray(little_endian).reshape(-1).view(numpy.uint8)
    tensors[path] = torch.from_numpy(raw.copy())
    return {
        _NDARRAY: path,
        "dtype": little_endian.dtype.str,
        "shape": list(array.shape),
        "scalar": isinstance(value, numpy.generic),
    }


def decode_extra(value: Any, reader: Reader) -> Any:
    """What ``encode_extra`` encoded, the tensors read with ``reader``."""
    if isinstance(value, list):
        return [decode_extra(v, reader) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        return reader.read(key).view(reader.tensors[key]["shape"])
    if _TUPLE in value:
        return tuple(decode_extra(v, reader) for v in value[_TUPLE])
    if _NDARRAY in value:
        import numpy

        raw = reader.read(value[_NDARRAY]).numpy()
        array = raw.view(numpy.dtype(value["dtype"])).reshape(value["shape"])
        return array[()] if value["scalar"] else array
    return {key: decode_extra(v, reader) for key, v in value.items()}
