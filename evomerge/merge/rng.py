"""Counter-based random numbers that are identical on every device, run and chunking.

DARE needs a random keep-mask per (tensor, source model). ``torch.rand`` cannot give
that: its stream depends on the device, the generator state and the order of calls, so
a candidate re-materialized on another worker (or a CUDA worker vs. a CPU export) would
get a different model. Here a random number is a pure function of
(key, element index): a keyed 32-bit integer hash (MurmurHash3's finalizer), so it
needs no state and any slice of the index range can be drawn on its own.

Two implementations of the same function: ``random_bits`` with int64 tensor ops on any
device (all arithmetic stays below 2**63, so no signed overflow happens on any
backend), and ``random_bits_range`` on the CPU, with numpy's wrapping uint32 arithmetic,
which needs a third of the passes over half the bytes (about 15x faster there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
BITS = 24  # a float32 holds 24-bit integers exactly, so uniform() is exact everywhere
_GOLDEN = 0x9E3779B9


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one use of ``seed`` (e.g. one tensor name), stable across runs.

    Python's ``hash`` is salted per process, so a cryptographic hash is used instead.
    """
    text = "\x1f".join([str(int(seed)), *map(str, keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of stream ``stream`` (e.g. a source model's index) under ``seed``."""
    return derive_seed(seed, "stream", stream) & MASK32


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), splitting c so no product reaches 2**63."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's finalizer: a bijection on 32-bit values with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def random_bits(key: int | Tensor, index: Tensor) -> Tensor:
    """Uniform integers in [0, 2**24) (int64), one per element of the int64 ``index``.

    ``key`` is a 32-bit stream key (``stream_key``), as an int or a 0-dim int64 tensor.
    Indices must lie in [0, 2**32): one tensor never has more elements than that.
    """
    h = _mul32((index & MASK32) ^ key, _GOLDEN)
    return _fmix32(h) >> (32 - BITS)


def random_bits_range(keys: Sequence[int], start: int, stop: int) -> np.ndarray:
    """``random_bits(key, arange(start, stop))`` for each key, as a (len(keys), stop - start)
    uint32 numpy array, computed on the CPU; 0 <= start <= stop <= 2**32."""
    h = np.empty((len(keys), stop - start), dtype=np.uint32)
    np.bitwise_xor(np.arange(start, stop, dtype=np.uint32)[None, :], np.asarray(keys, dtype=np.uint32)[:, None], out=h)
    h *= np.uint32(_GOLDEN)  # uint32 products wrap: exactly the mod 2**32 that _mul32 spells out
    shifted = np.empty_like(h)
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        h ^= np.right_shift(h, np.uint32(shift), out=shifted)
        if factor is not None:
            h *= np.uint32(factor)
    h >>= np.uint32(32 - BITS)
    return h


def uniform(seed: int, stream: int, index: Tensor) -> Tensor:
    """Uniform float32 numbers in [0, 1), one per element of the int64 ``index``."""
    bits = random_bits(stream_key(seed, stream), index)
    return bits.to(torch.float32) * (1.0 / (1 << BITS))


def keep_cutoff(probability: float) -> int:
    """The integer c with P(random_bits < c) = probability, rounded to 2**-24."""
    return round(min(max(probability, 0.0), 1.0) * (1 << BITS))
