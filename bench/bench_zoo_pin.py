"""What the zoo's pin does: default-shape training steps under MKL's COMPATIBLE branch (the
earlier pin), its AVX2 branch in STRICT mode alone (which MKL drops on non-Intel CPUs) and
with the vendor shim (the pin: PINNED_ENV and evomerge/zoo/mkl_branch.py).

    python bench/bench_zoo_pin.py [--steps 60] [--threads 2]

Each setting runs in a child process started with its environment (MKL reads it at load),
the same model, data and seed; prints ms per step, the ratio to the earlier pin, the branch
MKL reports, and a hash of the weights after the steps (equal hashes: the same arithmetic;
compare them across machines).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# name -> (MKL_CBWR, with the vendor shim)
SETTINGS = {"MKL COMPATIBLE (earlier pin)": ("COMPATIBLE", False), "MKL AVX2,STRICT alone": ("AVX2,STRICT", False),
            "MKL AVX2,STRICT + vendor shim (the pin)": ("AVX2,STRICT", True)}


def child(steps: int, threads: int) -> None:
    import hashlib
    import time
    from dataclasses import replace

    import numpy as np
    import torch

    from evomerge.zoo.build import PRESETS
    from evomerge.zoo.mkl_branch import active_branch
    from evomerge.zoo.data import BASE_MIXTURE
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import init_model, make_config, train

    torch.set_num_threads(threads)
    settings = PRESETS["default"]
    tok = build_tokenizer()
    model = init_model(make_config(settings.shape, tok), 0)
    schedule = replace(settings.base, steps=steps)
    started = time.perf_counter()
    train(model, tok, BASE_MIXTURE, schedule, np.random.default_rng(0), "bench", progress=False)
    took = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
    print(f"{took / steps * 1000:.1f} {digest} {active_branch()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps, args.threads)
    from evomerge.zoo.build import PINNED_ENV
    from evomerge.zoo.mkl_branch import cpu_vendor, vendor_shim
    from evomerge.zoo.smollm2 import cache_root

    rows = {}
    for name, (branch, shim) in SETTINGS.items():
        env = {**os.environ, **PINNED_ENV, "MKL_CBWR": branch, "OMP_NUM_THREADS": str(args.threads)}
        if shim:
            lib = vendor_shim(cache_root())
            if lib is None:
                print(f"{name}: skipped, no C compiler to build the shim with")
                continue
            env["LD_PRELOAD"] = str(lib)
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--threads", str(args.threads)],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        rows[name] = (float(out[0]), out[1], out[2])
    base = next(iter(rows.values()))[0]
    print(f"CPU vendor {cpu_vendor() or 'unknown'}")
    print(f"| setting ({args.steps} default-shape steps, {args.threads} threads) | ms per step | ratio | MKL branch | weights |")
    print("|---|---|---|---|---|")
    for name, (ms, digest, mkl) in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {mkl} | {digest} |")


if __name__ == "__main__":
    main()
