"""Shared fixtures. Models are built once into the repo's .cache (as the pipeline does), so reruns are fast."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_cache() -> Path:
    return ROOT / ".cache"


@pytest.fixture(scope="session")
def tiny_model_dir(repo_cache) -> Path:
    from laser.models import resolve_model_dir

    return resolve_model_dir("tiny-random", repo_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from laser.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = (ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip("../shared/data is absent (a fresh clone): data tests skipped")
    return path
