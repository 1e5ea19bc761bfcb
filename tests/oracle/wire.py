"""The oracle's JSON wire format for numpy arrays, shared by both sides of the subprocess.

Logits are large (49152 floats per step), so arrays travel as base64 of their raw little-endian
bytes instead of JSON number lists: ~5x smaller and bit-exact.  This module needs only numpy, so the
3.11 oracle (encode) and the 3.12 test process (decode) both import it.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

ARRAY_TAG = "__ndarray__"


def encode_array(array: np.ndarray) -> dict:
    """A JSON-safe dict holding `array` exactly (dtype, shape and bytes, little-endian)."""
    array = np.ascontiguousarray(array)
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {
        ARRAY_TAG: base64.b64encode(little_endian.tobytes()).decode("ascii"),
        "dtype": array.dtype.name,
        "shape": list(array.shape),
    }


def decode_array(obj: dict) -> np.ndarray:
    dtype = np.dtype(obj["dtype"]).newbyteorder("<")
    flat = np.frombuffer(base64.b64decode(obj[ARRAY_TAG]), dtype=dtype)
    return flat.reshape(obj["shape"]).astype(dtype.newbyteorder("="), copy=True)


def decode_arrays_hook(obj: dict) -> Any:
    """`json.loads(..., object_hook=decode_arrays_hook)` turns every encoded array back into numpy."""
    if ARRAY_TAG in obj:
        return decode_array(obj)
    return obj
