"""passthrough: copy one source's tensor (optionally scaled); what layer-stacking slices use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from evomerge.errors import UserError


def merge(tensors: Sequence[Tensor], base: Tensor | None, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) != 1:
        raise UserError(f"passthrough takes exactly one source per slice, got {len(tensors)}; use another merge_method to combine models")
    return tensors[0].float() * float(model_params[0]["scale"])
