"""Stage package: the trained model as users get it, its model card holding this run's evaluation.

    python -m stages.package [--params params.yaml]

The train stage exports ``{paths.models_dir}/<package.variant>`` before anything is evaluated, so its card can
only point to the report. This stage runs after evaluate: ``paths.release_model`` holds the same files (hard
links, so the weights are not stored twice on disk; copies where the filesystem cannot link) and a ``README.md``
whose Results section carries the headline evaluation numbers of ``paths.eval_metrics`` beside the training ones.
The directory appears complete or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from laser.cli import stage_main
from laser.config import Params
from laser.errors import StageError
from laser.io import atomic_path
from laser.model_card import CARD_FILE, LASER_JSON, read_json, render_model_card

log = logging.getLogger("laser.stages.package")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy costs disk, not correctness
        shutil.copy2(source, target)


def package(params: Params) -> Path:
    """Write ``paths.release_model`` from the export and the metrics; returns its path."""
    params = params.for_variant(params.package.variant)  # the card describes the released variant's training
    paths, trained = params.paths, params.paths.trained(params.package.variant)
    export = Path(trained.model)
    settings = read_json(export / LASER_JSON)
    if settings is None:
        raise StageError(f"{export / LASER_JSON} is missing: run the train stage first "
                         f"(dvc repro train@{params.package.variant})")
    eval_metrics = read_json(paths.eval_metrics)
    if eval_metrics is None:
        raise StageError(f"{paths.eval_metrics} is missing: run the evaluate stage first (dvc repro evaluate)")
    train_metrics = read_json(trained.metrics) or {}
    card = render_model_card(params, params.package.variant, settings, train_metrics.get("train_problems"),
                             train_metrics, eval_metrics, model_dir=paths.release_model)
    with atomic_path(paths.release_model, is_dir=True) as tmp:
        for source in sorted(export.iterdir()):
            if source.is_file() and source.name != CARD_FILE:
                link_or_copy(source, tmp / source.name)
        (tmp / CARD_FILE).write_text(card)
    log.info("packaged %s -> %s (model card with the evaluation of %s)", export, paths.release_model,
             paths.eval_metrics)
    return Path(paths.release_model)


def main(argv=None) -> None:
    stage_main(lambda params, _args: package(params), __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
