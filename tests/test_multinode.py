"""The train stage's launcher as a param (``flow.train_launcher``: dvc.yaml runs ``${flow.train_launcher} -m
stages.train``), and data parallelism that changes nothing: two processes under torchrun, run by ``dvc repro``, log
the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import train_workdir  # noqa: F401  (a fixture: the train parquet and ref_constant.json, as there)

from laser.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]


def _dvc_project(path: Path, launcher: str | None = None, overrides: dict | None = None) -> Path:
    """A DVC project holding the repo's dvc.yaml, code and params.yaml (with ``overrides``)."""
    path.mkdir(parents=True)
    for name in ("dvc.yaml", "laser", "stages"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_merge(params, overrides or {})
    if launcher is not None:
        params["flow"]["train_launcher"] = launcher
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    (path / ".dvc" / "config").write_text(f"[core]\n    no_scm = True\n    analytics = false\n"
                                          f"    site_cache_dir = {path / '.dvc-site'}\n")
    return path


def _train_cmd(project: Path) -> str:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return next(stage.cmd for stage in repo.index.stages if stage.name == "train@laser")


def test_dvc_renders_the_train_launcher_from_params(tmp_path):
    assert _train_cmd(_dvc_project(tmp_path / "default")) == "python -m stages.train --variant laser"
    launcher = "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint head:29500"
    assert _train_cmd(_dvc_project(tmp_path / "torchrun", launcher)) == f"{launcher} -m stages.train --variant laser"
    deepspeed = "deepspeed --hostfile hosts --no_python python"
    assert _train_cmd(_dvc_project(tmp_path / "deepspeed", deepspeed)) == f"{deepspeed} -m stages.train --variant laser"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("PYTHONPATH", None)  # the copy's code, as DVC runs it there
    return env


@pytest.mark.slow
def test_two_processes_under_the_launcher_log_the_losses_of_one(tmp_path, train_workdir, repo_cache):  # noqa: F811
    """`dvc repro -s train` with flow.train_launcher = python (1 process) and = torchrun --nproc_per_node 2 (2
    processes, each generating and training on half of each step's prompts), the same global batch: every step's
    losses and rewards agree. The samples do not depend on the world size (each prompt's seed comes from its place
    in the step) and the loss normalisers are global."""
    from laser.engine import _free_port

    overrides = {"paths": {"cache_dir": str(repo_cache)}, "model": {"name": "tiny-random"},
                 "self_reward": {"token": "<|z_c|>"}, "generation": {"max_new_tokens": 24, "batch_size": 8},
                 "train": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "mini_batch_size": 8,
                           "micro_batch_size": 2, "lr": 1e-3, "checkpoint_every": 2}}
    torchrun = f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port {_free_port()}"
    steps = {}
    for name, launcher in (("one", "python"), ("two", torchrun)):
        project = _dvc_project(tmp_path / name, launcher, overrides)
        for inputs in ("data", "ref"):
            shutil.copytree(train_workdir / inputs, project / inputs)
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", "train@laser"], cwd=project, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"> {launcher} -m stages.train --variant laser" in done.stdout
        lines = (project / "train" / "laser" / "steps.jsonl").read_text().splitlines()
        steps[name] = {r["step"]: r for r in map(json.loads, lines)}
    assert sorted(steps["one"]) == sorted(steps["two"]) == [1, 2]
    for step in (1, 2):
        one, two = steps["one"][step], steps["two"][step]
        assert (one["world_size"], two["world_size"]) == (1, 2)
        for key in ("pg_loss", "self_reward_mse", "reward_mean", "response_length", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (step, key, one[key], two[key])
