"""Stage rollout: K verified and self-scored samples per eval problem from the base or the trained model.

    python -m stages.rollout --model base|trained [--params params.yaml]

Reads ``{paths.eval_data_dir}/<eval>.parquet`` for each eval set of ``prepare.eval_sets``; the model is the base
model (self-reward config from ``paths.ref_constant``) or ``paths.trained_model`` (its ``laser.json``). Writes
``{paths.rollouts_dir}/<model>/<eval>.parquet`` in the rollout schema (laser/rollouts.py), the whole directory
atomically. The z_c log-prob comes from the generation pass itself (laser/generation.py): no second forward.
"""

from __future__ import annotations

from pathlib import Path

from laser.cli import stage_main
from laser.config import Params
from laser.io import atomic_path
from laser.rollouts import (
    SelfRewardConfig,
    read_problems,
    read_self_reward_config,
    rollout_rows,
    tokenize_prompts,
    write_rollouts,
)
from laser.runtime import base_model_dir, load_generator, sampling
from laser.verify import summarize, verify_batch


def rollout_eval_set(params: Params, generator, tokenizer, config: SelfRewardConfig, problems: list[dict],
                     eval_set: str) -> tuple[list[dict], dict]:
    """K samples per problem, verified and scored: (the rows of one rollout parquet, verdict counts)."""
    completions = generator.generate(
        tokenize_prompts(tokenizer, problems), params.rollout.samples_per_problem,
        sampling(params, params.rollout.seed), probe_token_ids=config.probe_token_ids, progress=True)
    verdicts = verify_batch([c.text for c in completions], [problems[c.prompt_index]["answer"] for c in completions],
                            timeout_s=params.verifier.timeout_s, num_workers=params.verifier.num_workers,
                            require_single_boxed=params.verifier.require_single_boxed)
    return rollout_rows(completions, problems, verdicts, config, eval_set), summarize(verdicts)


def model_source(params: Params, model: str) -> tuple[Path, SelfRewardConfig]:
    if model == "trained":
        return Path(params.paths.trained_model), read_self_reward_config(params.paths.trained_model)
    return base_model_dir(params), read_self_reward_config(params.paths.ref_constant)


def run(params: Params, args) -> None:
    model_dir, config = model_source(params, args.model)
    tokenizer, _model, generator = load_generator(params, model_dir)
    with atomic_path(Path(params.paths.rollouts_dir) / args.model, is_dir=True) as out_dir:
        for eval_set in params.prepare.eval_sets:
            problems = read_problems(Path(params.paths.eval_data_dir) / f"{eval_set}.parquet")
            rows, counts = rollout_eval_set(params, generator, tokenizer, config, problems, eval_set)
            write_rollouts(out_dir / f"{eval_set}.parquet", rows)
            print(f"{args.model}/{eval_set}: {len(rows)} samples, accuracy {counts['accuracy']:.3f}, "
                  f"statuses {({k: v for k, v in counts.items() if k not in ('total', 'accuracy')})}")


def _arguments(parser) -> None:
    parser.add_argument("--model", choices=("base", "trained"), required=True)


def main(argv=None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv, _arguments)


if __name__ == "__main__":
    main()
