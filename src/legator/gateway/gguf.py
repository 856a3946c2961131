"""GGUF header metadata (through the ``gguf`` package) and a memory estimate for serving it.

The estimate follows how llama.cpp allocates: the weights as stored, an f16 KV cache of
``layers x kv_heads x (key_length + value_length) x 2 bytes`` per token over the whole context
(``context x parallel`` tokens), where layers using a sliding window keep only the window, plus
a compute/overhead allowance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader
from pydantic import BaseModel, Field

GIB = 1024**3
KV_BYTES_PER_VALUE = 2  # f16 cache, llama.cpp's default
OVERHEAD_FIXED = 256 * 1024**2  # CUDA/Vulkan context, scratch buffers
OVERHEAD_RATIO = 0.05  # compute graph grows with the model


class GGUFError(ValueError):
    """The file is not a readable GGUF model."""


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


def _scalar(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, list):
        # Some architectures store per-layer head counts; the maximum bounds the cache.
        return max(int(v) for v in value) if value else None
    return int(value)


def read_metadata(path: Path) -> GGUFInfo:
    """Read the header of ``path``; raises GGUFError when it is not a GGUF model."""
    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError, KeyError) as exc:
        raise GGUFError(f"{path.name}: not a readable GGUF file ({exc})") from None
    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path.name}: GGUF header has no general.architecture")

    def a(key: str) -> Any:
        return _scalar(reader, f"{arch}.{key}")

    pattern = a("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        pattern = [bool(v) for v in pattern]
    elif pattern is not None:
        pattern = int(pattern)
    return GGUFInfo(
        architecture=arch,
        name=str(_scalar(reader, "general.name") or ""),
        file_type=_int(_scalar(reader, "general.file_type")),
        file_size=path.stat().st_size,
        tensor_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)),
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
        chat_template=_scalar(reader, "tokenizer.chat_template") is not None,
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
