"""The plan's vocabulary: where each output tensor comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch


@dataclass(frozen=True)
class Read:
    source: str  # model reference as written in the recipe
    name: str


@dataclass(frozen=True)
class Merge:
    kernel: str
    inputs: tuple[Read, ...]
    base: Read | None
    model_params: tuple[Mapping[str, Any], ...]
    params: Mapping[str, Any]
    seed: int


Expr = Union[Read, Merge]


@dataclass(frozen=True)
class Output:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    expr: Expr
    divide_by: float = 1.0  # DFS fold: residual writers of slot k are divided by c_k

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * numel(self.shape)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_pre_tensor(name: str) -> bool:
    # tensors before the first block (embeddings) take t=0, the rest (final norm, head) t=1, as mergekit does
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))


def layer_rests(source, index: int) -> list[str]:
    """Names within layer ``index`` of a source, in file order."""
    out = []
    for name in source.entries:
        hit = source.arch.split(name)
        if hit and hit[0] == index:
            out.append(hit[1])
    return out


