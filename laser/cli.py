"""The thin shell every stage's ``main()`` shares: parse ``--params``, load and validate them, map known errors
to one clear line and an exit code (2 = bad params: not worth a retry; 1 = anything else)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from laser.config import Params, ParamsError, load_params


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


def stage_main(run: Callable[[Params, argparse.Namespace], None], description: str,
               argv: Sequence[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        run(params, args)
    except ParamsError as err:
        print(str(err), file=sys.stderr)
        sys.exit(2)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
