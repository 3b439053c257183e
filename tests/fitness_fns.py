"""Fitness functions for tests/test_fitness_fn.py, named by path (``fitness_fns:NAME``) from
tests/ as the working directory, which Ray puts on its workers' path."""

from __future__ import annotations

import torch

# prompts in the zoo's short format (evomerge/zoo/data.py): the specialists' own skills
TEXTS = ("k:abh>hga", "k:123>234", "c:qrs>qrs")


def neg_nll(model, tokenizer) -> float:
    """Minus the mean next-token NLL of TEXTS: higher is better, as the search maximizes."""
    losses = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        losses.append(float(model(input_ids=ids, labels=ids).loss))
    return -sum(losses) / len(losses)


def param_norm(model) -> float:
    """The L2 norm of every parameter, in float64 (the same bits from any thread count)."""
    return float(torch.sqrt(sum((p.double() ** 2).sum() for p in model.parameters())))


def nll_and_norm(model, tokenizer) -> dict[str, float]:
    """A dict return: the fitness and one more score, recorded beside it."""
    return {"fitness": neg_nll(model, tokenizer), "norm": param_norm(model)}
