"""Shared fixtures. Models are built once into the repo's .cache (as the pipeline does), so reruns are fast."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_cache() -> Path:
    return ROOT / ".cache"


@pytest.fixture(scope="session")
def tiny_model_dir(repo_cache) -> Path:
    from laser.models import resolve_model_dir

    return resolve_model_dir("tiny-random", repo_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from laser.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def stage_env() -> dict[str, str]:
    """The environment for running a stage as its own process: this checkout on PYTHONPATH and no distributed
    variables inherited (a stage started from a test is a world of its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def require_vllm_env() -> Path:
    """The vLLM environment's python; skips when it is not set up, except under the test command
    (LASER_REQUIRE_VLLM=1, set by scripts/test.sh after it sets the environment up), where that is a failure."""
    if not VLLM_PYTHON.exists():
        if os.environ.get("LASER_REQUIRE_VLLM") == "1":
            raise RuntimeError(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm.sh`")
        pytest.skip("the vLLM environment is not set up (bash scripts/setup_vllm.sh)", allow_module_level=True)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = (ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip("../shared/data is absent (a fresh clone): data tests skipped")
    return path


def copy_smoke_repo(repo: Path) -> Path:
    """A git copy of the repo's project files (tracked and untracked-not-ignored; no dvc.lock and no pipeline
    output: a local run's lock and results must not leak into the copy) at ``repo``, its smoke profile reading
    models from the repo's cache (built once)."""
    import yaml

    from laser.config import PROJECT_FILES

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in (f for f in files if f != "dvc.lock" and Path(f).parts[0] in PROJECT_FILES):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((ROOT / name).read_bytes())
    profile = yaml.safe_load((repo / "profiles" / "smoke.yaml").read_text())
    profile["paths"] = {"cache_dir": str(ROOT / ".cache")}
    (repo / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(profile))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=repo, check=True)
    return repo


def run_with_readonly(cmd: list[str], readonly: list[Path], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the directories ``readonly`` unwritable to it.

    Tests often run as root, and root ignores permission bits, so a chmod would prove nothing there: as root the
    command runs in a private mount namespace (``unshare -m``) in which each directory is bind-mounted read-only
    (writes fail with EROFS, nothing leaks outside the namespace); otherwise the directories are chmod 0555
    (EACCES). Skips when neither is possible.
    """
    if os.geteuid() == 0:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("running as root without `unshare -m`: cannot make a directory read-only")
        mounts = " && ".join(f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))} && "
                             f"mount -o remount,bind,ro {shlex.quote(str(d))}" for d in readonly)
        return subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd], **kwargs)
    modes = {d: d.stat().st_mode for d in readonly}
    try:
        for d in readonly:
            d.chmod(0o555)
        return subprocess.run(cmd, **kwargs)
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


@pytest.fixture
def readonly_run():
    """:func:`run_with_readonly`, as a fixture."""
    return run_with_readonly


@pytest.fixture(autouse=True)
def _reset_laser_logging():
    """A stage's main() installs the laser log handlers (laser/logs.py); take them down after each test."""
    yield
    from laser.logs import reset_logging

    reset_logging()
