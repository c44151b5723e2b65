"""The thin shell every stage's ``main()`` shares: parse ``--params``, load and validate them, map known errors
to one clear line and an exit code the flow uses to decide on a retry:

- 2 (``BAD_PARAMS_EXIT``): bad params, after a ``params: key = value is invalid; allowed: ...`` line;
- 3 (``PERMANENT_EXIT``): the stage cannot succeed as configured (missing or rejected data, a model or token that
  cannot be found, an impossible batch geometry, a verifier that cannot start, a path it may not write: permission
  denied or a read-only filesystem): one ``error: ...`` line;
- anything else (an unexpected exception exits 1 with its traceback, a signal, OOM): possibly transient.

SIGTERM (a flow's or DVC's kill, a scheduler's preemption) becomes ``SystemExit(143)``: the stage unwinds as on an
exception, so ``finally`` blocks and context managers run (a vLLM engine is stopped and its weight copy in
/dev/shm removed, temporary files are discarded) instead of the process vanishing mid-way.

``--local_rank`` is accepted and ignored: the ``deepspeed`` launcher appends it, and the rank is read from the
environment (``LOCAL_RANK``) as under ``torchrun``.

Logging (laser/logs.py): ``-v``/``-q`` (or ``LASER_LOG_LEVEL``) set the level; a stage's log goes to stdout and to
``<paths.logs_dir>/<stage>.log``. The ``error:``/``params:`` lines above are printed on stderr, not logged.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from laser.config import Params, load_params
from laser.errors import BAD_PARAMS_EXIT, PERMANENT_EXIT, ParamsError, PermanentError
from laser.logs import add_verbosity_arguments, level_from, setup_logging, stage_log_file

_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # retrying cannot make a path writable


def permission_message(err: OSError) -> str | None:
    """The one line for a permission or read-only-filesystem error (naming the path), None for other errors."""
    if not isinstance(err, PermissionError) and err.errno not in _PERMANENT_ERRNOS:
        return None
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths) if paths else "(path not reported)"
    return f"{err.strerror or 'permission denied'}: {where} (fix its permissions, or point paths.* elsewhere)"


def stage_main(run: Callable[[Params, argparse.Namespace], None], description: str,
               argv: Sequence[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               log_name: str | Callable[[argparse.Namespace], str] | None = None) -> None:
    """``log_name``: the log file's name (``<paths.logs_dir>/<log_name>.log``), or a function of the parsed
    arguments giving it; by default the stage module's name (``stages.train`` -> ``train``), none for other code."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml",
                        help="params file (default: params.yaml); a missing section or key takes its default "
                             "(laser/config.py), an unknown one is an error")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    add_verbosity_arguments(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    with _term_as_exit():
        _run_stage(run, args, log_name)


def _run_stage(run: Callable[[Params, argparse.Namespace], None], args: argparse.Namespace,
               log_name: str | Callable[[argparse.Namespace], str] | None) -> None:
    try:
        params = load_params(args.params)
        name = log_name(args) if callable(log_name) else log_name or _stage_name(run)
        setup_logging(level_from(args.verbose, args.quiet),
                      stage_log_file(params.paths.logs_dir, name) if name else None)
        run(params, args)
    except ParamsError as err:
        print(str(err), file=sys.stderr)
        sys.exit(BAD_PARAMS_EXIT)
    except PermanentError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(PERMANENT_EXIT)
    except OSError as err:
        message = permission_message(err)
        if message is None:
            raise  # may be transient (disk full, a network filesystem): the traceback, and the flow retries
        print(f"error: {message}", file=sys.stderr)
        sys.exit(PERMANENT_EXIT)


@contextlib.contextmanager
def _term_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) (the shell's code for a TERM kill, which the flow retries) while the stage
    runs; the previous handler is back afterwards (a stage's main() called in-process, as tests do)."""
    if threading.current_thread() is not threading.main_thread():  # Python accepts handlers only there
        yield
        return

    def exit_on_term(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage_name(run: Callable) -> str | None:
    """``train`` for a function of ``stages.train`` (also when it runs as ``python -m stages.train``, i.e. as
    ``__main__``); None for code outside stages/ (no log file)."""
    module_name = getattr(run, "__module__", None) or ""
    spec = getattr(sys.modules.get(module_name), "__spec__", None)
    name = getattr(spec, "name", None) or module_name
    return name.split(".", 1)[1] if name.startswith("stages.") else None
