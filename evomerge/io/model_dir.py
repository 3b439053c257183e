"""A Hugging Face model directory, read lazily, one tensor at a time."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from ..errors import UserError
from .layers import Architecture
from .safetensors_file import TensorEntry, read_header, read_tensor

_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


class ModelDir:
    """config.json + safetensors (single file or sharded with an index).

    Opening checks everything that can be checked without reading weights:
    the config parses, every shard exists and has a sound header, and the
    index agrees with the shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise UserError(f"model directory {str(path)!r} does not exist; give a local Hugging Face model directory (hub ids are not fetched: download it first)")
        if (self.path / "adapter_config.json").is_file():
            # its adapter_model.safetensors holds low-rank factors, not weights: never read them as a model
            raise UserError(f"{self.path} is a PEFT adapter (adapter_config.json), not a model; name it with its model "
                            f"as a LoRA source, MODEL+{self.path}, and it is merged in as peft's merge_and_unload would")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{self.path}: no config.json; this is not a Hugging Face model directory")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg}: invalid JSON ({e.msg} at line {e.lineno})") from None
        self.entries: dict[str, TensorEntry] = {}
        for shard in self._shards():
            entries, _ = read_header(shard)
            self.entries.update(entries)
        if not self.entries:
            raise UserError(f"{self.path}: the safetensors files hold no tensors")
        self.arch = Architecture.from_config(self.config, self.entries, where=str(self.path))

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index}: corrupt index (no weight_map); re-download or re-save the model") from None
            shards = sorted({self.path / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise UserError(f"{self.path}: shard {missing[0]} named in the index is missing; re-download the model")
            return shards
        if single.is_file():
            return [single]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if found:
            return [self.path / f for f in found]
        pickles = [p for p in _PICKLES if (self.path / p).exists()] + sorted(p.name for p in self.path.glob("pytorch_model-*.bin"))
        if pickles:
            raise UserError(
                f"{self.path}: has only pickled weights ({pickles[0]}); evomerge never unpickles weights. "
                "Convert once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise UserError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    @property
    def name(self) -> str:
        return self.path.name

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            entry = self.entries[name]
        except KeyError:
            raise UserError(f"{self.path}: has no tensor {name!r}") from None
        return read_tensor(entry)

    @cached_property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def load_all(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return {n: self.get(n).to(device) for n in self.entries}


class LoraModelDir(ModelDir):
    """A model with a PEFT LoRA adapter merged in as its tensors are read (evomerge/io/lora.py);
    ``path`` stays the model's (config, tokenizer), ``adapter`` is the adapter."""

    def __init__(self, path: str | Path, adapter: str | Path):
        from .lora import LoraAdapter

        super().__init__(path)
        self.adapter = LoraAdapter(adapter)
        self.adapter.check_model(self.entries, self.path)

    def get(self, name: str) -> torch.Tensor:
        return self.adapter.apply(name, super().get(name))


def open_model(ref: str | Path, resolve=lambda p: Path(p).expanduser()) -> ModelDir:
    """The model a reference names: a directory, or MODEL+ADAPTER for a LoRA source;
    ``resolve`` turns each path into a directory (e.g. relative to a recipe)."""
    from .lora import split_ref

    model, adapter = split_ref(str(ref))
    return ModelDir(resolve(model)) if adapter is None else LoraModelDir(resolve(model), resolve(adapter))
