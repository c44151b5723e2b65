"""The ``laser`` command (pyproject ``[project.scripts]``; also ``python -m laser.console``).

    laser solve --model release   --k 8 "What is 17 + 25?"     # voted answer, votes, each sample's score
    laser solve --model release   --k 8 --json "What is 17 + 25?"
    laser score --model release   --problem "What is 17 + 25?" --response "... \\boxed{42}."
    laser run [--profile smoke] [--force train] ...                  # = python -m flows.pipeline ...
    laser report [--evaluate]                                         # print eval/report.md (or make it first)

Results go to stdout, log lines to stderr (``-v``/``-q`` or ``LASER_LOG_LEVEL``). Bad input (a missing model
directory, a model without a self-reward config, k < 1) is one ``error: ...`` line on stderr and exit 2 (usage) or
3 (the model or its config), as the stages (laser.cli).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from laser.errors import BAD_PARAMS_EXIT, PERMANENT_EXIT, PermanentError
from laser.logs import add_verbosity_arguments, level_from, setup_logging

log = logging.getLogger("laser.console")

PIPELINE_HELP = """\
usage: laser run [pipeline options]

Run the whole pipeline: `python -m flows.pipeline [pipeline options]` in the project root (the directory with
dvc.yaml and flows/pipeline.py: the current directory or one above it, else the checkout laser is installed
from). Every option is passed through unchanged; the exit status is the pipeline's.

pipeline options (see `laser run -- --help` for the pipeline's own, complete list):
  --profile NAME      merge profiles/NAME.yaml into params.yaml first (rewrites params.yaml)
  --force STAGE       rerun this stage (or foreach group, e.g. rollout) and everything downstream
  --params-file FILE  params file (default: params.yaml)
  --parallel N        stages at once when the DAG allows (default: flow.max_parallel)
  --repo-root DIR     the DVC project (default: the project root found above)
  --serve             serve the flow as a Prefect deployment on a schedule (--cron, --name)

options:
  -h, --help          show this help message and exit
"""


class UsageError(Exception):
    """Bad command-line input: one line, exit 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 sample is needed")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # also nan, which compares false to everything and would reach the sampler
        raise argparse.ArgumentTypeError(f"{value}: a temperature is a finite number >= 0 (0: greedy)")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: top-p is in (0, 1]")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``error: ...`` line (plus the usage hint) and exit 2."""

    def error(self, message: str):
        self.exit(BAD_PARAMS_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an exported model directory (release), or any HF causal LM directory with "
                             "--self-reward-config")
    parser.add_argument("--self-reward-config", metavar="FILE",
                        help="the self-reward settings when DIR has none: a laser.json, or the base model's "
                             "ref/ref_constant.json (default: DIR's config.json 'laser' key, else DIR/laser.json)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="weights' dtype (default: float32, as the pipeline's model.dtype)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for machines)")
    add_verbosity_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="laser", description="Use a trained LaSeR model (score, solve) and run the pipeline "
                     "(run, report).", formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="`laser COMMAND --help` describes each command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    solve = commands.add_parser(
        "solve", help="sample k answers, self-score each, print the self-reward-weighted majority vote",
        description="Sample K answers to PROBLEM (prompted as in training), score each with the model's last-token "
                    "self-reward (read in the generation pass), and print the answer of the self-reward-weighted "
                    "majority vote (weights: clip(score, 0, 1)), the votes per distinct answer, and every sample's "
                    "answer, score and self-verified flag (clipped score > 0.5).")
    solve.add_argument("problem", metavar="PROBLEM", help="the problem text, e.g. \"What is 17 + 25?\"")
    solve.add_argument("--k", type=_positive_int, default=8, help="samples to draw (default: 8)")
    solve.add_argument("--temperature", type=_temperature,
                       help="sampling temperature (default: the training one saved with the model, else 1.0)")
    solve.add_argument("--top-p", type=_top_p, help="nucleus sampling (default: the training one, else 1.0)")
    solve.add_argument("--max-new-tokens", type=_positive_int,
                       help="tokens per answer (default: the training limit saved with the model, else 512)")
    solve.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    solve.add_argument("--batch-size", type=_positive_int, default=16, help="samples decoded at once (default: 16)")
    solve.add_argument("--equivalence", choices=("math", "exact"), default="math",
                       help="which answers count as the same: math (math-verify, e.g. 1/2 = 0.5; default) or "
                            "exact (after light normalisation, numbers numerically)")
    solve.add_argument("--show-responses", action="store_true", help="also print every sample's full response")
    _model_arguments(solve)

    score = commands.add_parser(
        "score", help="the self-reward score of a given response",
        description="Score RESPONSE to PROBLEM with one forward pass over prompt + response + EOS: "
                    "r_s = beta_v * (log pi(z_c | x, y, EOS) - c_ref). Prints r_s, its clipped value and whether it "
                    "is self-verified (clipped > 0.5). The problem is rendered as the training prompts were "
                    "(chat template, instruction, few-shot turns saved with the model); --prompt gives the full "
                    "prompt text instead.")
    which = score.add_mutually_exclusive_group(required=True)
    which.add_argument("--problem", help="the problem text (rendered as in training)")
    which.add_argument("--prompt", help="the full prompt text, used as is (no template, no few-shot turns)")
    score.add_argument("--response", required=True, help="the response text (an EOS is appended)")
    _model_arguments(score)

    commands.add_parser("run", help="run the pipeline: python -m flows.pipeline [options] (laser run --help)",
                        add_help=False)

    report = commands.add_parser(
        "report", help="print the evaluation report (paths.eval_report), or make it first with --evaluate",
        description="Print the Markdown report of the last evaluation (paths.eval_report of the params file, "
                    "default eval/report.md) in the project root. With --evaluate, first run the evaluate stage "
                    "(python -m stages.evaluate) over the rollouts there; the full pipeline is `laser run`.")
    report.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    report.add_argument("--evaluate", action="store_true", help="run python -m stages.evaluate first")
    report.add_argument("--path", action="store_true", help="print only the report's path")
    report.add_argument("--root", metavar="DIR", help="the project root (default: found from the current directory)")
    add_verbosity_arguments(report)
    return parser


