"""A fixed pool of expert slots shared by all layers, filled by background reads, with pluggable eviction.

Every slot is one aligned record-sized region of a single anonymous mapping, so the pool's memory is
allocated once, up front, and is exactly ``num_slots * record_bytes``. A slot is *pinned* while the MoE of
its layer may still use it (from the router hook until the experts have been computed) and cannot be
evicted then; a slot whose read is in flight cannot be evicted either.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from smallthinker.inference.io import aligned_buffer
from smallthinker.inference.store import ExpertStore

Key = tuple[int, int]  # (layer, expert)


class LRUPolicy:
    """Evict the expert used least recently."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: set[Key]) -> Key | None:
        return next((k for k in self._order if k in candidates), None)


class LFUPolicy:
    """Evict the expert used least often (counts survive eviction; ties broken by recency)."""

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._lru = LRUPolicy()

    def touch(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._lru.touch(key)

    def remove(self, key: Key) -> None:
        self._lru.remove(key)

    def victim(self, candidates: set[Key]) -> Key | None:
        if not candidates:
            return None
        rank = {k: i for i, k in enumerate(self._lru._order)}
        return min(candidates, key=lambda k: (self._count.get(k, 0), rank.get(k, -1)))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


@dataclass
class CacheStats:
    hits: int = 0  # demanded experts already resident (or already being read) when demanded
    misses: int = 0  # demanded experts that had to be read on demand
    prefetch_hits: int = 0  # demanded experts that a speculative prefetch had loaded or started
    speculative_loads: int = 0
    loads: int = 0
    bytes_read: int = 0
    io_wait_s: float = 0.0  # time the MoE spent waiting for reads to finish
    read_s: float = 0.0  # time the I/O threads spent reading (overlaps compute)


class ExpertCache:
    """Slots, the (layer, expert) -> slot map, pins and background reads."""

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        policy: str = "lru",
        io_threads: int = 2,
        verify: bool = True,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"the expert cache needs at least one slot, got {num_slots}")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)}")
        self.store, self.num_slots, self.verify = store, num_slots, verify
        self.record_bytes = store.record_bytes
        self._mmap, self._pool = aligned_buffer(num_slots * self.record_bytes)
        self._views = [store.unpack(self._record(s)) for s in range(num_slots)]
        self._policy = POLICIES[policy]()
        self._slot_of: dict[Key, int] = {}
        self._key_of: list[Key | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._loading: list[Future | None] = [None] * num_slots
        # Set and cleared under the lock; `Future.done()` is not usable for this, because waiters are notified
        # from inside the read function, before its future completes.
        self._reading = [False] * num_slots
        self._speculative = [False] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._verified: set[Key] = set()
        self._failed: dict[Key, BaseException] = {}
        self._cond = threading.Condition()
        self._executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")
        self.stats = CacheStats()

    def _record(self, slot: int) -> torch.Tensor:
        return self._pool[slot * self.record_bytes : (slot + 1) * self.record_bytes]

    # -- slot allocation (callers hold self._cond) --------------------------------------------------------
    def _evictable(self) -> set[Key]:
        return {k for k, s in self._slot_of.items() if self._pins[s] == 0 and not self._reading[s]}

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self._policy.victim(self._evictable())
        if victim is None:
            return None
        slot = self._slot_of.pop(victim)
        self._policy.remove(victim)
        self._key_of[slot] = None
        return slot

    def _start_read(self, key: Key, slot: int, speculative: bool) -> None:
        self._slot_of[key], self._key_of[slot] = slot, key
        self._speculative[slot] = speculative
        if speculative:  # enters the policy as just used: it is expected to be demanded next
            self._policy.touch(key)
        self._reading[slot] = True
        self._loading[slot] = self._executor.submit(self._read, key, slot)
        self.stats.loads += 1
        self.stats.speculative_loads += speculative

    def _read(self, key: Key, slot: int) -> None:
        start = time.perf_counter()
        verify = self.verify and key not in self._verified
        try:
            self.store.read(*key, self._record(slot), verify=verify)
        except BaseException as err:
            with self._cond:  # forget the half-read slot; `get` reports the error to the MoE that waits on it
                self._reading[slot] = False
                del self._slot_of[key]
                self._key_of[slot], self._pins[slot] = None, 0
                self._policy.remove(key)
                self._free.append(slot)
                self._failed[key] = err
                self._cond.notify_all()
            raise
        with self._cond:
            self._reading[slot] = False
            if verify:
                self._verified.add(key)
            self.stats.bytes_read += self.record_bytes
            self.stats.read_s += time.perf_counter() - start
            self._cond.notify_all()

    # -- public API ---------------------------------------------------------------------------------------
    def acquire(self, layer: int, experts: Iterable[int]) -> None:
        """Pin the experts of ``layer``, starting reads for missing ones; blocks only while no slot is free."""
        with self._cond:
            for e in experts:
                key = (layer, e)
                self._failed.pop(key, None)  # a new demand retries an expert whose earlier read failed
                while (slot := self._slot_of.get(key)) is None:
                    slot = self._take_slot()
                    if slot is not None:
                        self._start_read(key, slot, speculative=False)
                        self.stats.misses += 1
                        break
                    self._cond.wait()  # every slot pinned or being read: wait for a release or a read
                else:
                    self.stats.hits += 1
                    self.stats.prefetch_hits += self._speculative[slot]
                self._speculative[slot] = False
                self._pins[slot] += 1
                self._policy.touch(key)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Speculatively start reads into free or evictable slots; never blocks, never pins."""
        with self._cond:
            for e in experts:
                key = (layer, e)
                if key in self._slot_of:
                    continue
                slot = self._take_slot()
                if slot is None:
                    return
                self._start_read(key, slot, speculative=True)

    def get(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The weights of a pinned expert, waiting for its read if it is still in flight."""
        with self._cond:
            if (layer, expert) in self._failed:
                raise self._failed.pop((layer, expert))
            slot = self._slot_of.get((layer, expert))
            if slot is None or self._pins[slot] == 0:
                raise RuntimeError(f"layer {layer} expert {expert} was not acquired before use")
            future = self._loading[slot]
        if future is not None and not future.done():
            start = time.perf_counter()
            try:
                future.result()
            finally:
                self.stats.io_wait_s += time.perf_counter() - start
                with self._cond:
                    self._failed.pop((layer, expert), None)
        return self._views[slot]

    def release(self, layer: int, experts: Iterable[int]) -> None:
        with self._cond:
            for e in experts:
                slot = self._slot_of.get((layer, e))
                if slot is None:  # the read failed and the slot was dropped
                    continue
                self._pins[slot] -= 1
            self._cond.notify_all()

    def resident_keys(self) -> set[Key]:
        with self._cond:
            return set(self._slot_of)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
