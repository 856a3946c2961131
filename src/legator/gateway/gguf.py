"""GGUF header metadata (read within bounds; the ``gguf`` package's constants) and a memory
estimate for serving it.

The estimate follows how llama.cpp allocates: the weights as stored, an f16 KV cache of
``layers x kv_heads x (key_length + value_length) x 2 bytes`` per token over the whole context
(``context x parallel`` tokens), where layers using a sliding window keep only the window, plus
a compute/overhead allowance.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from pydantic import BaseModel, Field

GIB = 1024**3
KV_BYTES_PER_VALUE = 2  # f16 cache, llama.cpp's default
OVERHEAD_FIXED = 256 * 1024**2  # CUDA/Vulkan context, scratch buffers
OVERHEAD_RATIO = 0.05  # compute graph grows with the model


class GGUFError(ValueError):
    """The file is not a readable GGUF model."""


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# Bounds a real model stays far below (the largest vocabularies with their merges list about
# 700 000 strings; no model has more than a few thousand tensors or keys); a crafted header
# past them is refused before it costs time.
MAX_HEADER_STRINGS = 2_000_000
MAX_TENSORS = 65_536
MAX_KEYS = 65_536
# Values kept for reading: the scalars and the short per-layer arrays the estimate needs.
# Longer strings (a chat template) and arrays (a vocabulary) are only stepped over.
MAX_KEPT_STRING_BYTES = 4096
MAX_KEPT_ARRAY_ITEMS = 4096
_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


@dataclass
class _Header:
    keys: set[str] = field(default_factory=set)  # every key of the file
    values: dict[str, Any] = field(default_factory=dict)  # those kept (see above)
    tensor_bytes: int = 0


class _HeaderReader:
    """Reads a GGUF header (keys, values, tensor descriptions), checking every length against
    the file. Written by hand rather than with the gguf package's GGUFReader: that one makes
    numpy objects for each string of the header (about 1.6 KB and 35 µs apiece), so a crafted
    24 MB header of empty strings took it 5 GB and 100 s, and it recursed into nested arrays
    without bound; here nothing is kept but the dozen values the estimate uses."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0
        self.order = "<"
        self.strings = 0
        self.header = _Header()

    def _take(self, size: int, what: str) -> int:
        start = self.offset
        if size > len(self.data) - start:
            raise GGUFError(f"truncated at byte {start}: {what} needs {size} more bytes")
        self.offset = start + size
        return start

    def _unpack(self, code: str, count: int, what: str) -> tuple[Any, ...]:
        fmt = f"{self.order}{count}{code}"
        return struct.unpack_from(fmt, self.data, self._take(struct.calcsize(fmt), what))

    def _u32(self, what: str) -> int:
        return int(self._unpack("I", 1, what)[0])

    def _u64(self, what: str) -> int:
        return int(self._unpack("Q", 1, what)[0])

    def _string(self, what: str) -> str | None:
        """The string at the offset, or None (stepped over) when it is too long to keep."""
        size = self._u64(what)
        start = self._take(size, what)
        if size > MAX_KEPT_STRING_BYTES:
            return None
        try:
            return bytes(self.data[start : start + size]).decode()
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not UTF-8") from None

    def _skip_strings(self, count: int, what: str) -> None:
        self.strings += count
        if self.strings > MAX_HEADER_STRINGS:
            raise GGUFError(f"more than {MAX_HEADER_STRINGS} strings in the header")
        for _ in range(count):
            self._take(self._u64(what), what)

    def _array(self, what: str) -> list[Any] | None:
        item_type, count = self._u32(what), self._u64(what)
        if item_type == GGUFValueType.STRING:
            self._skip_strings(count, what)
            return None
        if item_type == GGUFValueType.ARRAY:
            raise GGUFError(f"{what} holds nested arrays, which llama.cpp cannot read")
        code = _FORMATS.get(item_type)  # type: ignore[call-overload]
        if code is None:
            raise GGUFError(f"{what} is an array of unknown type {item_type}")
        if count > MAX_KEPT_ARRAY_ITEMS:
            self._take(count * struct.calcsize(code), what)
            return None
        return list(self._unpack(code, count, what))

    def _value(self, value_type: int, what: str) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string(what)
        if value_type == GGUFValueType.ARRAY:
            return self._array(what)
        code = _FORMATS.get(value_type)  # type: ignore[call-overload]
        if code is None:
            raise GGUFError(f"{what} has unknown type {value_type}")
        return self._unpack(code, 1, what)[0]

    def _tensor_bytes(self, index: int) -> tuple[int, int]:
        """(offset in the data section, size) of a tensor, from its description."""
        what = f"the description of tensor {index}"
        self._take(self._u64(what), what)  # its name
        dims = self._u32(what)
        if dims > GGML_MAX_DIMS:
            raise GGUFError(f"tensor {index} has {dims} dimensions")
        elements = math.prod(self._unpack("Q", dims, what))
        raw_type = self._u32(what)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {index} has unknown type {raw_type}") from None
        return self._u64(what), elements * type_size // block

    def read(self) -> _Header:
        if bytes(self.data[:4]) != GGUF_MAGIC:
            raise GGUFError("no GGUF magic at the start")
        self.offset = 4
        version = self._u32("the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in GGUF_VERSIONS:
            raise GGUFError(f"GGUF version {version} is not supported")
        tensors, keys = self._u64("the tensor count"), self._u64("the key count")
        if tensors > MAX_TENSORS or keys > MAX_KEYS:
            raise GGUFError(f"{tensors} tensors and {keys} keys: more than {MAX_TENSORS}")
        header = self.header
        for index in range(keys):
            name = self._string(f"the name of key {index}")
            if name is None or name in header.keys:
                raise GGUFError(f"key {index} has an overlong or repeated name")
            value = self._value(self._u32(f"the type of {name}"), name)
            header.keys.add(name)
            if value is not None:
                header.values[name] = value
        layout = [self._tensor_bytes(index) for index in range(tensors)]
        self._check_tensor_data(layout)
        header.tensor_bytes = sum(size for _, size in layout)
        return header

    def _check_tensor_data(self, layout: list[tuple[int, int]]) -> None:
        alignment = self.header.values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
        start = -(-self.offset // alignment) * alignment
        for index, (offset, size) in enumerate(layout):
            if start + offset + size > len(self.data):
                raise GGUFError(f"tensor {index} lies past the end of the file (truncated?)")


def _read_header(path: Path) -> _Header:
    with path.open("rb") as fh:
        if path.stat().st_size < 4:
            raise GGUFError("too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _HeaderReader(data).read()


class GGUFInfo(BaseModel):
    architecture: str
    name: str = ""
    file_type: int | None = None
    file_size: int = 0
    tensor_bytes: int = 0
    context_length: int | None = None
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int | list[bool] | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    chat_template: bool = False


class Estimate(BaseModel):
    model_id: str
    parallel: int
    context: int = Field(description="Tokens per slot.")
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    target: str = Field(description="'gpu' when it fits the detected GPUs, else 'ram' or 'none'.")
    gpu_free_bytes: int
    ram_available_bytes: int


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        # Some architectures store per-layer head counts; the maximum bounds the cache.
        return max(_int(v) or 0 for v in value) if value else None
    if isinstance(value, str):
        raise GGUFError(f"{value[:40]!r} where a number belongs")
    return int(value)


def read_metadata(path: Path) -> GGUFInfo:
    """Read the header of ``path``; raises GGUFError when it is not a GGUF model."""
    try:
        return _info(path, _read_header(path))
    except (GGUFError, OSError, ValueError, OverflowError) as exc:
        raise GGUFError(f"{path.name}: not a readable GGUF file ({exc})") from None


def _info(path: Path, header: _Header) -> GGUFInfo:
    values = header.values
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("the header has no general.architecture")

    def a(key: str) -> Any:
        return values.get(f"{arch}.{key}")

    pattern = a("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        pattern = [bool(v) for v in pattern]
    elif pattern is not None:
        pattern = _int(pattern)
    return GGUFInfo(
        architecture=arch,
        name=str(values.get("general.name") or ""),
        file_type=_int(values.get("general.file_type")),
        file_size=path.stat().st_size,
        tensor_bytes=header.tensor_bytes,
        context_length=_int(a("context_length")),
        block_count=_int(a("block_count")),
        embedding_length=_int(a("embedding_length")),
        head_count=_int(a("attention.head_count")),
        head_count_kv=_int(a("attention.head_count_kv")),
        key_length=_int(a("attention.key_length")),
        value_length=_int(a("attention.value_length")),
        sliding_window=_int(a("attention.sliding_window")),
        sliding_window_pattern=pattern,
        expert_count=_int(a("expert_count")),
        expert_used_count=_int(a("expert_used_count")),
        chat_template="tokenizer.chat_template" in header.keys,
    )


def _sliding_layers(info: GGUFInfo, layers: int) -> int:
    """How many layers use the sliding window (the rest attend over the full context)."""
    if not info.sliding_window:
        return 0
    pattern = info.sliding_window_pattern
    if isinstance(pattern, list):
        return sum(1 for flag in pattern[:layers] if flag)
    if isinstance(pattern, int) and pattern > 1:
        # Every pattern-th layer is global, the others slide (Gemma-style).
        return layers - layers // pattern
    return layers  # a window with no pattern: every layer slides (Mistral-style)


def kv_cache_bytes(info: GGUFInfo, *, context: int, parallel: int) -> int:
    layers = info.block_count or 0
    heads = info.head_count or 0
    kv_heads = info.head_count_kv or heads
    head_dim = (info.embedding_length or 0) // heads if heads else 0
    per_token_layer = kv_heads * ((info.key_length or head_dim) + (info.value_length or head_dim))
    tokens = context * parallel
    sliding = _sliding_layers(info, layers)
    window_tokens = min(tokens, (info.sliding_window or 0) * parallel)
    cells = (layers - sliding) * tokens + sliding * window_tokens
    return cells * per_token_layer * KV_BYTES_PER_VALUE


def estimate(
    model_id: str,
    info: GGUFInfo,
    *,
    context: int,
    parallel: int,
    gpu_free_bytes: int,
    ram_available_bytes: int,
) -> Estimate:
    weights = info.tensor_bytes or info.file_size
    kv = kv_cache_bytes(info, context=context, parallel=parallel)
    overhead = OVERHEAD_FIXED + int(weights * OVERHEAD_RATIO)
    total = weights + kv + overhead
    if gpu_free_bytes and total <= gpu_free_bytes:
        target = "gpu"
    elif total <= ram_available_bytes:
        target = "ram"
    else:
        target = "none"
    return Estimate(
        model_id=model_id,
        parallel=parallel,
        context=context,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        overhead_bytes=overhead,
        total_bytes=total,
        fits=target != "none",
        target=target,
        gpu_free_bytes=gpu_free_bytes,
        ram_available_bytes=ram_available_bytes,
    )
