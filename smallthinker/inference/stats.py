"""Engine statistics: what the cache, the disk and the compute did per generated token."""

from __future__ import annotations

import resource
import sys

import psutil


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
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
