"""Sources kept in memory on a worker: loaded once, read by every candidate.

A ResidentModel is both an HF model object (its blocks are what DFS paths run)
and a TensorSource over the same storage (what PS kernels read), so each source
is held once. Its tensors live in the compute dtype (float32 on a CPU: exact for
bf16 values), while ``dtype()`` reports the dtype stored on disk, so a planned
candidate is rounded exactly as `evomerge merge` rounds the file it writes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dtypes import compute_dtype
from ..errors import UserError
from ..io.model_dir import ModelDir
from ..io.safetensors_file import has_nonfinite


class ResidentModel:
    def __init__(self, path: str, device: str = "cpu", compute: str | None = "auto"):
        from transformers import AutoModelForCausalLM

        md = ModelDir(path)
        self.path, self.config, self.arch = md.path, md.config, md.arch
        self.stored = {name: e.dtype for name, e in md.entries.items()}
        self.compute_dtype = compute_dtype(compute, device, _main_dtype(self.stored))
        self.model = AutoModelForCausalLM.from_pretrained(md.path, dtype=self.compute_dtype).to(device).eval()
        self.model.config.use_cache = False
        state = self.model.state_dict()
        self.tensors: dict[str, torch.Tensor] = {}
        for name in md.entries:
            t = state[name] if name in state else md.get(name).to(device)
            if t.is_floating_point():
                t = t.to(self.compute_dtype)
            if has_nonfinite(t):
                raise UserError(f"{path}: tensor {name} holds NaN or Inf; the source checkpoint is broken")
            self.tensors[name] = t
        self.entries = self.tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.stored[name]

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def blocks(self) -> nn.ModuleList:
        return blocks_of(self.model, self.arch.layer_prefix)


def _main_dtype(stored: dict[str, torch.dtype]) -> torch.dtype:
    """The dtype most floating tensors are stored in (what `auto` keeps on a GPU)."""
    floats = [d for d in stored.values() if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def blocks_of(model: nn.Module, layer_prefix: str) -> nn.ModuleList:
    node = model
    for part in layer_prefix.split("."):
        node = getattr(node, part)
    return node


class ResidentLora:
    """A LoRA source (MODEL+ADAPTER) on a worker: the resident MODEL, shared with every other
    reference to it, and the adapter's factors; each tensor the adapter targets is merged in
    when a candidate reads it (one small matmul), rounded to the dtype on disk as `evomerge
    merge` rounds it, so no fine-tuned copy of the model is held. Parameter-space reads only:
    a data-flow path would run its own blocks (the search refuses that, run/search.py)."""

    def __init__(self, model: ResidentModel, adapter_path: str):
        from ..io.lora import LoraAdapter

        self.base, self.adapter = model, LoraAdapter(adapter_path)
        self.path, self.config, self.arch = model.path, model.config, model.arch
        self.stored, self.compute_dtype, self.entries = model.stored, model.compute_dtype, model.entries
        self.adapter.check_model(model.entries, model.path)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.adapter.apply(name, self.base.get(name), self.base.dtype(name))
