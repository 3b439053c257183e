"""The attention heads' continuous symmetries, and the rotations that align them.

Permutations (``permspec``) move whole units; inside an attention head two more
symmetries leave the function unchanged, and two independently trained models use
them freely (Zhang et al. 2025, "Beyond the permutation symmetry of transformers"):

- **values/outputs**: any orthogonal ``Q`` (d x d) per kv head: ``W_v <- Q W_v`` (and its
  bias) and, for every query head reading that kv head, ``W_o[:, head] <- W_o[:, head] Q^T``.
  Attention mixes value vectors linearly, so ``Q`` passes through it.
- **queries/keys**: a 2-D rotation per RoPE frequency pair ``(i, i + d/2)``, the same for a
  kv head and its query heads. Rotations of one plane commute with RoPE's rotation of that
  plane and keep every ``q . k``; a general orthogonal map would not commute with RoPE.

``head_rotations`` finds, head by head, the ``Q`` and the angles that bring ``other``'s
weights closest to ``reference``'s (orthogonal Procrustes; for a plane rotation the angle
has a closed form). Run it after the permutations, which decide which head is which.
Covered: Llama-like models (llama, mistral, qwen2, biases included); GPT-2 keeps its
permutations only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .permspec import _LLAMA_LIKE


@dataclass(frozen=True)
class HeadRotations:
    """Per layer: ``vo[g]`` the d x d orthogonal map of kv head g, ``qk[g]`` its d/2 angles."""

    vo: dict[int, torch.Tensor]
    qk: dict[int, torch.Tensor]


def supports(config: dict) -> bool:
    return config.get("model_type") in _LLAMA_LIKE and not config.get("partial_rotary_factor", 1.0) < 1.0


def _shape(config: dict) -> tuple[int, int, int, int]:
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], heads, kv, d


def _rows(state, name: str, g: int, d: int) -> torch.Tensor | None:
    """Rows g*d:(g+1)*d of ``name`` (weight [out, in] or bias [out]) as [d, features]."""
    t = state.get(name)
    if t is None:
        return None
    block = t[g * d:(g + 1) * d].double()
    return block if block.dim() == 2 else block[:, None]


def _qk_blocks(state, p: str, g: int, r: int, d: int) -> list[torch.Tensor]:
    """kv head g's key rows and its query heads' rows (weights and biases), each [d, features]."""
    names = [(p + "self_attn.k_proj.", g)] + [(p + "self_attn.q_proj.", h) for h in range(g * r, (g + 1) * r)]
    return [b for stem, i in names for kind in ("weight", "bias") if (b := _rows(state, stem + kind, i, d)) is not None]


def head_rotations(reference, other, config: dict) -> HeadRotations:
    """The rotations of ``other``'s heads that best match ``reference``'s weights."""
    layers, heads, kv, d = _shape(config)
    r, half = heads // kv, d // 2
    vo: dict[int, torch.Tensor] = {}
    qk: dict[int, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        qs, angles = [], []
        o_ref, o_oth = reference[p + "self_attn.o_proj.weight"].double(), other[p + "self_attn.o_proj.weight"].double()
        for g in range(kv):
            # values/outputs: maximize tr(Q M), M = sum of (other rows) (reference rows)^T
            m = torch.zeros(d, d, dtype=torch.float64)
            for kind in ("weight", "bias"):
                a, b = _rows(reference, p + "self_attn.v_proj." + kind, g, d), _rows(other, p + "self_attn.v_proj." + kind, g, d)
                if a is not None:
                    m += b @ a.T
            for h in range(g * r, (g + 1) * r):
                cols = slice(h * d, (h + 1) * d)
                m += o_oth[:, cols].T @ o_ref[:, cols]
            u, _, vh = torch.linalg.svd(m)
            qs.append(vh.T @ u.T)
            # queries/keys: per plane (j, j + d/2), the angle maximizing the same trace
            a_sum = b_sum = 0.0
            for a, b in zip(_qk_blocks(reference, p, g, r, d), _qk_blocks(other, p, g, r, d)):
                aa, ab, ba, bb = a[:half], a[half:], b[:half], b[half:]
                a_sum = a_sum + (ba * aa).sum(1) + (bb * ab).sum(1)
                b_sum = b_sum + (ba * ab).sum(1) - (bb * aa).sum(1)
            angles.append(torch.atan2(b_sum, a_sum))
        vo[i], qk[i] = torch.stack(qs), torch.stack(angles)
    return HeadRotations(vo, qk)


def random_rotations(config: dict, generator: torch.Generator | None = None) -> HeadRotations:
    """A random element of the heads' continuous symmetry group (for tests)."""
    layers, _, kv, d = _shape(config)
    vo, qk = {}, {}
    for i in range(layers):
        q, rr = torch.linalg.qr(torch.randn(kv, d, d, generator=generator, dtype=torch.float64))
        vo[i] = q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))[:, None, :]
        qk[i] = (torch.rand(kv, d // 2, generator=generator, dtype=torch.float64) * 2 - 1) * torch.pi
    return HeadRotations(vo, qk)


def _turn_rows(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate rows (j, j + d/2) of a [d, ...] block by ``angles[j]``."""
    half = len(angles)
    shape = (half,) + (1,) * (t.dim() - 1)
    c, s = angles.cos().view(shape), angles.sin().view(shape)
    a, b = t[:half], t[half:]
    return torch.cat([c * a - s * b, s * a + c * b])


def rotate_heads(state: dict[str, torch.Tensor], config: dict, rots: HeadRotations) -> dict[str, torch.Tensor]:
    """A new state dict with ``rots`` applied; the function is unchanged (to rounding)."""
    layers, heads, kv, d = _shape(config)
    r = heads // kv
    out = dict(state)
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            for proj, units in (("k_proj", range(kv)), ("q_proj", range(heads)), ("v_proj", range(kv))):
                name = f"{p}{proj}.{kind}"
                if name not in state:
                    continue
                t = state[name]
                blocks = []
                for h in units:
                    g = h if proj != "q_proj" else h // r
                    block = t[h * d:(h + 1) * d].double()
                    if proj == "v_proj":
                        block = rots.vo[i][g] @ block  # a weight's rows or a bias
                    else:
                        block = _turn_rows(block, rots.qk[i][g])
                    blocks.append(block)
                out[name] = torch.cat(blocks).to(t.dtype)
        o = state[p + "o_proj.weight"]
        cols = [o[:, h * d:(h + 1) * d].double() @ rots.vo[i][h // r].T for h in range(heads)]
        out[p + "o_proj.weight"] = torch.cat(cols, dim=1).to(o.dtype)
    return out


def is_identity(rots: HeadRotations, tol: float = 1e-9) -> bool:
    eye = torch.eye(next(iter(rots.vo.values())).shape[-1], dtype=torch.float64)
    return all((q - eye).abs().max() < tol for q in rots.vo.values()) and all(a.abs().max() < tol for a in rots.qk.values())


def align_heads(reference, other, config: dict) -> dict[str, torch.Tensor]:
    """``other`` with its heads rotated onto ``reference``'s; unchanged where unsupported.

    Rotations within rounding of the identity are not applied, so a model aligned to an
    exact copy of itself comes back bit for bit."""
    if not supports(config):
        return other
    rots = head_rotations(reference, other, config)
    return other if is_identity(rots) else rotate_heads(other, config, rots)
