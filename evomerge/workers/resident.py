"""Sources kept in memory on a worker: loaded once, read by every candidate.

A ResidentModel is both an HF model object (its blocks are what DFS paths run)
and a TensorSource over the same storage (what PS kernels read), so each source
is held once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..io.model_dir import ModelDir
from ..io.safetensors_file import has_nonfinite


class ResidentModel:
    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        md = ModelDir(path)
        self.path, self.config, self.arch = md.path, md.config, md.arch
        # stored dtype: candidates get exactly the tensors `evomerge merge` would write
        self.model = AutoModelForCausalLM.from_pretrained(md.path, dtype="auto").to(device).eval()
        self.model.config.use_cache = False
        state = self.model.state_dict()
        self.tensors: dict[str, torch.Tensor] = {}
        for name in md.entries:
            t = state[name] if name in state else md.get(name).to(device)
            if has_nonfinite(t):
                raise UserError(f"{path}: tensor {name} holds NaN or Inf; the source checkpoint is broken")
            self.tensors[name] = t
        self.entries = self.tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def blocks(self) -> nn.ModuleList:
        return blocks_of(self.model, self.arch.layer_prefix)


def blocks_of(model: nn.Module, layer_prefix: str) -> nn.ModuleList:
    node = model
    for part in layer_prefix.split("."):
        node = getattr(node, part)
    return node
