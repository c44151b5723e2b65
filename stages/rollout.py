"""Stage rollout: K verified and self-scored samples per eval problem from the base or the trained model.

    python -m stages.rollout --model base|<variant> [--params params.yaml]

Reads ``{paths.eval_data_dir}/<eval>.parquet`` for each eval set of ``prepare.eval_sets``; the model is the base
model (self-reward config from ``paths.ref_constant``) or training variant ``<variant>``'s export
``{paths.models_dir}/<variant>`` (its ``laser.json``). Writes
``{paths.rollouts_dir}/<model>/<eval>.parquet`` in the rollout schema (laser/rollouts.py), the whole directory
atomically. The z_c log-prob comes from the generation pass itself (laser/generation.py): no second forward.

A retried run resumes: each finished eval set waits in ``{paths.cache_dir}/rollout-work/<model>/`` under a name
that digests everything it depends on (params, z_c and c_ref, the eval data, the model files, the code), and an
attempt reuses the sets an earlier one finished. They are removed once the output directory is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from laser.cli import stage_main
from laser.config import Params
from laser.errors import StageError
from laser.io import atomic_path
from laser.rollouts import read_problems, read_self_reward_config, rollout_rows, write_rollouts
from laser.runtime import (
    base_model_dir,
    code_digest,
    files_digest,
    open_generator,
    sampling,
    self_reward_config,
    tokenize_prompts,
    verify_completions,
)
from laser.score import SelfRewardConfig
from laser.verify import summarize

log = logging.getLogger("laser.stages.rollout")


def rollout_eval_set(params: Params, generator, tokenizer, config: SelfRewardConfig, problems: list[dict],
                     eval_set: str) -> tuple[list[dict], dict]:
    """K samples per problem, verified and scored: (the rows of one rollout parquet, verdict counts)."""
    completions = generator.generate(
        tokenize_prompts(tokenizer, problems), params.rollout.samples_per_problem,
        sampling(params, params.rollout.seed), probe_token_ids=config.probe_token_ids, progress=True)
    verdicts = verify_completions(completions, [problems[c.prompt_index]["answer"] for c in completions],
                                  params.verifier, params.rollout.require_single_boxed)
    return rollout_rows(completions, problems, verdicts, config, eval_set), summarize(verdicts)


def model_source(params: Params, model: str) -> tuple[Path, SelfRewardConfig]:
    """The model directory and self-reward config of ``base`` or of a training variant's export."""
    if model != "base":
        if model not in params.variants:
            raise StageError(f"--model {model!r}: not 'base' nor one of params.yaml's variants "
                             f"({', '.join(params.variants)})")
        export = params.paths.trained(model).model
        return Path(export), read_self_reward_config(export)
    config, noise_warning = self_reward_config(params)
    if noise_warning:
        log.warning("%s", noise_warning)
    return base_model_dir(params), config


def work_file(params: Params, model: str, model_dir: Path, config: SelfRewardConfig, eval_set: str) -> Path:
    """Where one eval set's finished rollouts wait for the rest, named by a digest of all they depend on."""
    relevant = {k: asdict(getattr(params, k)) for k in ("model", "self_reward", "generation", "verifier", "rollout")}
    digest = hashlib.sha256(json.dumps([relevant, asdict(config), eval_set], sort_keys=True).encode())
    digest.update((Path(params.paths.eval_data_dir) / f"{eval_set}.parquet").read_bytes())
    digest.update(files_digest([p for p in model_dir.iterdir() if p.is_file()]).encode())
    digest.update(code_digest().encode())
    return Path(params.paths.cache_dir) / "rollout-work" / model / f"{eval_set}-{digest.hexdigest()[:20]}.parquet"


def run(params: Params, args) -> None:
    model_dir, config = model_source(params, args.model)
    finished = {eval_set: work_file(params, args.model, model_dir, config, eval_set)
                for eval_set in params.prepare.eval_sets}
    generator = tokenizer = None
    with contextlib.ExitStack() as stack:
        for eval_set, work in finished.items():
            if work.exists():
                log.info(f"{args.model}/{eval_set}: reused, finished by an earlier attempt ({work})")
                continue
            if generator is None:  # a retry whose sets are all finished loads no model
                tokenizer, generator = stack.enter_context(open_generator(params, model_dir, params.rollout.seed))
            problems = read_problems(Path(params.paths.eval_data_dir) / f"{eval_set}.parquet")
            rows, counts = rollout_eval_set(params, generator, tokenizer, config, problems, eval_set)
            write_rollouts(work, rows)
            log.info(f"{args.model}/{eval_set}: {len(rows)} samples, accuracy {counts['accuracy']:.3f}, "
                     f"statuses {({k: v for k, v in counts.items() if k not in ('total', 'accuracy')})}")
    with atomic_path(Path(params.paths.rollouts_dir) / args.model, is_dir=True) as out_dir:
        for eval_set, work in finished.items():
            shutil.copyfile(work, out_dir / f"{eval_set}.parquet")
    for work in finished.values():
        work.unlink(missing_ok=True)  # a run sharing the cache may have finished the same set


def _arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="base, or one of params.yaml's variants (e.g. laser)")


def main(argv=None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv, _arguments, log_name=lambda args: f"rollout-{args.model}")


if __name__ == "__main__":
    main()
