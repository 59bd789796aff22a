"""Decode kernels compiled on this machine: `kernels/*.cpp`, built once with the machine's C++ compiler and
`-march=native` (so the AVX-512 / VNNI / BF16 or the AVX2 branch is the one this CPU has) and loaded as torch ops
(`torch.ops.smallthinker.gemv_bf16`, `gemv_int8`, `gemv_int4`, `axpy_rows`, `moe_decode`) and the whole-step
decoder class (`torch.classes.smallthinker.Decoder`, driven by `decoder.NativeDecoder`).

They exist because decode is a matrix-vector product bound by memory bandwidth, and PyTorch's weight-only kernels
stream int8 / int4 weights at a fraction of it (scripts.bench_kernels). Everything has a pure-PyTorch fallback:
without a compiler, when the build fails, or with `SMALLTHINKER_NATIVE_KERNELS=0` (or
`SMALLTHINKER_PORTABLE_KERNELS=1`), `available()` is False and `formats` uses torch's kernels instead.

The shared library is cached under `$SMALLTHINKER_KERNEL_CACHE` (default `~/.cache/smallthinker/kernels`), keyed
by the source, the torch build, the compiler and the CPU's flags, and published by an atomic rename, so concurrent
first uses and machines sharing a home directory each get a build that matches them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "gemv.cpp", KERNELS / "decoder.cpp")
HEADERS = (KERNELS / "simd.h",)
NAMESPACE = "smallthinker"
# Tokens the matrix-vector kernels take in one call: a decode step (1) and small batches. Prefill goes to GEMMs.
MAX_TOKENS = 16


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled here (no compiler, or it failed)."""


def enabled() -> bool:
    """Whether the native kernels may be used (not switched off by the environment)."""
    if os.environ.get("SMALLTHINKER_PORTABLE_KERNELS", "") not in ("", "0"):
        return False
    return os.environ.get("SMALLTHINKER_NATIVE_KERNELS", "1") not in ("0", "")


def cache_dir() -> Path:
    root = os.environ.get("SMALLTHINKER_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smallthinker" / "kernels"


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    return cxx


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _torch_lib_dir() -> Path:
    return Path(torch.__file__).parent / "lib"


def build_command(cxx: str, out: Path, march: str, namespace: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    lib = _torch_lib_dir()
    return [
        cxx, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DKERNEL_NAMESPACE={namespace}",
        *(f"-I{p}" for p in include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        *(str(s) for s in SOURCES), "-o", str(out),
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def build(march: str = "native", namespace: str = NAMESPACE) -> Path:
    """Compile the kernels for `march` (a gcc `-march` value) into the cache, unless already there; the path of the
    shared library. The ops register under `torch.ops.<namespace>`."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    sources = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
    for part in (*sources, torch.__version__, version, march, namespace, _cpu_flags()):
        key.update(part.encode() if isinstance(part, str) else part)
    out = cache_dir() / f"gemv-{namespace}-{march}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"compiling the decode kernels for this CPU (-march={march}, once)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        done = subprocess.run(build_command(cxx, tmp_out, march, namespace), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KernelBuildError(f"{cxx} failed to compile the kernels in {KERNELS}: {last}")
        os.replace(tmp_out, out)
    return out


def load(march: str = "native", namespace: str = NAMESPACE):
    """Build (if needed) and load the kernels; their op namespace (`torch.ops.<namespace>`)."""
    torch.ops.load_library(str(build(march, namespace)))
    return getattr(torch.ops, namespace)


def march() -> str:
    """The `-march` the kernels are built for: this CPU's (`native`), or `SMALLTHINKER_KERNEL_MARCH` (e.g.
    `x86-64-v3` for the AVX2 branch, `x86-64` for the plain C++ one)."""
    return os.environ.get("SMALLTHINKER_KERNEL_MARCH", "native")


@functools.cache
def _ops():
    if not enabled():
        return None
    try:
        return load(march())
    except (KernelBuildError, OSError, RuntimeError) as err:
        warnings.warn(f"native decode kernels unavailable, using PyTorch's: {err}", stacklevel=3)
        return None


def available() -> bool:
    """Whether the native kernels are built and loaded here (and not switched off)."""
    return enabled() and _ops() is not None


def ops():
    """`torch.ops.smallthinker`; call only when `available()`."""
    return _ops()


def describe() -> str:
    """Which branch each kernel runs here, e.g. 'bf16=avx512-bf16 int8/int4=avx512-vnni', or why none."""
    if not enabled():
        return "native kernels off (environment)"
    return ops().isa() if available() else "native kernels unavailable"
