"""Page-cache-bypassing reads of expert records into aligned buffers.

Experts are read with ``O_DIRECT`` so that the memory budget is honest: a normal ``read`` would leave a
second copy of every expert in the kernel page cache, which is exactly the memory the budget forbids.
``O_DIRECT`` requires the buffer address, the file offset and the length to be multiples of the logical
block size; the store pads every record to ``ALIGNMENT`` bytes and the slot pool is one anonymous
``mmap`` (page aligned), so every slot satisfies this by construction.
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections.abc import Callable

import torch

ALIGNMENT = 4096  # page size and the largest logical block size of common disks
READ_RETRIES = 3  # attempts per read before the error is reported
RETRY_BACKOFF_S = 0.01  # first pause between attempts; doubles each time


class ExpertReadError(IOError):
    """A read of one expert record failed after all retries."""


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Anonymous, page-aligned memory of ``nbytes`` and a uint8 tensor view of it (keep both alive)."""
    mm = mmap.mmap(-1, align_up(max(nbytes, 1)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; loops over short reads, raises on end of file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise EOFError(f"end of file at byte {offset + done} ({len(view) - done} bytes missing)")
        done += n


class DirectFile:
    """A file opened for ``O_DIRECT`` reads, falling back to buffered reads where unsupported (tmpfs)."""

    def __init__(self, path: str | os.PathLike, direct: bool = True) -> None:
        self.path = str(path)
        self.direct = False
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = self._probe_direct()
            except OSError:
                pass
        if not self.direct:
            if direct:
                warnings.warn(
                    f"O_DIRECT is not supported for {self.path}; expert reads go through the page cache, "
                    "so resident memory may exceed the budget by the cached file pages.",
                    stacklevel=2,
                )
            if hasattr(self, "fd"):
                os.close(self.fd)
            self.fd = os.open(self.path, flags)
        self.size = os.fstat(self.fd).st_size
        # Swappable for fault injection in tests; signature (fd, memoryview, offset) -> None.
        self.read_impl: Callable[[int, memoryview, int], None] = _pread_into

    def _probe_direct(self) -> bool:
        """Some filesystems accept the O_DIRECT flag at open but fail the first read (EINVAL)."""
        if os.fstat(self.fd).st_size < ALIGNMENT:
            return True
        mm, _ = aligned_buffer(ALIGNMENT)
        try:
            os.preadv(self.fd, [memoryview(mm)], 0)
            return True
        except OSError:
            return False
        finally:
            mm.close()

    def read_into(self, view: memoryview, offset: int, what: str) -> None:
        """Read ``len(view)`` bytes at ``offset``; retries transient errors, then raises ``ExpertReadError``."""
        pause = RETRY_BACKOFF_S
        for attempt in range(1, READ_RETRIES + 1):
            try:
                self.read_impl(self.fd, view, offset)
                return
            except (OSError, EOFError) as err:
                if attempt == READ_RETRIES:
                    raise ExpertReadError(
                        f"reading {what} from {self.path} (offset {offset}, {len(view)} bytes) failed "
                        f"{READ_RETRIES} times: {err}"
                    ) from err
                time.sleep(pause)
                pause *= 2

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget cached pages of this file (only matters for buffered reads)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self.fd)


def measure_read_bandwidth(file: DirectFile, nbytes: int, chunk: int = 4 << 20) -> float:
    """Sequential read bandwidth (bytes/s) of the first ``nbytes`` of ``file`` in ``chunk``-sized requests
    (smaller requests for a file smaller than one chunk)."""
    chunk = min(chunk, file.size // ALIGNMENT * ALIGNMENT)
    if chunk <= 0:
        raise ValueError(f"{file.path} is smaller than one {ALIGNMENT}-byte block: nothing to measure")
    nbytes = min(nbytes, file.size) // chunk * chunk
    mm, _ = aligned_buffer(chunk)
    view = memoryview(mm)
    file.drop_page_cache()
    start = time.perf_counter()
    for offset in range(0, nbytes, chunk):
        _pread_into(file.fd, view, offset)
    elapsed = time.perf_counter() - start
    view.release()
    mm.close()
    return nbytes / max(elapsed, 1e-9)
