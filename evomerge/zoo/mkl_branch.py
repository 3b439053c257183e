"""MKL's reproducible AVX2 branch on any x86-64 CPU with AVX2, Intel's or another vendor's.

MKL keeps a conditional-numerical-reproducibility branch (``MKL_CBWR``) only where its vendor
check, ``mkl_serv_intel_cpu_true``, says Intel: on other CPUs every branch but COMPATIBLE falls
back to MKL's automatic dispatch (AVX-512 or AVX2 kernels, by CPU), and COMPATIBLE itself was
measured to round differently on an Intel Xeon and an AMD EPYC (bench/RESULTS.md, ninth
session). So the zoo build's child asks for MKL's AVX2 branch and, on other vendors' CPUs,
preloads a one-function library that answers the vendor check with yes; the branch MKL then
reports (``mkl_serv_cbwr_get``) is recorded in the zoo's manifest. The library is compiled
once, with the machine's C compiler, into the evomerge cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
# mkl_cbwr.h's branch numbers, as mkl_serv_cbwr_get reports them
BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
            10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...), or "" where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def vendor_shim(cache: Path) -> Path | None:
    """The compiled library under ``cache`` (built on the first call), or None without a C compiler
    or when compiling fails."""
    out = cache / "mkl" / f"intel_cpu_true-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if out.is_file():
        return out
    cc = compiler()
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(SOURCE)
        done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], capture_output=True, text=True)
        if done.returncode != 0 or not lib.is_file():
            return None
        os.replace(lib, out)  # atomic: a concurrent build finds a whole library or none
    return out


def active_branch() -> str:
    """The CNR branch MKL runs in this process (its name, or "unknown" where torch has no MKL)."""
    import ctypes

    import torch

    torch.mm(torch.ones(2, 2), torch.ones(2, 2))  # MKL settles its branch at its first call
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        code = lib.mkl_serv_cbwr_get(1)  # MKL_CBWR_BRANCH
    except (OSError, AttributeError):
        return "unknown"
    return BRANCHES.get(code, str(code))
