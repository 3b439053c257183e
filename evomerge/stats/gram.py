"""RegMean's statistics: the Gram matrix of every linear layer's inputs, G = sum of x^T x.

Sums run over the non-padding tokens of the calibration batches. Each batch's product is
taken in float32 (the forward's dtype) and added into a float64 running sum: a batch
holds at most ``batch_size * max_length`` tokens, few enough for float32, while the sum
over all batches is where float32 would drift. The file stores the sums in ``dtype``
(float32 by default, half the disk of float64; the merge solves in float64 anyway).

Streamed layer by layer, so that neither every layer's activations nor every layer's
Grams are held at once: one forward per batch with each decoder layer swapped for a
recorder captures the layer stack's input and the arguments the model passes its layers
(masks, rotary embeddings); then each layer runs over all batches on the hidden states
the previous one produced, with hooks on its linears, and its Grams are written out
before the next layer starts. The head's Gram comes from the final norm's output. This
needs the decoder stack and final norm by name (``model.layers`` / ``model.norm`` for
Llama, Mistral, Qwen2; ``transformer.h`` / ``transformer.ln_f`` for GPT-2); any other
model, or one with linears outside the stack and head, falls back to full forwards with
hooks on every linear, and then holds all its Grams in memory at once.

Linears that receive the very same input tensor (q/k/v; gate/up) share one Gram: a probe
forward on the first batch finds them by tensor identity, the file stores the Gram once
under the first one's weight name, and the ``aliases`` metadata maps every linear's
weight name to the tensor that holds its Gram.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from evomerge.io.safetensors_file import StreamingWriter, read_header, read_tensor

FORMAT = 1  # bump when the same model and data would give other Grams or another layout
COUNTS = "__token_counts__"  # int64 [n_grams]: the tokens summed into each stored Gram, in key order
_STACKS = (("layers", "norm"), ("h", "ln_f"))  # (decoder layers, final norm) on model.base_model


def linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


@dataclass
class _Layout:
    """What the probe forward found: the stored Grams in call order, and who shares which."""

    keys: list[str] = field(default_factory=list)  # weight names that hold a Gram, in first-call order
    dims: dict[str, int] = field(default_factory=dict)  # key -> input features
    aliases: dict[str, str] = field(default_factory=dict)  # every linear's weight name -> its key
    leader_of: dict[str, str] = field(default_factory=dict)  # module name -> key, for the modules that compute one
    conv1d: list[str] = field(default_factory=list)  # weight names stored [in, out] (GPT-2 Conv1D)


def compute_grams(model: nn.Module, batches: list[dict[str, Tensor]], out_path: Path,
                  dtype: torch.dtype = torch.float32, stream: bool | None = None) -> str:
    """Write the Grams of ``model`` (eval mode, no grad) on ``batches`` to ``out_path``.

    ``stream``: None streams where the model's layout allows it (else the full-forward
    fallback); False forces full forwards. Returns the mode used, "streamed" or "full"."""
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with torch.no_grad():
        layout = _probe(model, batches[0])
        plan = _stream_plan(model, layout) if stream is not False else None
        mode = "streamed" if plan is not None else "full"
        meta = {
            "evomerge.kind": "gram",
            "format": str(FORMAT),
            "mode": mode,
            "accumulation": "float32 per batch, float64 across batches",
            "keys": json.dumps(layout.keys),
            "aliases": json.dumps(layout.aliases),
            "conv1d": json.dumps(layout.conv1d),
            "tied": json.dumps(_tied(model)),
        }
        entries = [(k, dtype, (layout.dims[k], layout.dims[k])) for k in layout.keys]
        entries.append((COUNTS, torch.int64, (len(layout.keys),)))
        counts: dict[str, int] = {}
        with StreamingWriter(out_path, entries, metadata=meta) as writer:
            def emit(grams: dict[str, Tensor]) -> None:
                for key in layout.keys:  # the file's order; a stage holds a contiguous run of it
                    if key in grams:
                        writer.write(key, grams.pop(key).to(dtype))
            if plan is not None:
                _streamed(model, batches, layout, plan, counts, emit)
            else:
                emit(_full(model, batches, layout, counts))
            writer.write(COUNTS, torch.tensor([counts.get(k, 0) for k in layout.keys], dtype=torch.int64))
    return mode


# ----------------------------------------------------------------------------- probe


def _probe(model: nn.Module, batch: dict[str, Tensor]) -> _Layout:
    layout = _Layout()
    kinds = linear_types()
    seen: list[tuple[Tensor, str]] = []  # held for the whole forward, so no id or address is reused
    handles = []
    conv1d_type = kinds[1]

    def hook_for(name: str, module: nn.Module):
        def hook(_mod, args):
            x = args[0]
            weight = f"{name}.weight"
            if weight in layout.aliases:
                return
            for other, key in seen:
                if other is x:
                    layout.aliases[weight] = key
                    break
            else:
                layout.keys.append(weight)
                layout.dims[weight] = int(x.shape[-1])
                layout.aliases[weight] = weight
                layout.leader_of[name] = weight
                seen.append((x, weight))
            if isinstance(module, conv1d_type):
                layout.conv1d.append(weight)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, kinds):
            handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return layout


def _tied(model: nn.Module) -> dict[str, str]:
    """Head weight name -> embedding weight name, when the two are one tensor (not stored twice)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return {f"{names[id(head)]}.weight": f"{names[id(emb)]}.weight"}


