"""Checkpoint tensors read on demand: a slice reads only its own bytes, in the layout and dtype asked for."""
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxserve.models.hf_reader import lazy_safetensors
from jaxserve.models.lazy_tensors import CheckpointFiles, StackedTensors, is_lazy


@pytest.fixture
def checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((6, 4)).astype(np.float32),  # HF [out, in]
        "b.weight": rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16),
        "norm.weight": rng.standard_normal(4).astype(np.float32),
        "layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return str(path), tensors


def test_slices_read_only_their_bytes(checkpoint):
    path, tensors = checkpoint
    files = CheckpointFiles()
    lazy = lazy_safetensors((path,), frozenset({"norm.weight"}), files)  # and the .rotary_emb.inv_freq buffers
    assert sorted(lazy) == ["a.weight", "b.weight"]
    assert files.bytes_read == 0  # headers only
    a = lazy["a.weight"]
    assert a.shape == (6, 4) and is_lazy(a)
    np.testing.assert_array_equal(a[slice(2, 4), slice(None)], tensors["a.weight"][2:4])
    assert files.bytes_read == 2 * 4 * 4
    np.testing.assert_array_equal(np.asarray(a), tensors["a.weight"])


def test_transposed_and_cast_like_numpy(checkpoint):
    path, tensors = checkpoint
    files = CheckpointFiles()
    lazy = lazy_safetensors((path,), frozenset(), files)
    b = lazy["b.weight"].T.astype(np.float32)  # [in, out], a column-parallel device takes columns
    want = tensors["b.weight"].astype(np.float32).T
    assert b.shape == (4, 6)
    got = b[slice(None), slice(3, 6)]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want[:, 3:6])
    assert files.bytes_read == 4 * 3 * 2  # bfloat16 on disk: only the three stored rows
    as_bf16 = lazy["a.weight"].astype(ml_dtypes.bfloat16)[...]
    np.testing.assert_array_equal(as_bf16, tensors["a.weight"].astype(ml_dtypes.bfloat16))


def test_stacked_layers_read_only_the_layers_and_slices_asked(checkpoint):
    path, tensors = checkpoint
    files = CheckpointFiles()
    lazy = lazy_safetensors((path,), frozenset(), files)
    stacked = StackedTensors((lazy["a.weight"].T, lazy["b.weight"].T))
    assert stacked.shape == (2, 4, 6)
    want = np.stack([tensors["a.weight"].T, tensors["b.weight"].astype(np.float32).T])
    np.testing.assert_array_equal(stacked[(slice(None), slice(None), slice(0, 3))], want[:, :, :3])
    assert files.bytes_read == 3 * 4 * 4 + 3 * 4 * 2
    np.testing.assert_array_equal(stacked[(slice(1, 2),)][0], want[1])
    with pytest.raises(TypeError):
        stacked[(slice(None), 0)]
