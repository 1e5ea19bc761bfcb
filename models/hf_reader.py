"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index) lazily."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np

from jaxserve.models.lazy_tensors import CheckpointFiles, CheckpointTensor

SAFETENSORS_INDEX = "model.safetensors.index.json"

# Buffers some old checkpoints saved alongside the weights; the model recomputes them.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def find_safetensors_files(model_dir: str) -> tuple[str, ...]:
    """The safetensors files of a HF model directory, in a stable order (index order when sharded)."""
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shards that are missing: {', '.join(missing)}")
        return tuple(os.path.join(model_dir, s) for s in shards)
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    # Mistral repos ship their original-format `consolidated.safetensors` next to the HF weights.
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    files = hf_files or files
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has a config.json but no *.safetensors weights "
            "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")
    return tuple(files)


def lazy_safetensors(files: tuple[str, ...], skip: frozenset[str],
                     reader: CheckpointFiles) -> dict[str, CheckpointTensor]:
    """Every tensor of the shards by name, unread (headers only): each is read where it is indexed."""
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name not in skip and not name.endswith(_SKIPPED_SUFFIXES):
                    out[name] = CheckpointTensor(reader, path, name, tuple(f.get_slice(name).get_shape()))
    return out


def iter_safetensors(files: tuple[str, ...], skip: frozenset[str] = frozenset(),
                     progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float32 array) per tensor, reading one tensor at a time (bf16/fp16 upcast)."""
    from safetensors import safe_open
    from tqdm import tqdm

    bar = tqdm(desc="Loading safetensors", unit="tensor", disable=not progress)
    try:
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    if name in skip or name.endswith(_SKIPPED_SUFFIXES):
                        continue
                    # ml_dtypes' bfloat16 numpy arrays cast to float32 exactly.
                    yield name, np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)
                    bar.update(1)
    finally:
        bar.close()
