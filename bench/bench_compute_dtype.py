"""bf16 against float32 forward passes on a CPU, on the real SmolLM2-135M checkpoint (bf16 on disk).

    python bench/bench_compute_dtype.py [--threads 1] [--repeats 5] [--tasks TASKS] [--limit 32]

Prints, measured in this one run (best of --repeats, interleaved):
  1. a forward pass of a 16x16-token batch computed in bfloat16 and in float32, and their ratio
     (what scoring a bf16 source cost before workers computed in float32);
  2. `evomerge eval`'s scoring (Evaluator.score_dir, default compute dtype) of the bf16 checkpoint
     and of the same weights stored in float32, and their ratio (target <= 1.1: a bf16 source
     scores as fast as a float32 one), with the two fitness values, which must be equal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def machine() -> str:
    """CPU model and whether it has AVX-512 (bf16 matrix work is slow on CPUs without it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = "AVX-512 + AVX512_BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "no AVX-512"
    return f"{name} ({simd})"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", default="facts_search:logprob", help="evomerge eval --tasks syntax")
    ap.add_argument("--limit", type=int, default=32)
    args = ap.parse_args()

    from evomerge.fitness.env import set_offline_env, set_quiet_env

    set_offline_env()
    set_quiet_env()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM

    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import parse_terms
    from evomerge.zoo.smollm2 import ensure_smollm2

    torch.set_num_threads(args.threads)
    bf16_dir = ensure_smollm2()
    ids = torch.randint(0, 49152, (16, 16), generator=torch.Generator().manual_seed(0))
    models = {dt: AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=dt).eval() for dt in (torch.bfloat16, torch.float32)}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)  # warm-up: first-call allocations and kernel selection
        fwd = {dt: best_of(args.repeats, lambda m=m: m(input_ids=ids)) for dt, m in models.items()}

    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = Path(tmp) / "fp32"
        models[torch.float32].save_pretrained(fp32_dir)
        for f in bf16_dir.glob("tokenizer*"):
            (fp32_dir / f.name).write_bytes(f.read_bytes())
        del models
        evaluator = Evaluator(parse_terms(args.tasks), limit=args.limit)
        dirs = {"bf16 on disk": bf16_dir, "fp32 on disk": fp32_dir}
        fitness = {k: evaluator.score_dir(d).fitness for k, d in dirs.items()}  # warm-up, and the values
        score = {k: best_of(args.repeats, lambda d=d: evaluator.score_dir(d)) for k, d in dirs.items()}

    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"forward 16x16 tokens, SmolLM2-135M: bf16 {fwd[torch.bfloat16]:.3f} s, fp32 {fwd[torch.float32]:.3f} s, "
          f"bf16/fp32 = {fwd[torch.bfloat16] / fwd[torch.float32]:.2f}x")
    print(f"evomerge eval ({args.tasks}, limit {args.limit}, default compute dtype): "
          f"bf16 source {score['bf16 on disk']:.3f} s, fp32 source {score['fp32 on disk']:.3f} s, "
          f"ratio {score['bf16 on disk'] / score['fp32 on disk']:.2f}x (target <= 1.1); "
          f"fitness {fitness['bf16 on disk']:.6f} vs {fitness['fp32 on disk']:.6f}")


if __name__ == "__main__":
    main()
