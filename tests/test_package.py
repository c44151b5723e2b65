"""Package-level guarantees: `import laser` stays light; the core math imports only torch."""

from __future__ import annotations

import subprocess
import sys

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
