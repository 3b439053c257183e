"""Joint activation statistics of two models on the same calibration tokens.

Each permutation group is observed at its sites: the residual stream at every
block's input, the final norm's input and its output; a layer's MLP hidden units
at the input of the projection that reads them; a layer's heads at the input of
the attention output projection. Per site only the moments of the two models'
concatenated features are kept, so memory does not grow with the data.
"""

from __future__ import annotations

import torch

from .permspec import RESIDUAL, PermSpec


class Moments:
    """Running sums for the correlation of features observed on the same tokens."""

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        z = z.double()
        if self.sum is None:
            self.sum, self.outer = z.sum(0), z.T @ z
        else:
            self.sum += z.sum(0)
            self.outer += z.T @ z
        self.count += len(z)

    def correlation(self) -> torch.Tensor:
        mean = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        std = cov.diagonal().clamp(min=0).sqrt()
        # a constant feature correlates with nothing, rather than dividing by zero
        return (cov / torch.outer(std, std).clamp(min=1e-12)).nan_to_num()


def build_model(state: dict[str, torch.Tensor], config: dict):
    """A float32 eval-mode transformers model holding ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rest = {k: v for k, v in config.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **rest), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = model.config.tie_word_embeddings
    if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
        raise ValueError(f"state does not fit the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _sites(model, spec: PermSpec) -> dict[str, list[tuple[torch.nn.Module, bool]]]:
    """Per group: (module, whether to read its output rather than its input)."""
    m = spec.modules
    layers = model.get_submodule(m.layers)
    norm = model.get_submodule(m.final_norm)
    sites = {RESIDUAL: [(layer, False) for layer in layers] + [(norm, False), (norm, True)]}
    for i, layer in enumerate(layers):
        sites[f"mlp.{i}"] = [(layer.get_submodule(m.mlp_out), False)]
        sites[f"heads.{i}"] = [(layer.get_submodule(m.attn_out), False)]
    return sites


def _features(model, spec: PermSpec, batch: dict, groups) -> dict[str, list[torch.Tensor]]:
    mask = batch["attention_mask"].bool()
    found: dict[str, list[torch.Tensor]] = {}
    handles = []

    def keep(group, x):
        x = x[0] if isinstance(x, tuple) else x
        found.setdefault(group, []).append(x[mask])

    for group, sites in _sites(model, spec).items():
        if group not in groups:
            continue
        for module, output in sites:
            if output:
                handles.append(module.register_forward_hook(lambda _m, _a, out, g=group: keep(g, out)))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, args, g=group: keep(g, args[0])))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return found


def joint_moments(state_a, state_b, config: dict, spec: PermSpec, batches: list[dict], groups=None) -> dict[str, list[Moments]]:
    """Per group, per site: moments of [features of a, features of b] over the unmasked tokens."""
    if not batches:
        raise ValueError("activation statistics need at least one calibration batch")
    groups = set(spec.sizes if groups is None else groups)
    models = build_model(state_a, config), build_model(state_b, config)
    moments: dict[str, list[Moments]] = {}
    for batch in batches:
        fa, fb = (_features(m, spec, batch, groups) for m in models)
        for group, sites in fa.items():
            slots = moments.setdefault(group, [Moments() for _ in sites])
            for slot, xa, xb in zip(slots, sites, fb[group]):
                slot.add(torch.cat([xa, xb], dim=-1))
    return moments
