"""Eviction policies, pinning, and concurrent use of the slot pool."""

from __future__ import annotations

import random
import threading

from smallthinker.inference.cache import ExpertCache, LFUPolicy, LRUPolicy
from smallthinker.inference.io import aligned_buffer
from smallthinker.inference.store import ExpertStore


def test_lru_and_lfu_victims():
    lru, lfu = LRUPolicy(), LFUPolicy()
    for key in [(0, 0), (0, 1), (0, 2), (0, 0), (0, 0), (0, 2)]:
        lru.touch(key)
        lfu.touch(key)
    everything = {(0, 0), (0, 1), (0, 2)}
    assert lru.victim(everything) == (0, 1)
    assert lru.victim({(0, 0), (0, 2)}) == (0, 0)  # (0, 0) was used before the last (0, 2)
    assert lfu.victim(everything) == (0, 1)  # used once
    assert lfu.victim({(0, 0), (0, 2)}) == (0, 2)  # 2 uses against 3


def test_pinned_experts_are_never_evicted(tiny):
    store = ExpertStore(tiny["tiny-4b-style"][2])
    cache = ExpertCache(store, num_slots=2)
    cache.acquire(0, [0, 1])
    cache.prefetch(1, [0])  # no free or evictable slot: nothing happens, nothing blocks
    assert cache.resident_keys() == {(0, 0), (0, 1)}
    cache.get(0, 0), cache.get(0, 1)
    cache.release(0, [0, 1])
    cache.prefetch(1, [0])  # now the least recently used of the two goes
    assert cache.resident_keys() == {(0, 1), (1, 0)}
    cache.acquire(1, [0])
    cache.get(1, 0)
    assert cache.stats.prefetch_hits == 1 and cache.stats.misses == 2
    cache.release(1, [0])
    cache.close()


def test_concurrent_users_always_see_their_own_expert(tiny):
    """Threads demand random experts through a 3-slot pool; every slot they get holds the right bytes."""
    store = ExpertStore(tiny["tiny-4b-style"][2])
    truth = {}
    _, buf = aligned_buffer(store.record_bytes)
    for layer in range(store.num_layers):
        for j in range(store.num_experts):
            store.read(layer, j, buf[: store.record_bytes], verify=True)
            truth[layer, j] = store.unpack(buf[: store.record_bytes])["gate"].sum().item()
    cache = ExpertCache(store, num_slots=3, io_threads=4)
    errors = []

    def user(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            layer, j = rng.randrange(store.num_layers), rng.randrange(store.num_experts)
            cache.acquire(layer, [j])
            if rng.random() < 0.3:
                cache.prefetch(rng.randrange(store.num_layers), [rng.randrange(store.num_experts)])
            if cache.get(layer, j)["gate"].sum().item() != truth[layer, j]:
                errors.append((layer, j))
            cache.release(layer, [j])

    threads = [threading.Thread(target=user, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert not errors
    assert cache.stats.hits + cache.stats.misses == 450
    assert cache.stats.bytes_read == cache.stats.loads * store.record_bytes
