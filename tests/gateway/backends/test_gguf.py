"""GGUF metadata through the gguf package, the sliding-window-aware estimate, GPU detection
without a GPU, and the estimate and system endpoints."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from gguf import GGUFWriter

from legator.gateway import system
from legator.gateway.gguf import GGUFError, GGUFInfo, estimate, kv_cache_bytes, read_metadata
from tests.gateway.backends.conftest import register_managed
from tests.gateway.tiny_gguf import CONTEXT, EMBED, HEADS, LAYERS


def _header_only(path: Path, **extra: int) -> Path:
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_context_length(131072)
    writer.add_embedding_length(2560)
    writer.add_block_count(34)
    writer.add_head_count(8)
    writer.add_head_count_kv(4)
    writer.add_key_length(256)
    writer.add_value_length(256)
    for key, value in extra.items():
        writer.add_uint32(f"gemma3.attention.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_tiny_model_header(gguf_file: Path) -> None:
    info = read_metadata(gguf_file)
    assert info.architecture == "llama" and info.name == "legator-tiny-test"
    assert (info.context_length, info.block_count, info.embedding_length) == (
        CONTEXT,
        LAYERS,
        EMBED,
    )
    assert info.head_count == HEADS and info.head_count_kv == HEADS
    assert info.file_type == 0 and info.chat_template is True
    assert 0 < info.tensor_bytes < info.file_size
    assert info.sliding_window is None and info.expert_count is None


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a model at all" * 10)
    with pytest.raises(GGUFError, match=r"x\.gguf"):
        read_metadata(bogus)


def test_kv_cache_full_attention(gguf_file: Path) -> None:
    info = read_metadata(gguf_file)
    per_token = LAYERS * HEADS * (EMBED // HEADS) * 2 * 2  # K and V, f16
    assert kv_cache_bytes(info, context=512, parallel=3) == per_token * 512 * 3


def test_kv_cache_sliding_window_pattern(tmp_path: Path) -> None:
    full = read_metadata(_header_only(tmp_path / "full.gguf"))
    sliding = read_metadata(
        _header_only(tmp_path / "swa.gguf", sliding_window=1024, sliding_window_pattern=6)
    )
    assert sliding.sliding_window == 1024 and sliding.sliding_window_pattern == 6
    assert (full.key_length, full.value_length, full.head_count_kv) == (256, 256, 4)
    per_cell = 4 * (256 + 256) * 2
    context = 32768
    assert kv_cache_bytes(full, context=context, parallel=1) == 34 * context * per_cell
    # 34 layers, every 6th global: 5 global at full context, 29 windowed at 1024.
    expected = (5 * context + 29 * 1024) * per_cell
    assert kv_cache_bytes(sliding, context=context, parallel=1) == expected
    # A context shorter than the window: the window saves nothing.
    assert kv_cache_bytes(sliding, context=512, parallel=1) == kv_cache_bytes(
        full, context=512, parallel=1
    )


def test_estimate_targets() -> None:
    info = GGUFInfo(
        architecture="llama",
        tensor_bytes=4 * 1024**3,
        block_count=32,
        embedding_length=4096,
        head_count=32,
        head_count_kv=8,
    )
    on_gpu = estimate("m", info, context=8192, parallel=2, gpu_free_bytes=24 * 1024**3,
                      ram_available_bytes=1)  # fmt: skip
    assert on_gpu.kv_cache_bytes == 32 * 8 * 256 * 2 * 8192 * 2 * 1024 // 1024
    assert on_gpu.total_bytes == (
        on_gpu.weights_bytes + on_gpu.kv_cache_bytes + on_gpu.overhead_bytes
    )
    assert on_gpu.fits and on_gpu.target == "gpu"
    in_ram = estimate("m", info, context=8192, parallel=2, gpu_free_bytes=0,
                      ram_available_bytes=64 * 1024**3)  # fmt: skip
    assert in_ram.target == "ram"
    nowhere = estimate("m", info, context=8192, parallel=2, gpu_free_bytes=1024**3,
                       ram_available_bytes=1024**3)  # fmt: skip
    assert not nowhere.fits and nowhere.target == "none"


def test_amd_sysfs_detection(tmp_path: Path) -> None:
    device = tmp_path / "card0" / "device"
    device.mkdir(parents=True)
    (device / "mem_info_vram_total").write_text("17163091968\n")
    (device / "mem_info_vram_used").write_text("1073741824\n")
    (tmp_path / "card1").mkdir()  # no VRAM files: an integrated or non-AMD card
    gpus = system.amd_gpus(tmp_path)
    assert len(gpus) == 1
    assert gpus[0].memory_free_bytes == 17163091968 - 1073741824


def test_estimate_and_system_endpoints(admin: httpx.Client, gguf_file: Path) -> None:
    register_managed(admin, "tiny", gguf_file, parallel=2)
    response = admin.post("/api/v1/gateway/estimate", json={"model_id": "tiny"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parallel"] == 2 and body["context"] == 256
    assert body["kv_cache_bytes"] == LAYERS * HEADS * (EMBED // HEADS) * 4 * 256 * 2
    assert body["fits"] is True
    bigger = admin.post(
        "/api/v1/gateway/estimate", json={"model_id": "tiny", "parallel": 4, "context": 512}
    ).json()
    assert bigger["kv_cache_bytes"] == body["kv_cache_bytes"] * 4
    assert admin.post("/api/v1/gateway/estimate", json={"model_id": "nope"}).status_code == 404
    bad = admin.post("/api/v1/gateway/estimate", json={"model_id": "tiny", "parallel": 0})
    assert bad.status_code == 422
    state = admin.get("/api/v1/gateway/system").json()
    assert state["disk"]["total_bytes"] > 0 and 0 <= state["disk"]["used_percent"] <= 100
    assert isinstance(state["gpus"], list)
    assert [b["model"] for b in state["backends"]] == ["tiny"]
    assert state["backends"][0]["state"] == "stopped"
