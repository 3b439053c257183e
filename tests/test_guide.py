"""docs/guide.md runs as written: its bash blocks in order (the cluster section against a real
local Ray cluster started with `ray start --head` on the loopback address), its yaml blocks
parsed as the search configs they show."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guide.md"
BLOCK = re.compile(r"^```(bash|yaml)\n(.*?)^```", re.M | re.S)
RAY_PORT = "6390"  # the guide's cluster port


def blocks(kind: str) -> list[str]:
    return [body for k, body in BLOCK.findall(GUIDE.read_text()) if k == kind]


def test_every_yaml_block_is_a_search_config():
    from evomerge.space.config import parse_search_config

    shown = blocks("yaml")
    assert len(shown) >= 2
    for text in shown:
        cfg = parse_search_config(yaml.safe_load(text), REPO / "search_spaces", where="docs/guide.md")
        assert cfg.models and cfg.fitness.tasks


def our_ray_pids() -> list[int]:
    """The processes of the guide's cluster (the ones started here): their command lines name
    its port. Other Ray instances on this machine are left alone."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("ray" in cmd or "gcs_server" in cmd or "raylet" in cmd) and re.search(rf"[:=]{RAY_PORT}\b", cmd):
            mine.append(p.info["pid"])
    return mine


def stop_our_ray() -> None:
    import psutil

    procs = [psutil.Process(pid) for pid in our_ray_pids() if pid != os.getpid()]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The repository's search spaces beside runs/zoo, the default zoo (built once, cached)."""
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.smollm2 import cache_root

    zoo = build_zoo(cache_root() / "zoo-default", progress=False)
    root = tmp_path_factory.mktemp("guide")
    shutil.copytree(REPO / "search_spaces", root / "search_spaces")
    (root / "runs").mkdir()
    (root / "runs" / "zoo").symlink_to(zoo)
    return root


def run_block(body: str, cwd: Path) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"guide block failed:\n{body}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_guide_runs_in_order(workspace):
    shown = blocks("bash")
    assert any("ray start --head" in b for b in shown)
    out = []
    try:
        for body in shown:
            # `ray stop` would stop every Ray on the machine; here only the guide's own cluster goes
            cluster = "ray stop" in body
            out.append(run_block(body.replace("ray stop\n", "") if cluster else body, workspace))
            if cluster:
                assert our_ray_pids(), "the guide's cluster was not running"
                stop_our_ray()
    finally:
        stop_our_ray()
    text = "\n".join(out)
    runs = workspace / "runs"
    # the first search, its report, its export and the evaluation of the merged model
    assert (runs / "guide_ps" / "report" / "report.html").is_file()
    assert (runs / "guide_merged" / "config.json").is_file()
    assert re.search(r"guide_ps .*\| 32/32 \|.*finished", text)
    # the resume raised its budget and ran to it; the cluster search finished on the cluster
    history = (runs / "guide_ps" / "history.jsonl").read_text().splitlines()
    assert len(history) == 48
    assert list((runs / "guide_ps" / "tensorboard").glob("events.out.tfevents.*"))
    assert re.search(r"guide_cluster .*\| 16/16 \|.*finished", text)
    assert "rev3" in text  # the custom task was scored
    assert not our_ray_pids()
