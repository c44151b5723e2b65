"""Package-level guarantees: `import laser` stays light; the core math imports only torch; dvc.yaml's code deps
cover what each stage imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("deepspeed", "vllm", "prefect", "dvc", "transformers", "datasets", "math_verify")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_import_laser_is_light():
    loaded = _modules_after("import laser")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_core_math_imports_only_torch():
    loaded = _modules_after(
        "import laser.score, laser.losses, laser.advantages, laser.schedule, laser.config, laser.io"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def _laser_imports(module: str, seen: set[str]) -> set[str]:
    """Every laser/stages module ``module`` imports, transitively (read from the source: nothing is imported)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if module in seen or not path.is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in ("laser", "stages"):
                _laser_imports(name, seen)
    return seen


def test_dvc_code_deps_list_every_imported_module_and_no_other():
    """Editing a module a stage imports must make DVC rerun that stage, and editing one it does not import must
    not (laser/cli.py, laser/io.py, laser/errors.py and laser/logs.py excepted: they do not change what a stage
    computes). A module a stage runs as a process counts as imported with the module that starts it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    exempt = {"laser/cli.py", "laser/io.py", "laser/errors.py", "laser/logs.py", "laser/__init__.py"}
    runs_as_process = {"laser/vllm_backend.py": "laser/vllm_worker.py"}  # the vLLM worker, in .venv-vllm
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages keep their definition under `do`
        module = stage["cmd"].split("-m ")[1].split()[0]
        imported = {m.replace(".", "/") + ".py" for m in _laser_imports(module, set())}
        imported = {path for path in imported if (ROOT / path).is_file()} - exempt
        imported |= {worker for starter, worker in runs_as_process.items() if starter in imported}
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        assert not imported - listed, f"dvc.yaml stage {name!r} lacks code deps {sorted(imported - listed)}"
        extra = sorted(listed - imported)
        assert not extra, f"dvc.yaml stage {name!r} lists code it does not import {extra}"


def test_only_the_library_is_installed():
    """pip install -e . puts `laser` in site-packages, not generic `stages`/`flows` packages."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["laser*"]


def test_reference_rollouts_do_not_depend_on_beta_v():
    """c_ref does not depend on beta_v: changing it must not rerun ref_constant (rollout_base and train, which
    build the self-reward config, do depend on it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not any(p.startswith("self_reward.beta_v") or p == "self_reward" for p in stages["ref_constant"]["params"])
    assert "self_reward.beta_v" in stages["rollout_base"]["params"]
