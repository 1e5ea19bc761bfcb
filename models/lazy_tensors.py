"""Checkpoint tensors read on demand, so that each device's shard is read from the file alone.

A tensor-parallel load hands these to `jax.make_array_from_callback` (models/sharding.place_sharded): the
callback asks for one device's index, and only those rows/columns are read from the memory-mapped
safetensors file, cast and (for [out, in] HF layouts) transposed. No host ever holds a whole split weight,
and on a multi-host mesh each host reads only the slices of its own devices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class CheckpointFiles:
    """Open safetensors files (memory-mapped, opened once) and a count of the bytes read through them."""

    bytes_read: int = 0
    _handles: dict = field(default_factory=dict)

    def read(self, path: str, name: str, index: tuple[slice, ...]) -> np.ndarray:
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="numpy")
        out = self._handles[path].get_slice(name)[index]
        self.bytes_read += out.nbytes
        return out

    def total_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self._handles)


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a safetensors file, as `dtype`, optionally transposed (2-D); read when indexed."""

    files: CheckpointFiles = field(repr=False, compare=False)
    path: str
    name: str
    stored_shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored_shape[::-1] if self.transposed else self.stored_shape

    @property
    def ndim(self) -> int:
        return len(self.stored_shape)

    @property
    def T(self) -> "CheckpointTensor":  # noqa: N802 (numpy's name)
        if self.ndim > 2:
            raise ValueError(f"{self.name}: only 1-D and 2-D checkpoint tensors transpose")
        return replace(self, transposed=not self.transposed)

    def astype(self, dtype) -> "CheckpointTensor":
        return replace(self, dtype=np.dtype(dtype))

    def __getitem__(self, index) -> np.ndarray:
        index = _full_index(index, self.shape)
        stored = index[::-1] if self.transposed else index
        # Widen through float32: ml_dtypes' bfloat16/float16 arrays cast to float32 exactly.
        out = self.files.read(self.path, self.name, stored).astype(np.float32, copy=False)
        out = out.T if self.transposed else out
        return np.ascontiguousarray(out, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class StackedTensors:
    """Per-layer tensors seen as one [num_layers, ...] array; an index reads only the layers and slices asked."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts),) + tuple(self.parts[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __getitem__(self, index) -> np.ndarray:
        index = _full_index(index, self.shape)
        return np.stack([np.asarray(part[index[1:]]) for part in self.parts[index[0]]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def is_lazy(array) -> bool:
    return isinstance(array, (CheckpointTensor, StackedTensors))


def _full_index(index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A tuple of one slice per dimension (what make_array_from_callback passes; `...` means everything)."""
    if index is Ellipsis:
        return tuple(slice(None) for _ in shape)
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, slice) for i in index):
        raise TypeError(f"checkpoint tensors take slices, got {index!r}")
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for shape {shape}")
    return index + tuple(slice(None) for _ in shape[len(index):])
