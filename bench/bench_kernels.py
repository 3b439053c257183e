"""Merge-kernel speed: TIES (and DARE-TIES) against linear on a ~220M-parameter model.

    python bench/bench_kernels.py                      # CPU, 12 layers (~220M params)
    python bench/bench_kernels.py --layers 2           # quicker
    python bench/bench_kernels.py --device cuda

Base + 2 sources, bf16, Llama shapes (hidden 1024, intermediate 2816, vocab 32000).
Each figure is the best of --repeats full passes over every tensor, one kernel call per
tensor, the variants taking turns. Linear averages all three models, so it reads the same bytes as TIES. Printed:

  ties (sorted_abs)  the search path: each source's sorted |delta| precomputed once per
                     worker (its one-time cost is printed too), thresholds read off it
  ties (select)      a cold merge: exact O(n) selection of the threshold per call
  dare_ties          random masks from the counter-based hash (on the CPU drawn once per
                     tensor and packed to bits)
  mergekit-style     argsort per tensor and unfused ops in the input dtype (written here
                     after mergekit 0.1.x's algorithm, as the baseline to beat)

The first call of each variant (warm-up) is excluded and reported as "first call". The
issue's one-shot target (TIES <= 1.5x linear, whole merges from disk) is bench_merge.py's.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the evomerge CLI runs (see evomerge/cli.py)

import torch  # noqa: E402

from evomerge.merge import sparsify  # noqa: E402
from evomerge.merge.kernels import get_kernel  # noqa: E402
from evomerge.merge.task_vector import SORTED_ABS  # noqa: E402


def llama_shapes(layers: int, hidden: int = 1024, intermediate: int = 2816, vocab: int = 32000) -> list[tuple]:
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate), (hidden,), (hidden,)]
    return [(vocab, hidden), (vocab, hidden), (hidden,)] + per_layer * layers


def make_models(shapes: list[tuple], device: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    generator = torch.Generator(device=device).manual_seed(0)
    base, sources = [], [[], []]
    for shape in shapes:
        b = torch.randn(shape, generator=generator, device=device) * 0.02
        base.append(b.bfloat16())
        for source in sources:
            source.append((b + torch.randn(shape, generator=generator, device=device) * 0.002).bfloat16())
    return base, sources


def one_pass(step: Callable[[int], torch.Tensor], n_tensors: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for j in range(n_tensors):
        step(j)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mergekit_style_ties(tensors: list[torch.Tensor], base: torch.Tensor, weights: list[float], density: float):
    """TIES the way mergekit 0.1.x computes it: argsort per delta, masks by scatter,
    stacked unfused ops in the models' dtype."""
    deltas = []
    for x in tensors:
        delta = x - base
        k = int(density * delta.numel())
        magnitudes = delta.abs().view(-1)
        if magnitudes.device.type == "cpu":
            magnitudes = magnitudes.float()
        mask = torch.zeros_like(delta)
        mask.view(-1)[torch.argsort(magnitudes, descending=True)[:k]] = 1
        deltas.append(delta * mask)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * base.dim())
    weighted = stacked * w
    signs = weighted.sign()
    majority = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = signs == majority
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + mixed / divisor).to(base.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = llama_shapes(args.layers)
    base, (a, b) = make_models(shapes, args.device)
    n = len(shapes)
    params = sum(t.numel() for t in base)
    print(f"{params / 1e6:.0f}M params x 3 models, bf16, {n} tensors, device={args.device}, "
          f"threads={torch.get_num_threads()}, density={args.density}")

    linear, ties, dare_ties = get_kernel("linear"), get_kernel("ties"), get_kernel("dare_ties")
    thirds = [{"weight": 1 / 3}] * 3
    per_model = [{"weight": 0.5, "density": args.density}, {"weight": 0.5, "density": args.density}]
    start = time.perf_counter()
    sorted_abs = [[sparsify.sorted_abs_delta(s[j], base[j]) for j in range(n)] for s in (a, b)]
    precompute = time.perf_counter() - start
    with_sorted = [[dict(mp, **{SORTED_ABS: sorted_abs[i][j]}) for i, mp in enumerate(per_model)] for j in range(n)]

    steps = {
        "linear": lambda j: linear.fn([base[j], a[j], b[j]], None, thirds, {}),
        "ties (sorted_abs)": lambda j: ties.fn([a[j], b[j]], base[j], with_sorted[j], {}),
        "ties (select)": lambda j: ties.fn([a[j], b[j]], base[j], per_model, {}),
        "dare_ties": lambda j: dare_ties.fn([a[j], b[j]], base[j], per_model, {}, seed=j),
        "mergekit-style ties": lambda j: mergekit_style_ties([a[j], b[j]], base[j], [0.5, 0.5], args.density),
    }
    biggest = max(range(n), key=lambda j: base[j].numel())
    for name in ["linear", "ties (sorted_abs)", "ties (select)", "dare_ties"]:
        start = time.perf_counter()
        steps[name](biggest)  # warm-up: allocator, lazy initialization
        print(f"{name:22s} first call {time.perf_counter() - start:6.2f} s")
    # Rounds interleave the variants so that load from other processes hits them alike.
    seconds = {name: float("inf") for name in steps}
    for round_ in range(args.repeats):
        for name, step in steps.items():
            if round_ == 0 or name != "mergekit-style ties":  # too slow to repeat
                seconds[name] = min(seconds[name], one_pass(step, n, args.device))
    for name in steps:
        print(f"{name:22s} {seconds[name]:8.3f} s per pass (best of {1 if 'mergekit' in name else args.repeats})")
    print(f"sorted_abs precompute  {precompute:8.3f} s   (once per worker, all tensors of both sources)")
    for name in steps:
        if name != "linear":
            print(f"{name}/linear ratio: {seconds[name] / seconds['linear']:.2f}")


if __name__ == "__main__":
    main()
