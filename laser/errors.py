"""Every error the pipeline raises on purpose, in one leaf module (it imports nothing of the project), with the exit
codes a stage maps them to (laser.cli) and the flow reads (flows/pipeline.py).

- ``ParamsError``: a params.yaml value is missing, unknown, of the wrong type or out of range -> exit 2;
- every other ``PermanentError``: the stage cannot succeed as configured (rejected data, a model or token that
  cannot be found, an impossible batch geometry, a verifier that cannot start) -> exit 3, never retried;
- anything else is unexpected and may be transient (exit 1 with its traceback; the flow retries it).
"""

from __future__ import annotations

BAD_PARAMS_EXIT = 2
PERMANENT_EXIT = 3


class PermanentError(RuntimeError):
    """Retrying cannot help: the message says what is wrong and what to change."""


class ParamsError(PermanentError, ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


class StageError(PermanentError):
    """A stage cannot go on as configured; the message says why and what to change."""


class SourceError(PermanentError):
    """A whole data source cannot be read (missing file, dataset not available offline)."""


class ModelError(PermanentError):
    """A model cannot be resolved or loaded; the message says which and what to do."""


class VerifierError(PermanentError):
    """The verifier itself cannot run (a worker fails to start); per-item problems are Verdict statuses."""
