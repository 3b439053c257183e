"""LoRA sources: a model reference ``MODEL+ADAPTER`` (mergekit's syntax) reads MODEL's tensors
with a PEFT LoRA adapter merged in, tensor by tensor, as ``merge_and_unload`` would.

For a targeted linear layer W (out x in) with factors A (r x in), B (out x r):
W' = W + (B @ A) * scaling, scaling = lora_alpha / r (lora_alpha / sqrt(r) with
``use_rslora``), B @ A transposed first for ``fan_in_fan_out`` layers (GPT-2's Conv1D). As
peft does it: the factors in float32 (peft's default ``autocast_adapter_dtype`` upcasts bf16
and fp16 adapters), the delta added to the weight and rounded once to its stored dtype. Only
the factors are held in memory; the model's tensors are read as they are needed.

Adapters are safetensors only (``adapter_model.safetensors``; never a pickle). Refused, with
the reason: DoRA, LoRA on embeddings, ``lora_bias``, ``modules_to_save`` (full tensors),
per-module ranks or alphas, and any factor that names no tensor of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTORS = (".lora_A.weight", ".lora_B.weight")


def split_ref(ref: str) -> tuple[str, str | None]:
    """(model, adapter or None) of a reference; a path that exists as it is stays whole."""
    if "+" not in ref or Path(ref).expanduser().is_dir():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"model reference {ref!r}: write a LoRA source as MODEL+ADAPTER (one '+')")
    return parts[0], parts[1]


class LoraAdapter:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        config_file = self.path / CONFIG
        if not config_file.is_file():
            raise UserError(f"{self.path}: no {CONFIG}; a LoRA source is MODEL+ADAPTER with ADAPTER a PEFT adapter directory")
        if not (self.path / WEIGHTS).is_file():
            pickled = [p.name for p in self.path.glob("adapter_model*.bin")]
            raise UserError(f"{self.path}: no {WEIGHTS}" + (f" (only the pickle {pickled[0]}: evomerge never unpickles; "
                            "re-save it with safe_serialization=True)" if pickled else ""))
        config = json.loads(config_file.read_text())
        self._refuse(config)
        r, alpha = float(config["r"]), float(config.get("lora_alpha", config["r"]))
        self.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        tensors = load_file(self.path / WEIGHTS)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in tensors:
            if not key.endswith(_FACTORS):
                raise UserError(f"{self.path}: adapter tensor {key!r} is not a LoRA factor of a linear layer "
                                "(embeddings, biases and saved modules are not supported)")
            module = key.removeprefix(_PREFIX).rsplit(".lora_", 1)[0]
            if module not in self.factors:
                a, b = (tensors.get(f"{_PREFIX}{module}{suffix}") for suffix in _FACTORS)
                if a is None or b is None:
                    raise UserError(f"{self.path}: {module} has only one of lora_A and lora_B")
                self.factors[module] = (a.float(), b.float())

    def _refuse(self, config: dict) -> None:
        if config.get("peft_type", "LORA") != "LORA":
            raise UserError(f"{self.path}: a {config['peft_type']} adapter; only LoRA adapters can be merged")
        for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("modules_to_save", "modules_to_save"),
                          ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
            if config.get(key):
                raise UserError(f"{self.path}: {what} ({key}) is not supported; merge this adapter with peft first")

    def targets(self) -> list[str]:
        """The model tensors the adapter changes."""
        return [f"{module}.weight" for module in self.factors]

    def check_model(self, names, model_path) -> None:
        """Refuse a model (its tensor ``names``) that lacks a tensor the adapter changes."""
        missing = [n for n in self.targets() if n not in names]
        if missing:
            raise UserError(f"{self.path}: changes {missing[0]}, which {model_path} does not have; "
                            "this adapter was trained on another model")

    def delta(self, tensor_name: str) -> torch.Tensor | None:
        """(B @ A) * scaling for a targeted weight, float32; None for any other tensor."""
        factors = self.factors.get(tensor_name.removesuffix(".weight")) if tensor_name.endswith(".weight") else None
        if factors is None:
            return None
        a, b = factors
        product = b @ a
        return (product.T if self.fan_in_fan_out else product) * self.scaling

    def apply(self, tensor_name: str, weight: torch.Tensor, stored: torch.dtype | None = None) -> torch.Tensor:
        """``weight`` with the adapter merged in, rounded once to ``stored`` (the dtype on disk;
        default: the weight's own) and returned in the weight's dtype: a resident float32 copy
        of a bf16 model gets exactly the values the merged file would hold."""
        d = self.delta(tensor_name)
        if d is None:
            return weight
        if tuple(d.shape) != tuple(weight.shape):
            raise UserError(f"{self.path}: the factors of {tensor_name} give {list(d.shape)}, the model's tensor is "
                            f"{list(weight.shape)}; this adapter was trained on another model")
        return (weight.float() + d.to(weight.device)).to(stored or weight.dtype).to(weight.dtype)
