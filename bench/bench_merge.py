"""Whole-merge memory and speed on a ~220M-parameter bf16 Llama family (issue: merge engine).

Builds base + 2 fine-tunes (hidden 1024, 12 layers, intermediate 2816, vocab 32000) as real
safetensors dirs, then runs `evomerge merge` in a fresh child process for a linear and a TIES
recipe, taking turns (so load from other processes hits both alike), and prints each one's
best wall time and peak RSS, the TIES/linear time ratio (target <= 1.5; mergekit's argsort
TIES takes ~5x) and the peak RSS (target < 1.5 GB).

    python bench/bench_merge.py [--dir /tmp/evomerge_bench] [--layers 12] [--threads 2] [--repeats 5]
        [--methods model_stock karcher nearswap]   # more methods, each against linear (target <= 2x)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file


def make_family(root: Path, layers: int) -> dict[str, Path]:
    h, inter, vocab = 1024, 2816, 32000
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False}
    out = {}
    gen = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16) for n, s in shapes.items()}
    for name in ("base", "a", "b"):
        d = root / name
        out[name] = d
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        tensors = base if name == "base" else {n: (t.float() + 0.002 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16) for n, t in base.items()}
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
        (d / "tokenizer.json").write_text("{}")
    return out


def run_merge(recipe: Path, out: Path, threads: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of one `evomerge merge` child process,
    timed from the call (the interpreter's start-up and imports are the same for both)."""
    code = ("import resource, sys, time; from evomerge.cli import main; import torch; "
            f"torch.set_num_threads({threads}); t=time.perf_counter(); c=time.process_time(); "
            f"rc=main(['merge', '{recipe}', '{out}', '--force', '--quiet']); "
            "print(time.perf_counter()-t, time.process_time()-c, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall, cpu, rss_kb = res.stdout.split()[-3:]
    return float(wall), float(cpu), int(rss_kb) / 1e6


# mergekit's newer methods over the same family (two fine-tunes, and the base where one is needed)
MORE = {
    "model_stock": lambda fam: {"merge_method": "model_stock", "base_model": str(fam["base"]),
                                "models": [{"model": str(fam[m])} for m in ("a", "b")]},
    "karcher": lambda fam: {"merge_method": "karcher", "models": [{"model": str(fam[m])} for m in ("base", "a", "b")]},
    "nearswap": lambda fam: {"merge_method": "nearswap", "base_model": str(fam["base"]), "models": [{"model": str(fam["a"])}],
                             "parameters": {"t": 0.001}},
    "della": lambda fam: _two(fam, "della", {"weight": 0.5, "density": 0.5}),
    "della_linear": lambda fam: _two(fam, "della_linear", {"weight": 0.5, "density": 0.5}),
    "sce": lambda fam: _two(fam, "sce", None, {"select_topk": 0.5}),
    "nuslerp": lambda fam: _two(fam, "nuslerp", {"weight": 0.5}),
    "multislerp": lambda fam: _two(fam, "multislerp", {"weight": 0.5}),
    "arcee_fusion": lambda fam: {"merge_method": "arcee_fusion", "base_model": str(fam["base"]), "models": [{"model": str(fam["a"])}]},
    "ram": lambda fam: _two(fam, "ram", None),
    "ramplus_tl": lambda fam: _two(fam, "ramplus_tl", None),
}


def _two(fam: dict, method: str, per_model: dict | None, params: dict | None = None) -> dict:
    """``method`` over the two fine-tunes and their base."""
    models = [{"model": str(fam[m]), **({"parameters": per_model} if per_model else {})} for m in ("a", "b")]
    return {"merge_method": method, "base_model": str(fam["base"]), "models": models, **({"parameters": params} if params else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/evomerge_bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each merge (1 steadies timings on a busy machine)")
    ap.add_argument("--repeats", type=int, default=5, help="child processes per recipe; the best counts")
    ap.add_argument("--methods", nargs="*", default=[], choices=sorted(MORE), help="also time these, each against linear")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.build_only:
        make_family(root, args.layers)
        return
    # Build in a child: a child's ru_maxrss starts from the RSS of the process that forked it,
    # so this process must never hold the family's tensors.
    subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(root), "--layers", str(args.layers)], check=True)
    fam = {name: root / name for name in ("base", "a", "b")}
    recipes = {
        "linear": {"merge_method": "linear", "models": [{"model": str(fam[m]), "parameters": {"weight": 1.0}} for m in ("base", "a", "b")]},
        "ties": {"merge_method": "ties", "base_model": str(fam["base"]),
                 "models": [{"model": str(fam[m]), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("a", "b")]},
    }
    recipes |= {name: MORE[name](fam) for name in args.methods}
    for name, data in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    runs = {name: [] for name in recipes}
    for _ in range(args.repeats):
        for name in recipes:
            runs[name].append(run_merge(root / f"{name}.yaml", root / f"out_{name}", args.threads))
    wall = {name: min(r[0] for r in rs) for name, rs in runs.items()}
    cpu = {name: min(r[1] for r in rs) for name, rs in runs.items()}
    rss = {name: max(r[2] for r in rs) for name, rs in runs.items()}
    for name in recipes:
        all_walls = " ".join(f"{r[0]:.2f}" for r in runs[name])
        print(f"{name:7s} wall {wall[name]:6.2f} s   CPU {cpu[name]:6.2f} s   peak RSS {rss[name]:.2f} GB   (walls: {all_walls})")
    print(f"ties/linear time ratio: {wall['ties'] / wall['linear']:.2f} wall, {cpu['ties'] / cpu['linear']:.2f} CPU (target <= 1.5)")
    print(f"max peak RSS: {max(rss.values()):.2f} GB (target < 1.5)")
    for name in args.methods:
        print(f"{name}/linear time ratio: {wall[name] / wall['linear']:.2f} wall, {cpu[name] / cpu['linear']:.2f} CPU (target <= 2)")


if __name__ == "__main__":
    main()
