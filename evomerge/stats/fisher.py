"""The diagonal Fisher information of a causal LM on the calibration texts.

F = mean over examples of (d log p(example) / d theta)^2, one gradient per example: the
square of a batch's summed gradient would add every cross term between examples, so
each example runs its own forward and backward, unpadded. An example's log-likelihood
is the sum over its positions of log p(y_t | x_<=t), the log-probability of the
sequence, so a longer text weighs as the sum of its tokens.

The targets y_t are either the data's next tokens (``labels="data"``, the empirical
Fisher) or drawn from the model's own predictive distribution at each position
(``labels="sampled"``, the true Fisher, one sample per position from a seeded
generator). "sampled" is the default: Matena & Raffel (2022) take the expectation under
the model's predictive distribution (their reference code sums over all classes,
weighted by the model's probabilities); over a vocabulary at every position that sum
is out of reach, and one sample is its unbiased estimate. The empirical Fisher instead
measures how far the model is from the data, which is not the curvature the merge
weighs by.

Squares accumulate in float32: every term is non-negative, so the relative rounding
error stays below examples * 2**-24.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LABELS = ("sampled", "data")


def compute_fisher(model: nn.Module, batches: list[dict[str, Tensor]], labels: str = "sampled",
                   seed: int = 0, names: dict[str, str] | None = None) -> tuple[dict[str, Tensor], int]:
    """Fisher diagonals by parameter name, and the number of examples they average.

    ``names`` maps a parameter's module name to the name to store it under (a tied
    parameter is one tensor with several names; pass the one the model files use).
    Examples shorter than two tokens predict nothing and are left out of the mean."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = [p for _, p in params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    gen = torch.Generator(device=tensors[0].device).manual_seed(seed)
    examples = 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seq = ids[mask.bool()].to(tensors[0].device)
            if seq.numel() < 2:
                continue
            grads = torch.autograd.grad(_log_likelihood(model, seq, labels, gen), tensors, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.addcmul_(g, g)
            examples += 1
    out = {}
    for (name, _), a in zip(params, acc):
        out[(names or {}).get(name, name)] = a.div_(max(examples, 1))
    return out, examples


def _log_likelihood(model: nn.Module, seq: Tensor, labels: str, gen: torch.Generator) -> Tensor:
    logits = model(input_ids=seq[None], use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    if labels == "data":
        targets = seq[1:]
    else:
        with torch.no_grad():
            targets = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
    return logp.gather(1, targets[:, None]).sum()

