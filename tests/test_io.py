"""Model I/O: lazy safetensors reads, corrupt files, layer discovery, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.io.model_dir import ModelDir
from evomerge.io.safetensors_file import StreamingWriter, read_header, read_tensor
from evomerge.io.writer import atomic_dir, shard_layout

from conftest import make_model


def test_reads_equal_safetensors_library(family):
    for arch in ("llama", "qwen2", "gpt2"):
        m = ModelDir(family[arch]["a"])
        ref = load_file(family[arch]["a"] / "model.safetensors")
        assert set(m.entries) == set(ref)
        for name, t in ref.items():
            assert torch.equal(m.get(name), t)


def test_layer_discovery(family):
    expect = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
    for arch, prefix in expect.items():
        a = ModelDir(family[arch]["base"]).arch
        assert (a.layer_prefix, a.num_layers, a.vocab_size) == (prefix, 3, 48)
        assert a.split(f"{prefix}.2.mlp.x.weight") == (2, "mlp.x.weight")
        assert a.split("lm_head.weight") is None


def test_streaming_writer_roundtrip(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0)}
    with StreamingWriter(tmp_path / "x.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    back = load_file(tmp_path / "x.safetensors")
    for n, t in tensors.items():
        assert torch.equal(back[n], t)
    entries, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and torch.equal(read_tensor(entries["b"]), tensors["b"])


def test_sharded_dir_is_read(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_model(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = ModelDir(src), ModelDir(tmp_path / "sharded")
    for name in a.entries:
        assert torch.equal(a.get(name), b.get(name))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("header", "corrupt safetensors header"),
    ("short", "not a safetensors file"),
])
def test_corrupt_files_refused(tmp_path, damage, message):
    d = make_model(tmp_path / "m", "llama")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) - 100])
    elif damage == "header":
        f.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        f.write_bytes(raw[:5])
    with pytest.raises(UserError, match=message):
        ModelDir(d)


def test_pickles_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="never unpickles"):
        ModelDir(d)


def test_a_peft_adapter_is_not_read_as_a_model(family, tmp_path):
    """An adapter dir, even one that carries its base's config.json, holds low-rank factors in
    adapter_model.safetensors: refused with what to do, never merged as if they were weights."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(family["llama"]["base"] / "config.json", d / "config.json")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
              d / "adapter_model.safetensors")
    with pytest.raises(UserError, match="PEFT adapter.*merge_and_unload"):
        ModelDir(d)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        ModelDir(tmp_path / "empty")


def test_layer_count_mismatch_refused(tmp_path):
    d = make_model(tmp_path / "m", "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="says 5 layers"):
        ModelDir(d)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_nonempty_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="--force"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_shard_layout():
    assert shard_layout([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]


@pytest.mark.parametrize("numel", [1000, (1 << 20) + 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_has_nonfinite(dtype, numel):
    from evomerge.io.safetensors_file import has_nonfinite

    t = torch.randn(numel).to(dtype) * 100
    assert not has_nonfinite(t)
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        for where in (0, 517, numel - 1):
            u = t.clone()
            u[where] = bad
            assert has_nonfinite(u), (bad, where)
    assert not has_nonfinite(torch.arange(5))
    assert not has_nonfinite(torch.empty(0, dtype=dtype))


def test_lora_adapters_refused_where_they_cannot_be_merged_exactly(tmp_path):
    from evomerge.io.lora import LoraAdapter, split_ref

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="never unpickles"):
        LoraAdapter(d)
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_embedding_A": torch.zeros(4, 8)}, d / "adapter_model.safetensors")
    with pytest.raises(UserError, match="not a LoRA factor"):
        LoraAdapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        LoraAdapter(d)
    assert split_ref("models/a+adapters/b") == ("models/a", "adapters/b")
    assert split_ref(str(d)) == (str(d), None)
    with pytest.raises(UserError, match="one '\\+'"):
        split_ref("a+b+c")