# ----------------------------------------------------------------------------- accumulation


class _Sums:
    """Float64 running Gram sums and token counts, fed one layer input at a time."""

    def __init__(self, counts: dict[str, int]):
        self.grams: dict[str, Tensor] = {}
        self.counts = counts
        self.mask: Tensor | None = None  # the current batch's attention mask

    def add(self, key: str, x: Tensor) -> None:
        mask = self.mask
        # Per-token inputs [batch, len, in] drop their padding; any other shape counts every row.
        rows = x[mask.bool()] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
        rows = rows.float()
        part = (rows.T @ rows).double()
        if key in self.grams:
            self.grams[key] += part
        else:
            self.grams[key] = part
        self.counts[key] = self.counts.get(key, 0) + rows.shape[0]

    @contextlib.contextmanager
    def hooked(self, layout: _Layout, modules):
        """Feed every computing linear among ``modules`` ((name, module) pairs) its inputs."""
        handles = [
            module.register_forward_pre_hook(lambda _m, args, key=layout.leader_of[name]: self.add(key, args[0]))
            for name, module in modules if name in layout.leader_of
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def take(self) -> dict[str, Tensor]:
        grams, self.grams = self.grams, {}
        return grams


def _full(model: nn.Module, batches: list[dict[str, Tensor]], layout: _Layout, counts: dict[str, int]) -> dict[str, Tensor]:
    sums = _Sums(counts)
    with sums.hooked(layout, model.named_modules()):
        for batch in batches:
            sums.mask = batch["attention_mask"]
            model(**batch, use_cache=False)
    return sums.take()


@dataclass
class _Plan:
    prefix: str  # module-name prefix of the decoder layers, e.g. "model.layers"
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module | None
    head_name: str | None


def _stream_plan(model: nn.Module, layout: _Layout) -> _Plan | None:
    base = model.base_model
    names = {id(m): n for n, m in model.named_modules()}
    for layers_attr, norm_attr in _STACKS:
        layers, norm = getattr(base, layers_attr, None), getattr(base, norm_attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and isinstance(norm, nn.Module):
            break
    else:
        return None
    prefix = names[id(layers)]
    head = model.get_output_embeddings()
    head_name = names.get(id(head)) if head is not None else None
    stages = [_stage(name, prefix, head_name) for name in _key_modules(layout)]
    if any(s is None for s in stages) or stages != sorted(stages):
        return None  # a linear outside the stack and head, or calls out of layer order
    return _Plan(prefix, layers, norm, head, head_name)


def _key_modules(layout: _Layout) -> list[str]:
    by_key = {key: name for name, key in layout.leader_of.items()}
    return [by_key[k] for k in layout.keys]


def _stage(module_name: str, prefix: str, head_name: str | None) -> int | None:
    if module_name == head_name:
        return 1 << 30
    if module_name.startswith(prefix + "."):
        index = module_name[len(prefix) + 1:].split(".", 1)[0]
        if index.isdigit():
            return int(index)
    return None


class _Stop(Exception):
    """Raised by the last recorder: nothing after the layer stack is needed."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: keeps what the model passes it, changes nothing."""

    def __init__(self, index: int, store: dict, last: bool):
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.index == 0:
            self.store["input"] = hidden
        self.store[self.index] = (rest, kwargs)
        if self.last:
            raise _Stop
        return hidden


def _layer_inputs(model: nn.Module, plan: _Plan, batch: dict[str, Tensor]) -> tuple[Tensor, list]:
    """The stack's input for one batch and, per layer, the other arguments the model passes it."""
    store: dict = {}
    real = list(plan.layers)
    for i in range(len(real)):
        plan.layers[i] = _Recorder(i, store, last=i == len(real) - 1)
    try:
        model(**batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(real):
            plan.layers[i] = layer
    if "input" not in store or len(real) - 1 not in store:
        raise RuntimeError("the model did not call its decoder layers in order; the Gram stream cannot follow it")
    return store["input"], [store[i] for i in range(len(real))]


def _streamed(model: nn.Module, batches, layout: _Layout, plan: _Plan, counts: dict[str, int], emit) -> None:
    hidden, calls = [], []
    for batch in batches:
        h, c = _layer_inputs(model, plan, batch)
        hidden.append(h)
        calls.append(c)
    masks = [b["attention_mask"] for b in batches]
    sums = _Sums(counts)
    for i, layer in enumerate(plan.layers):
        modules = [(f"{plan.prefix}.{i}.{n}" if n else f"{plan.prefix}.{i}", m) for n, m in layer.named_modules()]
        with sums.hooked(layout, modules):
            for b in range(len(batches)):
                sums.mask = masks[b]
                rest, kwargs = calls[b][i]
                out = layer(hidden[b], *rest, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                calls[b][i] = None  # this layer's masks and arguments are not needed again
        emit(sums.take())
    head_key = layout.leader_of.get(plan.head_name)
    if head_key is not None:
        for b in range(len(batches)):
            sums.mask = masks[b]
            sums.add(head_key, plan.norm(hidden[b]))  # the head's input; its logits are not needed
        emit(sums.take())


# ----------------------------------------------------------------------------- reading


class GramFile:
    """A Gram statistics file: each linear's Gram by its weight name (aliases resolved)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries, meta = read_header(self.path)
        self.aliases: dict[str, str] = json.loads(meta["aliases"])
        self.conv1d: frozenset[str] = frozenset(json.loads(meta["conv1d"]))
        self.tied: dict[str, str] = json.loads(meta.get("tied", "{}"))
        self.mode: str = meta.get("mode", "")
        keys = json.loads(meta["keys"])
        self._counts = dict(zip(keys, read_tensor(self._entries[COUNTS]).tolist()))

    def keys(self) -> list[str]:
        """The stored Grams' names: one per distinct input."""
        return [k for k in self._entries if k != COUNTS]

    def names(self) -> list[str]:
        """Every linear weight name that has a Gram (sharing ones included)."""
        return list(self.aliases)

    def __contains__(self, name: str) -> bool:
        return name in self.aliases

    def key(self, name: str) -> str:
        """The stored tensor holding ``name``'s Gram (itself, or the linear it shares an input with)."""
        return self.aliases[name]

    def gram(self, name: str) -> Tensor:
        """The sum of x^T x over the calibration tokens, [in, in]."""
        return read_tensor(self._entries[self.aliases[name]])

    def count(self, name: str) -> int:
        return int(self._counts[self.aliases[name]])

    def mean(self, name: str) -> Tensor:
        """The Gram per token, as RegMean's reference code keeps it."""
        return self.gram(name).double() / max(self.count(name), 1)
