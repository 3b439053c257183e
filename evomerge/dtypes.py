"""Floating dtypes by name, and the dtype forward passes run in.

Scoring computes in float32 on a CPU by default: bf16 values are exactly representable
in float32, so the scores are those of the stored weights, and on CPUs without AVX-512
bf16 matrix work runs several times slower than float32 (bench/bench_compute_dtype.py).
On a GPU the default is the dtype the weights are stored in. Workers and `evomerge eval`
share this rule, so a search and an evaluation of its export compute the same function.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .recipe import COMPUTE_DTYPES, DTYPES as DTYPE_NAMES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def compute_dtype(name: str | None, device: str, stored: torch.dtype) -> torch.dtype:
    """``auto`` (or None): float32 on a CPU, ``stored`` elsewhere; else the named dtype."""
    if name in (None, "auto"):
        return torch.float32 if str(device).startswith("cpu") or not stored.is_floating_point else stored
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"compute dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}") from None
