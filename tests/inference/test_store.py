"""The expert store: record contents and alignment, corruption, truncation, read errors, O_DIRECT fallback."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from smallthinker.inference.cache import ExpertCache
from smallthinker.inference.io import ALIGNMENT, DirectFile, ExpertReadError, aligned_buffer
from smallthinker.inference.store import EXPERTS_FILE, MANIFEST, RESIDENT_FILE, ExpertStore, StoreError


def _read(store: ExpertStore, layer: int, expert: int) -> dict[str, torch.Tensor]:
    _, buf = aligned_buffer(store.record_bytes)
    store.read(layer, expert, buf[: store.record_bytes], verify=True)
    return {k: v.clone() for k, v in store.unpack(buf[: store.record_bytes]).items()}


@pytest.mark.parametrize("preset", ["tiny-4b-style", "tiny-21b-style"])
def test_records_hold_the_checkpoint_experts(tiny, preset):
    model, _, store_dir, _ = tiny[preset]
    store = ExpertStore(store_dir)
    assert store.file.direct, "ext4/xfs support O_DIRECT; the test machine's tmp should too"
    assert store.record_bytes % ALIGNMENT == 0
    assert os.path.getsize(store_dir / EXPERTS_FILE) == store.expert_bytes_total
    ffn = model.config.moe_ffn_hidden_size
    for layer in (0, store.num_layers - 1):
        experts = model.model.layers[layer].block_sparse_moe.experts
        for j in (0, store.num_experts - 1):
            assert store.manifest["experts"][layer][j]["offset"] % ALIGNMENT == 0
            w = _read(store, layer, j)
            assert torch.equal(w["gate"], experts.gate_up_proj[j, :ffn])  # gate rows come first
            assert torch.equal(w["up"], experts.gate_up_proj[j, ffn:])
            assert torch.equal(w["down_t"], experts.down_proj[j].t())
    with safe_open(store_dir / RESIDENT_FILE, framework="pt") as f:
        names = set(f.keys())
    assert not any(".experts." in n for n in names)
    assert ("lm_head.weight" in names) == (not model.config.tie_word_embeddings)


def test_int8_records_dequantise_close_to_the_weights(tiny):
    model, _, _, store_dir = tiny["tiny-4b-style"]
    store = ExpertStore(store_dir)
    w = _read(store, 1, 3)
    experts = model.model.layers[1].block_sparse_moe.experts
    down = w["down_q"].float() * w["down_scale"][:, None]
    err = (down - experts.down_proj[3]).abs()
    assert err.max() <= w["down_scale"].max() / 2 + 1e-7  # round-to-nearest: at most half a step


def _copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_store_names_the_first_missing_expert(tiny, tmp_path):
    store_dir = _copy_store(tiny["tiny-4b-style"][2], tmp_path / "store")
    record = json.loads((store_dir / MANIFEST).read_text())["record_bytes"]
    with open(store_dir / EXPERTS_FILE, "r+b") as f:
        f.truncate(f.seek(0, 2) - record // 2)
    with pytest.raises(StoreError, match="truncated.*layer 3 expert 7"):
        ExpertStore(store_dir)


def test_flipped_byte_names_the_corrupted_expert(tiny, tmp_path):
    store_dir = _copy_store(tiny["tiny-4b-style"][2], tmp_path / "store")
    manifest = json.loads((store_dir / MANIFEST).read_text())
    offset = manifest["experts"][2][5]["offset"] + 1234
    with open(store_dir / EXPERTS_FILE, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))
    store = ExpertStore(store_dir)
    with pytest.raises(StoreError, match="checksum mismatch for layer 2 expert 5"):
        store.verify_all()
    cache = ExpertCache(store, num_slots=2)
    cache.acquire(2, [4, 5])
    assert cache.get(2, 4)["gate"].shape == (128, 128)  # the neighbour is intact
    with pytest.raises(StoreError, match="layer 2 expert 5"):
        cache.get(2, 5)
    cache.release(2, [4, 5])
    cache.close()


def test_read_errors_are_retried_then_reported(tiny):
    store = ExpertStore(tiny["tiny-4b-style"][2])
    real_read, calls = store.file.read_impl, []

    def flaky(fd, view, offset):  # two transient failures, then success
        calls.append(offset)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "injected I/O error")
        real_read(fd, view, offset)

    store.file.read_impl = flaky
    w = _read(store, 1, 3)
    assert len(calls) == 3 and w["gate"].abs().sum() > 0

    def broken(fd, view, offset):
        raise OSError(errno.EIO, "injected I/O error")

    store.file.read_impl = broken
    cache = ExpertCache(store, num_slots=2)
    cache.acquire(1, [3])
    with pytest.raises(ExpertReadError, match="layer 1 expert 3 .* failed 3 times"):
        cache.get(1, 3)
    cache.release(1, [3])
    store.file.read_impl = real_read  # the disk recovers: the next demand reads the expert again
    cache.acquire(1, [3])
    assert torch.equal(cache.get(1, 3)["gate"], w["gate"])
    cache.release(1, [3])
    cache.close()


def test_o_direct_falls_back_with_a_warning(tmp_path, monkeypatch):
    """Filesystems that accept the flag but fail the first direct read (older tmpfs) get buffered reads."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(2 * ALIGNMENT))
    monkeypatch.setattr(DirectFile, "_probe_direct", lambda self: False)
    with pytest.warns(UserWarning, match="O_DIRECT is not supported"):
        file = DirectFile(path)
    assert not file.direct
    _, buf = aligned_buffer(ALIGNMENT)
    file.read_into(memoryview(buf.numpy()), ALIGNMENT, "probe")
    assert bytes(buf.numpy()) == path.read_bytes()[ALIGNMENT:]
    file.close()
