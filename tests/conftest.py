"""Tiny real models, made in fixtures: Llama, Qwen2 and GPT-2 families.

Each family is a random base plus fine-tunes (base + small random deltas), saved
as ordinary HF directories with safetensors weights and a tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")  # library bars; ours pass disable= explicitly
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights"

VOCAB = 48


def tiny_config(arch: str, layers: int = 3):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1)
    raise ValueError(arch)


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)


def make_model(path: Path, arch: str = "llama", seed: int = 0, base: Path | None = None, delta: float = 0.02,
               layers: int = 3, dtype: torch.dtype = torch.float32) -> Path:
    """A random model, or a 'fine-tune' of ``base`` (base + delta * noise)."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(delta * torch.randn(p.shape, generator=gen))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, layers))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                    # O(1) hidden states, as in real models: the norms' epsilon stays negligible
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """Per architecture: {'base', 'a', 'b'} model dirs."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for i, arch in enumerate(("llama", "qwen2", "gpt2")):
        base = make_model(root / f"{arch}_base", arch, seed=10 * i)
        out[arch] = {
            "base": base,
            "a": make_model(root / f"{arch}_a", arch, seed=10 * i + 1, base=base),
            "b": make_model(root / f"{arch}_b", arch, seed=10 * i + 2, base=base),
        }
    return out


def write_yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The zoo's tiny preset (seconds): real char-level Llamas with the zoo's tasks, not trained to skill."""
    from evomerge.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", preset="tiny", progress=False)


def zoo_skills(zoo: Path) -> list[str]:
    """The zoo's specialists, as its manifest names them (their tasks are <skill>_search/_test)."""
    import json

    return [name for name in json.loads((zoo / "zoo.json").read_text())["models"] if name != "base"]


def search_config(zoo: Path, path: Path, **over) -> Path:
    """A small search config over the tiny zoo's first two specialists; ``over`` replaces top-level sections."""
    a, b = zoo_skills(zoo)[:2]
    data = {
        "base_model": str(zoo / "base"),
        "models": [str(zoo / a), str(zoo / b)],
        "ps": {"method": "task_arithmetic", "layer_granularity": 2},
        "fitness": {"tasks": [{"task": f"{a}_search", "metric": "logprob"}, {"task": f"{b}_search", "metric": "logprob"}], "limit": 6},
        "test": [{"task": f"{a}_test"}, {"task": f"{b}_test"}],
        "optimizer": {"popsize": 4, "max_evals": 12, "seed": 0},
        "workers": {"count": 0},
    }
    data.update(over)
    return write_yaml(path, data)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a bf16 HF dir (a real pretrained Llama), converted once into the evomerge cache."""
    from evomerge.zoo.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_family(smollm2):
    """{'base', 'ft_all', 'ft_mlp', 'ft_attn'}: SmolLM2 and seeded bf16 "fine-tunes", kept in the cache beside it."""
    from evomerge.zoo.smollm2 import smollm2_family as build

    return build(smollm2.parent / "smollm2-family", cache_dir=smollm2.parent)


@pytest.fixture(scope="session")
def mergekit_yaml():
    """mergekit 0.1.5's `mergekit-yaml`, in its own venv (tests/mergekit_env.py builds it when missing)."""
    from mergekit_env import MergekitUnavailable, ensure_mergekit

    try:
        return ensure_mergekit()
    except MergekitUnavailable as e:
        pytest.fail(str(e), pytrace=False)


def lm_eval_cli(model_args: str, tasks: list[str], out: Path, *extra: str) -> dict:
    """The stock `lm_eval` CLI on the shipped tasks (offline, on the CPU): its ``results`` section."""
    import json
    import subprocess
    import sys

    from evomerge.fitness.evaluator import default_task_path

    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--device", "cpu", *extra,
           "--model_args", model_args, "--tasks", ",".join(tasks),
           "--include_path", str(default_task_path()), "--output_path", str(out / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (out / "out").rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args: str, env: dict | None = None) -> Ran:
    """`evomerge ARGS` in this process (no interpreter start-up per call): its exit code and output."""
    import contextlib
    import io

    from evomerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Ran(code, out.getvalue(), err.getvalue())
