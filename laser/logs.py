"""One logging setup for every stage and the ``laser`` command: one format, one level knob, an optional log file.

- Format: ``LOG_FORMAT`` (``2025-01-01 12:00:00,000 INFO laser.stages.train: resumed from checkpoint at step 4``).
- Level of the project's loggers (``laser.*``): ``-v`` (DEBUG) / ``-q`` (WARNING) on the command line, else the
  environment variable ``LASER_LOG_LEVEL`` (a name such as ``DEBUG`` or a number), else INFO. Other libraries'
  loggers stay at WARNING.
- Console: a stage logs to stdout (where its ``print`` lines went before; its ``error:``/``params:`` lines stay
  on stderr, see laser.cli); the ``laser`` command logs to stderr, so that its stdout carries only results.
- File: a stage also appends its log to ``<paths.logs_dir>/<stage>.log`` (DVC and git ignore the directory); a
  log file that cannot be opened is a warning, never the reason a stage fails. Progress bars (tqdm) are not
  log records: they stay on stderr as they are.

Imports only laser.errors of the project (laser.cli imports it, and every stage imports laser.cli).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from laser.errors import PermanentError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVEL_ENV = "LASER_LOG_LEVEL"
PROJECT_LOGGER = "laser"  # stages log as laser.stages.<name>, the library as laser.<module>, the command laser.console
MAX_LOG_BYTES = 10 * 2**20  # a log file is rotated (one backup kept) past this size

_OURS = "_laser_handler"  # attribute marking the handlers installed here (a second setup replaces them)


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is when a record is emitted (not when the handler was
    made), so a redirected or captured stream (pytest's capsys, contextlib.redirect_stdout) gets the records."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def level_from(verbose: int = 0, quiet: int = 0, env: dict | None = None) -> int:
    """The level for the project's loggers: ``-v`` DEBUG, ``-q`` WARNING (``-qq`` ERROR), else ``LASER_LOG_LEVEL``,
    else INFO. A bad ``LASER_LOG_LEVEL`` raises PermanentError naming the allowed values."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING if quiet == 1 else logging.ERROR
    value = (os.environ if env is None else env).get(LEVEL_ENV, "").strip()
    if not value:
        return logging.INFO
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise PermanentError(f"{LEVEL_ENV}={value!r} is not a log level; allowed: DEBUG, INFO, WARNING, ERROR, "
                         "CRITICAL or a number")
    return level


def add_verbosity_arguments(parser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` on an argparse parser (read them with :func:`level_from`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help=f"log DEBUG messages too (default: INFO, or ${LEVEL_ENV} when set)")
    group.add_argument("-q", "--quiet", action="count", default=0,
                       help="log warnings and errors only (-qq: errors only)")


def setup_logging(level: int = logging.INFO, log_file: str | Path | None = None, stream: str = "stdout") -> None:
    """Install the console handler (``stream``: "stdout" or "stderr") and, when ``log_file`` is given, a file
    handler appending to it, both with :data:`LOG_FORMAT`, on the root logger; the ``laser`` loggers log at
    ``level``. Calling it again replaces what an earlier call installed (other handlers are left alone)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    console = _CurrentStream(stream)
    console.setFormatter(formatter)
    handlers: list[logging.Handler] = [console]
    file_problem = None
    if log_file is not None:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=MAX_LOG_BYTES, backupCount=1,
                                                                 encoding="utf-8"))
            handlers[-1].setFormatter(formatter)
        except OSError as err:
            file_problem = f"cannot write the log file {log_file} ({err.strerror or err}); logging to the console only"
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)  # other libraries: warnings and errors
    logging.getLogger(PROJECT_LOGGER).setLevel(level)
    if file_problem:
        logging.getLogger(f"{PROJECT_LOGGER}.logs").warning("%s", file_problem)


def stage_log_file(logs_dir: str | Path, stage: str, env: dict | None = None) -> Path:
    """``<logs_dir>/<stage>.log``; under a multi-process launcher a rank > 0 writes ``<stage>.rank<N>.log``."""
    rank = int((os.environ if env is None else env).get("RANK", "0") or 0)
    return Path(logs_dir) / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")


def reset_logging() -> None:
    """Remove what :func:`setup_logging` installed and give the ``laser`` loggers their default level back (tests:
    one test's handlers must not write into the next one's output)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    logging.getLogger(PROJECT_LOGGER).setLevel(logging.NOTSET)
