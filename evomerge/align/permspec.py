"""Which permutations leave a transformer's function unchanged, per architecture.

A permutation spec names the groups (the residual stream, each layer's MLP hidden
units, each layer's attention heads) and, for every tensor, which axis each group
permutes. ``perms`` maps a group to a LongTensor ``p`` read as "new unit i is old
unit p[i]" (``index_select``), so the identity is ``arange``.

Attention heads are one group per layer, a permutation of the query heads that
respects grouped-query attention: the query heads sharing a kv head move together
to one kv slot, so each query head keeps its kv head and the kv-head permutation is
implied (``kv_perm``). Dimensions inside a head are never permuted: RoPE pairs the
q/k dims, and leaving v/o alone keeps one rule for every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

_LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED = (*_LLAMA_LIKE, "gpt2")
RESIDUAL = "residual"


@dataclass(frozen=True)
class Axis:
    group: str
    dim: int
    unit: int = 1  # consecutive entries moved as one (head_dim for heads)
    repeat: int = 1  # the axis is this many stacked copies (GPT-2's fused q|k|v)
    kv: bool = False  # moved by the kv-head permutation the query-head one implies


@dataclass(frozen=True)
class Modules:
    """Module paths the activation hooks need, as ``model.get_submodule`` names them."""

    layers: str
    final_norm: str
    mlp_out: str  # within a layer: the projection reading the MLP hidden units
    attn_out: str  # within a layer: the projection reading the heads' outputs


@dataclass(frozen=True)
class PermSpec:
    model_type: str
    num_layers: int
    sizes: dict[str, int]
    heads_per_kv: int
    axes: dict[str, tuple[Axis, ...]]
    modules: Modules

    def touching(self, group: str) -> list[str]:
        return [name for name, axes in self.axes.items() if any(a.group == group for a in axes)]

    def group_perm(self, axis: Axis, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        p = perms[axis.group]
        return kv_perm(p, self.heads_per_kv) if axis.kv else p

    def index(self, axis: Axis, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The full index along ``axis.dim`` that the group's permutation implies."""
        p = self.group_perm(axis, perms)
        n, u = len(p), axis.unit
        copies = torch.arange(axis.repeat)[:, None, None] * (n * u)
        return (copies + p[None, :, None] * u + torch.arange(u)[None, None, :]).flatten()

    def permute(self, name: str, tensor: torch.Tensor, perms: dict[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
        for axis in self.axes[name]:
            if axis.group != skip:
                tensor = tensor.index_select(axis.dim, self.index(axis, perms))
        return tensor


def kv_perm(p: torch.Tensor, heads_per_kv: int) -> torch.Tensor:
    """The kv-head permutation a GQA-respecting query-head permutation implies."""
    groups = p.view(-1, heads_per_kv) // heads_per_kv
    if not bool((groups == groups[:, :1]).all()):
        raise ValueError(f"head permutation {p.tolist()} moves a query head away from its kv head")
    return groups[:, 0]


def perm_spec(config: dict) -> PermSpec:
    model_type = config.get("model_type")
    if model_type in _LLAMA_LIKE:
        return _llama_spec(config)
    if model_type == "gpt2":
        return _gpt2_spec(config)
    raise UserError(f"alignment supports model_type {', '.join(SUPPORTED)}; this model is {model_type!r}")


def _llama_spec(config: dict) -> PermSpec:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    sizes = {RESIDUAL: hidden}
    r = Axis(RESIDUAL, 0)
    axes = {"model.embed_tokens.weight": (Axis(RESIDUAL, 1),), "model.norm.weight": (r,), "lm_head.weight": (Axis(RESIDUAL, 1),)}
    for i in range(layers):
        p, mlp, att = f"model.layers.{i}.", f"mlp.{i}", f"heads.{i}"
        sizes[mlp], sizes[att] = config["intermediate_size"], heads
        q, kv = Axis(att, 0, unit=head_dim), Axis(att, 0, unit=head_dim, kv=True)
        axes.update({
            p + "input_layernorm.weight": (r,),
            p + "post_attention_layernorm.weight": (r,),
            p + "self_attn.q_proj.weight": (q, Axis(RESIDUAL, 1)),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, Axis(RESIDUAL, 1)),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, Axis(RESIDUAL, 1)),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (r, Axis(att, 1, unit=head_dim)),
            p + "self_attn.o_proj.bias": (r,),
            p + "mlp.gate_proj.weight": (Axis(mlp, 0), Axis(RESIDUAL, 1)),
            p + "mlp.gate_proj.bias": (Axis(mlp, 0),),
            p + "mlp.up_proj.weight": (Axis(mlp, 0), Axis(RESIDUAL, 1)),
            p + "mlp.up_proj.bias": (Axis(mlp, 0),),
            p + "mlp.down_proj.weight": (r, Axis(mlp, 1)),
            p + "mlp.down_proj.bias": (r,),
        })
    modules = Modules("model.layers", "model.norm", "mlp.down_proj", "self_attn.o_proj")
    return PermSpec(config["model_type"], layers, sizes, heads // kv_heads, axes, modules)


def _gpt2_spec(config: dict) -> PermSpec:
    hidden, layers, heads = config["n_embd"], config["n_layer"], config["n_head"]
    head_dim = hidden // heads
    sizes = {RESIDUAL: hidden}
    r = Axis(RESIDUAL, 0)
    axes = {"transformer.wte.weight": (Axis(RESIDUAL, 1),), "transformer.wpe.weight": (Axis(RESIDUAL, 1),),
            "transformer.ln_f.weight": (r,), "transformer.ln_f.bias": (r,), "lm_head.weight": (Axis(RESIDUAL, 1),)}
    for i in range(layers):
        p, mlp, att = f"transformer.h.{i}.", f"mlp.{i}", f"heads.{i}"
        sizes[mlp], sizes[att] = config.get("n_inner") or 4 * hidden, heads
        # Conv1D stores [in, out]; c_attn's out is q|k|v, each split into heads alike
        qkv = dict(unit=head_dim, repeat=3)
        axes.update({
            p + "ln_1.weight": (r,), p + "ln_1.bias": (r,), p + "ln_2.weight": (r,), p + "ln_2.bias": (r,),
            p + "attn.c_attn.weight": (r, Axis(att, 1, **qkv)),
            p + "attn.c_attn.bias": (Axis(att, 0, **qkv),),
            p + "attn.c_proj.weight": (Axis(att, 0, unit=head_dim), Axis(RESIDUAL, 1)),
            p + "attn.c_proj.bias": (r,),
            p + "mlp.c_fc.weight": (r, Axis(mlp, 1)),
            p + "mlp.c_fc.bias": (Axis(mlp, 0),),
            p + "mlp.c_proj.weight": (Axis(mlp, 0), Axis(RESIDUAL, 1)),
            p + "mlp.c_proj.bias": (r,),
        })
    modules = Modules("transformer.h", "transformer.ln_f", "mlp.c_proj", "attn.c_proj")
    return PermSpec("gpt2", layers, sizes, 1, axes, modules)


def identity_permutation(spec: PermSpec) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(config: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random symmetry of the model: every group shuffled, heads within their kv groups."""
    spec = perm_spec(config)
    perms = {}
    for group, n in spec.sizes.items():
        if group.startswith("heads."):
            r = spec.heads_per_kv
            slots = torch.randperm(n // r, generator=generator)
            perms[group] = torch.cat([s * r + torch.randperm(r, generator=generator) for s in slots])
        else:
            perms[group] = torch.randperm(n, generator=generator)
    return perms


def check_names(state: dict, spec: PermSpec) -> None:
    unknown = [name for name in state if name not in spec.axes]
    if unknown:
        raise UserError(f"tensor {unknown[0]!r} is not part of the {spec.model_type} permutation spec; only plain {', '.join(SUPPORTED)} checkpoints can be aligned")


def apply_permutation(state: dict[str, torch.Tensor], config: dict, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with ``perms`` applied; groups missing from ``perms`` stay as they are."""
    spec = perm_spec(config)
    check_names(state, spec)
    full = {**identity_permutation(spec), **perms}
    for group, p in full.items():
        if group not in spec.sizes or not torch.equal(p.sort().values, torch.arange(spec.sizes[group])):
            raise ValueError(f"{group!r}: not a permutation of this model's {group} units")
        if group.startswith("heads."):
            kv_perm(p, spec.heads_per_kv)
    return {name: spec.permute(name, t, full) for name, t in state.items()}
