"""Decoding Flower's serialized tensors without copying them, and encoding with one copy.

Flower's `parameters_to_ndarrays` runs `np.load` on each tensor, which copies every byte.
`decode` reads the `.npy` header instead (parsed once per distinct header: every client's
update of a layer has the same one) and returns a read-only `np.frombuffer` view of the
bytes Flower received. Anything but Flower's own `numpy.ndarray` tensors goes through
`parameters_to_ndarrays` unchanged. `encode` writes the bytes `ndarrays_to_parameters`
writes, copying each array once instead of three times. `without_tensors` is what a server
keeps of a reply once its update is folded.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace
from functools import lru_cache
from typing import Literal

import numpy as np
from flwr.common import FitRes, NDArrays, Parameters, ndarray_to_bytes, parameters_to_ndarrays

NUMPY_TENSORS = "numpy.ndarray"  # the tensor_type of Flower's ndarrays_to_parameters
_PREFIX = 8  # magic string (6 bytes) and format version (2 bytes)
_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}  # bytes of the header length, per major version


@lru_cache(maxsize=1024)
def _header(header: bytes) -> tuple[tuple[int, ...], np.dtype, Literal["C", "F"], int]:
    """(shape, dtype, memory order, number of values) of an `.npy` header, as `np.load`
    reads it."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded without pickle")
    return shape, dtype, "F" if fortran else "C", math.prod(shape)


def decode_tensor(tensor: bytes) -> np.ndarray:
    """One `np.save`d array as a read-only view of `tensor` (no copy).

    Raises ValueError on bytes that are not a complete `.npy` array, as `np.load` would.
    """
    if len(tensor) < _PREFIX + 2 or tensor[6] not in _LENGTH_BYTES:
        raise ValueError("not an .npy array")
    start = _PREFIX + _LENGTH_BYTES[tensor[6]]
    offset = start + int.from_bytes(tensor[_PREFIX:start], "little")
    shape, dtype, order, count = _header(bytes(tensor[:offset]))
    if len(tensor) < offset + count * dtype.itemsize:
        raise ValueError(f"{len(tensor) - offset} data bytes for an array {shape} of {dtype}")
    return np.frombuffer(tensor, dtype=dtype, count=count, offset=offset).reshape(
        shape, order=order)


def decode(parameters: Parameters) -> NDArrays:
    """The arrays of `parameters`: zero-copy views of Flower's numpy tensors, or
    `parameters_to_ndarrays` for any other tensor type."""
    if parameters.tensor_type != NUMPY_TENSORS:
        return parameters_to_ndarrays(parameters)
    return [decode_tensor(tensor) for tensor in parameters.tensors]


def encode_array(array: np.ndarray) -> bytes:
    """The bytes `np.save` writes for `array` (Flower's `ndarray_to_bytes`), with one copy."""
    array = np.asanyarray(array)
    if array.dtype.hasobject or not array.flags.c_contiguous:
        return ndarray_to_bytes(array)
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(
            header, np.lib.format.header_data_from_array_1_0(array))
    except ValueError:  # a header too long for format 1.0: np.save's own choice
        return ndarray_to_bytes(array)
    return b"".join((header.getvalue(), array.reshape(-1).view(np.uint8).data))


def encode(arrays: NDArrays) -> Parameters:
    """`ndarrays_to_parameters(arrays)`, the same bytes, each array copied once."""
    return Parameters(tensors=[encode_array(a) for a in arrays], tensor_type=NUMPY_TENSORS)


def without_tensors(res: FitRes) -> FitRes:
    """`res` with no tensors (its status, claim and metrics kept): what a server keeps of a
    reply once its update is folded, so the bytes can be freed."""
    return replace(res, parameters=Parameters(tensors=[],
                                              tensor_type=res.parameters.tensor_type))
