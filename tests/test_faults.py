"""Faults around a search: workers that cannot start, candidates that are the user's error,
another Ray cluster on the machine, a damaged history."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.errors import UserError
from evomerge.run.rundir import RunDir

from conftest import search_config, write_yaml, zoo_skills


def _copy_zoo(zoo: Path, out: Path) -> Path:
    shutil.copytree(zoo, out, ignore=shutil.ignore_patterns("*_ckpt"))
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_nan_source_is_one_line_and_the_pool_is_closed(tiny_zoo, tmp_path, capsys, workers):
    import ray

    zoo = _copy_zoo(tiny_zoo, tmp_path / "zoo")
    bad = zoo / zoo_skills(zoo)[1] / "model.safetensors"
    tensors = load_file(bad)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, bad, metadata={"format": "pt"})
    cfg = search_config(zoo, tmp_path / "c.yaml", workers={"count": workers})
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert "NaN" in line and "model.norm.weight" in line, line
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_broken_tokenizer_on_ray_workers_is_one_line(tiny_zoo, tmp_path, capsys):
    import ray

    zoo = _copy_zoo(tiny_zoo, tmp_path / "zoo")
    (zoo / "base" / "tokenizer.json").write_text("{not json")
    cfg = search_config(zoo, tmp_path / "c.yaml", workers={"count": 2})
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert "could not load the models" in line, line
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_a_candidates_user_error_is_recorded_and_the_search_goes_on(tiny_zoo, tmp_path):
    """linear weights from [-1e-6, 1e-6], which recipes write to 6 decimals: -1e-6, 0 or 1e-6.
    Where the two sum to 0 the kernel refuses to normalize (a UserError of that candidate
    alone); the others normalize to a real merge and score."""
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml",
                        ps={"method": "linear", "tune": {"weight": [-1e-6, 1e-6]}, "layer_granularity": 0},
                        optimizer={"popsize": 8, "max_evals": 16, "seed": 0, "sigma0": 0.3})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    failed = [e for e in hist if e["error"]]
    assert len(hist) == 16 and failed and len(failed) < 16
    assert all("sum to zero" in e["error"] and e["fitness"] is None for e in failed)
    assert "running it again" not in (run / "search.log").read_text()  # a user error is not retried


def test_history_torn_last_line_dropped_alone_bad_middle_line_reported(tmp_path):
    rd = RunDir(tmp_path)
    good = [json.dumps({"eval_id": i}) + "\n" for i in range(3)]
    rd.history.write_text("".join(good) + '{"eval_id": 3, "fit')
    assert [e["eval_id"] for e in rd.read_history()] == [0, 1, 2]
    assert rd.history.read_text() == "".join(good)  # the torn tail is cut, nothing else
    rd.history.write_text(good[0] + '{"eval_id": 1, "fit\n' + good[2])
    with pytest.raises(UserError, match="line 2"):
        rd.read_history()
    assert rd.history.read_text() == good[0] + '{"eval_id": 1, "fit\n' + good[2]  # left as it was


def test_resume_with_a_damaged_history_is_one_line(tiny_zoo, tmp_path, capsys):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 4})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    lines = (run / "history.jsonl").read_text().splitlines(keepends=True)
    (run / "history.jsonl").write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    capsys.readouterr()
    assert main(["resume", str(run), "--quiet"]) == 2
    assert "line 2" in _one_line_error(capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_starts_its_own_ray_beside_a_running_cluster(tiny_zoo, tmp_path):
    """`ray start --head` on this machine (loopback), its address in RAY_ADDRESS and in Ray's
    address file: a search without --ray-address still runs on a private local Ray."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
        deadline = time.time() + 60
        while not address_file.exists() and time.time() < deadline and head.poll() is None:
            time.sleep(0.2)
        assert address_file.exists(), "ray start --head did not come up"
        cfg = search_config(tiny_zoo, tmp_path / "c.yaml", workers={"count": 1},
                            optimizer={"popsize": 4, "max_evals": 4})
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(tmp_path / "run"),
                               "--quiet"], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 4
    finally:
        head.terminate()  # with --block, `ray start` stops the processes it started, and only those
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_compute_dtype_is_float32_on_cpu_for_bf16_sources(tiny_zoo, tmp_path):
    """bf16 sources are scored in float32 on a CPU (same values, no slow bf16 matmuls)."""
    from evomerge.workers.resident import ResidentModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base", dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    r = ResidentModel(str(tmp_path / "bf16"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert r.dtype(name) == torch.bfloat16 and r.get(name).dtype == torch.float32
    assert torch.equal(r.get(name), load_file(tmp_path / "bf16" / "model.safetensors")[name].float())
    assert ResidentModel(str(tmp_path / "bf16"), compute="bfloat16").get(name).dtype == torch.bfloat16


def test_a_plan_every_candidate_shares_fails_before_anything_starts(family, tmp_path, capsys):
    """A tied base with a fine-tune that has its own head is refused by the planner; a search
    over them says so up front, one line, before a worker starts or the run dir exists."""
    from transformers import AutoModelForCausalLM

    f = family["llama"]
    model = AutoModelForCausalLM.from_pretrained(f["base"])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied_base")
    shutil.copy(f["base"] / "tokenizer.json", tmp_path / "tied_base" / "tokenizer.json")
    cfg = write_yaml(tmp_path / "c.yaml", {
        "base_model": str(tmp_path / "tied_base"), "models": [str(f["a"]), str(f["b"])],
        "ps": {"method": "task_arithmetic"}, "fitness": {"tasks": [{"task": "mir_search"}]}, "workers": {"count": 2}})
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "ties its output head" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()
