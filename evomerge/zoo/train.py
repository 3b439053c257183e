"""The zoo's model shape and training loop (AdamW, linear warm-up, cosine decay, CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from evomerge.progress import progress_bar
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.data import Component, sample_batch


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 128
    layers: int = 4
    intermediate: int = 384
    heads: int = 4


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int
    batch_size: int
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    sam_rho: float = 0.0  # > 0: sharpness-aware steps (Foret et al., 2021), see sam_gradient


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave torch's choice), then restore."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_config(shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    # transformers initialises from the global torch RNG; fork it so the seed stays local.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """BOS + text + EOS, right-padded; padding is masked out of attention and loss."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(texts))["input_ids"]]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_optimizer(model: LlamaForCausalLM, schedule: Schedule) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), schedule.lr, schedule.weight_decay
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {schedule.optimizer!r}; use 'adamw' or 'sgd'")


def constant_lr(step: int, schedule: Schedule) -> float:
    """Warm-up, then constant: the schedule SWA averages the iterates of."""
    return min(1.0, (step + 1) / schedule.warmup)


def lr_factor(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sam_gradient(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], rho: float) -> None:
    """Replace the gradients in ``model`` (taken at its weights w) by those at w + rho * g / |g|,
    the worst nearby point to first order; the weights are left exactly as they were.

    A step with these gradients seeks a minimum that is flat within rho, so a fine-tune
    trained with them keeps its skill when other task vectors are added to it: merges of
    such fine-tunes interfere less (Lee et al., ICLR 2025, on SAM fine-tuning for merging)."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.add_(p.grad, alpha=float(rho / (norm + 1e-12)))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    mixture: Sequence[tuple[Component, float]],
    schedule: Schedule,
    rng: np.random.Generator,
    desc: str,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    lr_shape: Callable[[int, Schedule], float] | None = None,
    position: int = 0,
) -> list[float]:
    """Train in place; ``on_step(k)`` runs after the k-th step (1-based). Returns the losses.

    ``lr_shape(step, schedule)``: the learning-rate factor (default: warm-up, cosine decay).
    ``position``: the progress bar's line, for runs side by side in one terminal."""
    model.train()
    opt = make_optimizer(model, schedule)
    shape = lr_shape or lr_factor
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: shape(s, schedule))
    losses: list[float] = []
    bar = progress_bar(range(1, schedule.steps + 1), desc=desc, disable=not progress, position=position)
    for step in bar:
        batch = encode(tokenizer, sample_batch(rng, mixture, schedule.batch_size))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.sam_rho > 0:
            sam_gradient(model, batch, schedule.sam_rho)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses
