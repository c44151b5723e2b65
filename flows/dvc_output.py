"""What a ``dvc repro -s <stage>`` run said, read from its output lines: whether the stage ran or was restored, and,
when it failed, which error the flow raises (retried or not). Pure: lines in, a status or an exception out.

DVC's own line for a failed stage command is ``ERROR: failed to reproduce 'b': failed to run: cmd, exited with 2``;
a stage that rejects its params prints ``params: key = value is invalid; ...`` (``params.yaml: params: ...`` when
load_params names the file) and exits 2; one that cannot succeed as configured prints ``error: ...`` and exits 3
(laser.errors).
"""

from __future__ import annotations

import collections
import re
import signal

from flows.errors import BadParamsStageError, PermanentStageError, StageFailure
from laser.errors import BAD_PARAMS_EXIT, PERMANENT_EXIT

FAILED_RUN = re.compile(r"failed to run: .*, exited with (-?\d+)")
PARAMS_LINE = re.compile(r"^(?:\S+: )?params: ")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 137:
        return "exit code 137 (SIGKILL: out of memory?)"
    if code == 143:
        return "exit code 143 (SIGTERM: the stage was stopped)"
    return f"exit code {code}"


class ReproOutput:
    """Fed every line of one ``dvc repro -s`` run (``on_line``); then ``status`` says what happened, and
    ``failure`` builds the exception for a non-zero exit."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.status = "unchanged"  # ran | restored | unchanged
        self.tail: collections.deque[str] = collections.deque(maxlen=40)  # the last stderr lines
        self.params_lines: list[str] = []
        self.failed_exits: list[int] = []

    def on_line(self, stream: str, line: str) -> None:
        if stream == "stdout" and line.startswith("Running stage "):
            self.status = "ran"
        elif stream == "stdout" and "is cached - skipping run" in line and self.status != "ran":
            self.status = "restored"  # DVC's run-cache had these exact deps and params: outputs checked out
        if stream == "stderr":
            self.tail.append(line)
            if PARAMS_LINE.match(line):
                self.params_lines.append(line)
            if match := FAILED_RUN.search(line):
                self.failed_exits.append(int(match[1]))

    def failure(self, returncode: int, attempt: int = 1) -> StageFailure:
        """The error for a run that exited ``returncode`` != 0: bad params and permanent failures are not retried,
        anything else is (a signal, OOM, a lost worker, an unexpected exception)."""
        exit_code = self.failed_exits[-1] if self.failed_exits else returncode  # no "failed to run": dvc failed
        if exit_code == BAD_PARAMS_EXIT and self.params_lines:
            return BadParamsStageError(f"stage {self.stage!r} rejected its params (not retried): "
                                       + "; ".join(self.params_lines))
        if exit_code == PERMANENT_EXIT:
            errors = [line for line in self.tail if line.startswith("error: ")] or list(self.tail)[-1:]
            return PermanentStageError(f"stage {self.stage!r} cannot succeed as configured (not retried): "
                                       + "; ".join(errors))
        last = "\n".join(f"    {line}" for line in list(self.tail)[-10:])
        return StageFailure(f"stage {self.stage!r} failed on attempt {attempt} ({describe_exit(exit_code)}; "
                            f"dvc exited {returncode}); last stderr lines:\n{last}")
