"""Reading GGUF files: metadata, tensor directory, and tensors as float32 in Hugging Face names/layouts.

We parse the GGUF header ourselves instead of using `gguf.GGUFReader`: the reader builds a Python
object per array element, which for a 49k-token vocabulary plus its merges costs ~4 s on every open,
and a server opens the file three times (config, tokenizer, weights). Our parser reads numeric arrays
with one `np.frombuffer` and takes ~0.2 s. The `gguf` package stays the authority for the quantization
types, block sizes and dequantization kernels.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from jaxserve.pallas_kernels import block_quant

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Scalar value types: struct format (little-endian) per GGUFValueType.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}

# Types we promise to load (others `gguf.quants` can dequantize also work, untested).
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K,
)

# llama.cpp tensor names (per layer, after `blk.N.`) -> Hugging Face names (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")
# Tensors llama.cpp adds that have no Hugging Face weight (precomputed llama3 rope frequencies).
_IGNORED_TENSORS = {"rope_freqs.weight"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first) = reversed GGUF `ne`
    tensor_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]  # strings as str, numeric arrays as np.ndarray, string arrays as list[str]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}


class _Cursor:
    """Sequential little-endian reads over a buffer."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"{self.path}: truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _string_array(self, count: int) -> list[str]:
        # The vocabulary and merges are ~100k strings: a tight loop, no per-item dispatch.
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8", "replace"))
                pos += 8 + n
        except struct.error as e:
            raise ValueError(f"{self.path}: truncated GGUF header") from e
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            if item_type == GGUFValueType.STRING:
                return self._string_array(count)
            return [self.value(item_type) for _ in range(count)]
        return self.scalar(_SCALAR_FORMATS[vtype])


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor directory (no tensor data is read). A start-up asks for it
    several times (config, tokenizer, weight formats, weights), ~0.15 s a parse: the last few parses are kept,
    keyed by the file's identity, so an edited or replaced file is parsed anew. Treat the result as read-only."""
    st = os.stat(path)
    return _parse_gguf_header(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse_gguf_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian or v1 files are not supported)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        ttype = GGMLQuantizationType(cur.scalar("<I"))
        rel_offset = cur.scalar("<Q")
        raw_infos.append((name, tuple(reversed(ne)), ttype, rel_offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = tuple(GGUFTensorInfo(n, s, t, data_start + off) for n, s, t, off in raw_infos)
    return GGUFHeader(path=path, version=version, metadata=metadata, tensors=tensors)


def _raw_bytes(header: GGUFHeader, info: GGUFTensorInfo) -> np.ndarray:
    byte_shape = quant_shape_to_byte_shape(info.shape, info.tensor_type)
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(int(np.prod(byte_shape)),))
    return raw.reshape(byte_shape)


def read_gguf_tensor(header: GGUFHeader, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor dequantized to float32 in numpy order (reversed GGUF dims)."""
    if info.tensor_type not in GGML_QUANT_SIZES:
        raise ValueError(f"{info.name}: unknown GGML tensor type {info.tensor_type}")
    try:
        values = dequantize(_raw_bytes(header, info), info.tensor_type)
    except NotImplementedError as e:
        supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise ValueError(f"{info.name}: GGUF tensor type {info.tensor_type.name} is not supported "
                         f"(supported: {supported})") from e
    return np.ascontiguousarray(values.reshape(info.shape), dtype=np.float32)


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to its Hugging Face name; None for tensors we do not know."""
    if m := _LAYER_RE.match(name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
        return None
    if m := _GLOBAL_RE.match(name):
        part, kind = m.groups()
        if part in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[part]}.{kind}"
    return None


def module_of(hf_name: str) -> str:
    """The module a weight belongs to, by its last name: "q_proj", "down_proj", "embed_tokens", "lm_head"."""
    return hf_name.rsplit(".", 2)[-2]


def block_formats(header: GGUFHeader) -> dict[str, str]:
    """Modules whose weights can stay in their blocks (pallas_kernels/block_quant): module -> "q4" / "q8", for
    those whose every 2-D weight (one per layer) is of one block type the kernels take. A layer-stacked step
    needs one format per module; a file that mixes types (the K-quant "_M" mixes) dequantizes the rest."""
    formats: dict[str, set] = {}
    for info in header.tensors:
        hf_name = gguf_to_hf_name(info.name)
        if hf_name and hf_name.endswith(".weight") and len(info.shape) == 2:
            tiles = info.shape[0] % block_quant.TILE == 0  # rows pair up in the kernels' tiles
            formats.setdefault(module_of(hf_name), set()).add(tiles and block_quant.format_of(info.tensor_type.name))
    return {module: fmts.pop() for module, fmts in sorted(formats.items())
            if len(fmts) == 1 and None not in fmts and False not in fmts}


def undo_rotary_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's convert-time Q/K row permutation.

    Hugging Face Llama rotates (first half, second half) of each head; llama.cpp rotates interleaved
    pairs, so its converter reorders each head's rows from [half0 | half1] into pairs (h0[0], h1[0], ...).
    Undoing it regroups the pair members back into the two halves. Works on weights [out, in] and biases [out].
    """
    out = w.shape[0]
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_hf_tensors(header: GGUFHeader, num_heads: int, num_kv_heads: int, progress: bool = False,
                         keep_blocks: frozenset[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """Yield (hf_name, float32 array) for every known tensor of a llama/qwen2/qwen3 GGUF; the weights of the modules
    in `keep_blocks` (see block_formats) come as block_quant's packed arrays {"qweight", "scales"[, "mins"]},
    one row per output."""
    from tqdm import tqdm

    # Only llama.cpp's llama converter permutes Q/K; its qwen2 and qwen3 converters keep the HF row order.
    permuted = header.architecture == "llama"
    for info in tqdm(header.tensors, desc="Loading GGUF tensors", unit="tensor", disable=not progress):
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is None:
            if info.name in _IGNORED_TENSORS:
                logger.warning("Ignoring %s: llama3-style rope frequency scaling from GGUF is not supported",
                               info.name)
            else:
                logger.warning("Ignoring unknown GGUF tensor %s", info.name)
            continue
        if hf_name.endswith(".weight") and module_of(hf_name) in keep_blocks:
            arrays = block_quant.pack_gguf(_raw_bytes(header, info), info.tensor_type.name)
        else:
            arrays = {"": read_gguf_tensor(header, info)}
        heads = {".self_attn.q_proj.": num_heads, ".self_attn.k_proj.": num_kv_heads}
        for part, n in heads.items():
            if permuted and part in hf_name:  # rows are outputs in both layouts
                arrays = {k: undo_rotary_permutation(a, n) for k, a in arrays.items()}
        yield hf_name, arrays[""] if "" in arrays else block_quant.tile(arrays)
