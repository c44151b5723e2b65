"""The flows' error classes, in a module of their own: a flow file Prefect loads as a script (a deployment's
``flows/pipeline.py:laser_pipeline``) or runs as ``__main__`` is a second copy of its module, and its classes would
not be those the other flow modules raise."""

from __future__ import annotations


class StageFailure(RuntimeError):
    """``dvc repro -s <stage>`` failed for a reason worth retrying (signal, OOM, lost worker, ...)."""


class PermanentStageError(StageFailure):
    """The stage said it cannot succeed as configured (``laser.cli.PERMANENT_EXIT``): retrying cannot help."""


class BadParamsStageError(PermanentStageError):
    """The stage rejected its params (exit 2 + a ``params:`` line): retrying cannot help."""


class PipelineError(RuntimeError):
    """One or more stages failed for good; the message names each one and why."""
