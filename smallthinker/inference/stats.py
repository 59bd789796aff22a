"""Engine statistics: what the cache, the disk and the compute did per generated token."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import psutil


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` of /proc/self/status. ``ru_maxrss`` is not used there because exec keeps the parent's
    value: a process started from a large one (pytest, a notebook) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def format_stats(stats: dict[str, float]) -> str:
    """One readable line per statistic, bytes in MB."""
    lines = []
    for key, value in stats.items():
        if key.endswith("bytes") or key.endswith("bytes_per_token"):
            lines.append(f"{key:>24}: {value / 1e6:,.1f} MB")
        elif isinstance(value, float):
            lines.append(f"{key:>24}: {value:.4g}")
        else:
            lines.append(f"{key:>24}: {value}")
    return "\n".join(lines)


def isa_flags() -> str:
    """The SIMD extensions that decide which kernels run (AVX2, AVX-512 and its bf16 / VNNI parts, AMX)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512"