# --------------------------------------------------------------------------------------------------- commands


def project_root(start: str | Path | None = None) -> Path:
    """The project (dvc.yaml + flows/pipeline.py): ``start`` or the current directory or a parent, else the
    checkout laser is imported from (an editable install)."""
    here = Path(start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[1]]
    for path in candidates:
        if (path / "dvc.yaml").is_file() and (path / "flows" / "pipeline.py").is_file():
            return path
    raise UsageError(f"no LaSeR project found at or above {here} (a directory with dvc.yaml and flows/pipeline.py)")


def _load(args):
    from laser.api import load

    if not args.verbose and Path(args.model).is_dir():  # transformers' "Loading weights" bar: noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load(args.model, args.self_reward_config, dtype=args.dtype, device=args.device)


def cmd_solve(args) -> int:
    model = _load(args)
    result = model.solve(args.problem, args.k, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                         equivalence=args.equivalence)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    verified = "self-verified" if result.self_verified else "not self-verified"
    print(f"answer: {result.answer if result.answer is not None else '(none: no sample gave a boxed answer)'}"
          f" ({verified})")
    print("votes:")
    for v in result.votes:
        print(f"  {v.answer!s:<20} weight {v.weight:.3f}  ({v.count} of {args.k} samples)")
    print("samples:")
    for s in result.samples:
        score = "   n/a (truncated)" if s.score is None else f"{s.score:+.4f}"
        flag = "verified" if s.self_verified else "-"
        print(f"  #{s.index:<3} answer {str(s.answer)!s:<16} score {score}  {flag}")
        if args.show_responses:
            print("       " + s.response.replace("\n", "\n       "))
    return 0


def cmd_score(args) -> int:
    from laser.metrics import clip_scores

    model = _load(args)
    if args.prompt is not None:
        value = model.score(args.prompt, args.response, rendered=True)
    else:
        value = model.score(args.problem, args.response)
    clipped = float(clip_scores([value])[0])
    verified = clipped > 0.5
    if args.json:
        print(json.dumps({"score": value, "clipped": clipped, "self_verified": verified}))
    else:
        print(f"score {value:+.6f} (clipped {clipped:.4f}): {'self-verified' if verified else 'not self-verified'}")
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    if list(argv) in (["-h"], ["--help"]):
        print(PIPELINE_HELP, end="")
        return 0
    passthrough = list(argv[1:] if argv and argv[0] == "--" else argv)
    root = project_root()
    cmd = [sys.executable, "-m", "flows.pipeline", *passthrough]
    log.info("in %s: %s", root, " ".join(cmd))
    return subprocess.call(cmd, cwd=root, env=_project_env(root))


def _project_env(root: Path) -> dict[str, str]:
    """The environment with the project root on PYTHONPATH (stages/ and flows/ run from there, not installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def cmd_report(args) -> int:
    from laser.config import load_params

    root = project_root(args.root)
    params_file = Path(args.params) if Path(args.params).is_absolute() else root / args.params
    report = root / load_params(params_file).paths.eval_report
    if args.evaluate:
        cmd = [sys.executable, "-m", "stages.evaluate", "--params", str(params_file)]
        log.info("in %s: %s", root, " ".join(cmd))
        code = subprocess.call(cmd, cwd=root, env=_project_env(root))
        if code:
            return code
    if not report.is_file():
        raise UsageError(f"no report at {report}: run the pipeline (laser run) or the evaluate stage "
                         "(laser report --evaluate)")
    if args.path:
        print(report)
    else:
        sys.stdout.write(report.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "run":  # passed through as is: argparse would take the pipeline's options
            setup_logging(level_from(), stream="stderr")
            return cmd_run(argv[1:])
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help (0) or a usage error (2, its one line printed): a code, not an exit
            return int(done.code or 0)
        if args.command is None:
            parser.print_help()
            return BAD_PARAMS_EXIT
        setup_logging(level_from(args.verbose, args.quiet), stream="stderr")
        return {"solve": cmd_solve, "score": cmd_score, "report": cmd_report}[args.command](args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_PARAMS_EXIT
    except PermanentError as err:  # a missing model dir or self-reward config, bad params
        print(f"error: {err}", file=sys.stderr)
        return PERMANENT_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
