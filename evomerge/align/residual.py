"""The residual stream's orthogonal symmetry, and the rotation that aligns two models' streams.

An RMSNorm with its gain folded into the layers that read its output (``fold_norms``:
``W <- W diag(g)``, ``g <- 1``) is ``x / rms(x)``, and ``rms(Qx) = rms(x)`` for any
orthogonal ``Q``. So rotating every residual writer's output by ``Q`` (embeddings, attention
and MLP output projections) and every reader's input by ``Q^T`` (q/k/v, gate/up, the head)
leaves the function unchanged (Ashkboos et al. 2024, SliceGPT). Permutations are the special
case ``Q = P``; two models trained from different seeds need not have streams a permutation
apart, and a rotation fitted to their activations (orthogonal Procrustes on the residual
stream's cross-moments, Zhang et al. 2025) brings them closer than any permutation can.

Covered: Llama-like models with untied embeddings (a tied head would need the embeddings'
rotation and the head's to be one). The rotation is found and applied on folded models;
the aligned model is then written with the reference's gains (``unfold_norms``), so it
pairs with the reference as it is: the linear path between the two is the folded one.
"""

from __future__ import annotations

import torch

from .activations import Moments
from .permspec import _LLAMA_LIKE


def supports(config: dict) -> bool:
    return config.get("model_type") in _LLAMA_LIKE and not config.get("tie_word_embeddings", False)


def _readers(config: dict) -> dict[str, list[str]]:
    """Each norm's gain -> the weights reading its output."""
    out = {"model.norm.weight": ["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        out[p + "post_attention_layernorm.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    return out


def fold_norms(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The same function with every RMSNorm gain folded into its readers (gains become 1)."""
    out = dict(state)
    for norm, readers in _readers(config).items():
        g = state[norm].double()
        for name in readers:
            out[name] = (state[name].double() * g[None, :]).to(state[name].dtype)
        out[norm] = torch.ones_like(state[norm])
    return out


def gains_invertible(state: dict[str, torch.Tensor], config: dict) -> bool:
    return all(bool((state[norm].abs() > 1e-12).all()) for norm in _readers(config))


def unfold_norms(state: dict[str, torch.Tensor], config: dict, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folded model written with ``like``'s gains (its readers divided by them): the same
    function, in ``like``'s parameterization, so a linear path to ``like`` is the folded path."""
    out = dict(state)
    for norm, readers in _readers(config).items():
        g = like[norm].double()
        for name in readers:
            out[name] = (state[name].double() / g[None, :]).to(state[name].dtype)
        out[norm] = like[norm].to(state[norm].dtype).clone()
    return out


def procrustes(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``Q`` maximizing ``trace(Q m)``."""
    u, _, vh = torch.linalg.svd(m.double())
    return vh.T @ u.T


def is_identity(q: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool((q - torch.eye(len(q), dtype=q.dtype)).abs().max() < tol)


def _writers(config: dict) -> list[str]:
    names = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "self_attn.o_proj.weight", p + "mlp.down_proj.weight"]
    return names


def rotate_residual(state: dict[str, torch.Tensor], config: dict, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """A folded model's stream rotated by ``q`` (new stream = q @ old stream)."""
    q = q.double()
    out = dict(state)
    for name in _writers(config):
        out[name] = (q @ state[name].double()).to(state[name].dtype)
        bias = name.replace(".weight", ".bias")
        if bias in state:
            out[bias] = (q @ state[bias].double()).to(state[bias].dtype)
    for readers in _readers(config).values():
        for name in readers:
            out[name] = (state[name].double() @ q.T).to(state[name].dtype)
    emb = "model.embed_tokens.weight"
    out[emb] = (state[emb].double() @ q.T).to(state[emb].dtype)
    return out


def residual_rotation(sites: list[Moments], hidden: int) -> torch.Tensor:
    """The orthogonal ``Q`` minimizing the summed ``E||x_a - Q x_b||^2`` over the stream's sites,
    each site weighted by its scale so that the deep layers' larger streams do not decide alone."""
    m = torch.zeros(hidden, hidden, dtype=torch.float64)
    for site in sites:
        aa, bb = site.outer[:hidden, :hidden].trace(), site.outer[hidden:, hidden:].trace()
        m += site.outer[hidden:, :hidden] / (aa * bb).sqrt().clamp(min=1e-30)  # sum of x_b x_a^T
    return procrustes(m)
