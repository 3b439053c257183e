"""The plan's vocabulary: where each output tensor comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch


@dataclass(frozen=True)
class Read:
    source: str  # model reference as written in the recipe
    name: str
    # The recipe's ``dtype`` where converting the stored tensor to it changes values
    # (float32 to bfloat16, say): mergekit loads its inputs in that dtype before any
    # arithmetic, so the stored values are rounded to it first. None: read as stored.
    rounds_to: torch.dtype | None = None


@dataclass(frozen=True)
class Merge:
    kernel: str
    inputs: tuple[Read, ...]
    base: Read | None
    model_params: tuple[Mapping[str, Any], ...]
    params: Mapping[str, Any]
    seed: int
    # The recipe's ``dtype`` when it differs from the output dtype: mergekit's kernels
    # return their result in the dtype they computed in, and only then is it cast to
    # ``out_dtype``, so the result passes through this dtype on the way. None: straight.
    rounds_to: torch.dtype | None = None
    # A data-dependent kernel's statistic per input (fisher, regmean), read like a tensor
    # from the source ``stats_ref(kind, model)``; None where that input has none.
    stats: tuple[Read | None, ...] = ()


@dataclass(frozen=True, eq=False)
class Vocab:
    """``inner`` over its models' rows re-indexed to the output vocabulary first
    (evomerge/io/vocab.py): mergekit loads the tensors in the recipe's ``dtype`` and
    re-indexes them, across the tensor's models in slice order, before merging."""

    inner: Union[Read, Merge]
    order: tuple[str, ...]  # the slice's models, as listed (the base where it is listed)
    plan: Any  # io.vocab.VocabPlan
    load: torch.dtype  # the dtype the rows are re-indexed in (the recipe's, else the stored ones' promotion)

    def reads(self) -> list[Read]:
        return reads_of(self.inner)


Expr = Union[Read, Merge, Vocab]


def reads_of(expr) -> list[Read]:
    """The source tensors an expression reads."""
    if isinstance(expr, Read):
        return [expr]
    if isinstance(expr, Vocab):
        return expr.reads()
    return [*expr.inputs, *filter(None, [expr.base])]


def stats_ref(kind: str, model: str) -> str:
    """The source name under which a model's statistic of ``kind`` is opened."""
    return f"{kind}:{model}"


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
    """Whether a tensor outside the blocks comes before them (embeddings) rather than after
    (final norm, head): the first slice's models make the former, the last slice's the
    latter. Both take t=0 in gradients, as in mergekit."""
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))


def rounds_to(stored: torch.dtype, load: torch.dtype | None) -> torch.dtype | None:
    """``load`` when converting a tensor stored as ``stored`` to it can change its values,
    else None (float32 holds every bfloat16 and float16 value: reading those as float32
    needs no rounding step, and no full-size copy)."""
    if load is None or load == stored or not stored.is_floating_point:
        return None
    if load in (torch.float32, torch.float64) and stored.itemsize < load.itemsize:
        return None
    return load


def layer_rests(source, index: int) -> list[str]:
    """Names within layer ``index`` of a source, in file order."""
    out = []
    for name in source.entries:
        hit = source.arch.split(name)
        if hit and hit[0] == index:
            out.append(hit[1])
    return out


