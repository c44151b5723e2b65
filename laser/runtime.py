"""Glue the stages share: the base model's directory and a generator built from params."""

from __future__ import annotations

from pathlib import Path

from laser.config import Params
from laser.generation import HFGenerator, Sampling
from laser.models import load_model, load_tokenizer, resolve_model_dir


def base_model_dir(params: Params) -> Path:
    return resolve_model_dir(params.model.name, params.paths.cache_dir)


def load_generator(params: Params, model_dir: str | Path):
    """(tokenizer, model, generator) for ``model_dir``. Only the ``hf`` backend exists so far; a vLLM backend
    implements the same ``laser.generation.Generator`` protocol."""
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code)
    import torch

    device = "cuda" if torch.cuda.is_available() else None
    model = load_model(model_dir, params.model.dtype, params.model.trust_remote_code, device)
    return tokenizer, model, HFGenerator(model, tokenizer, batch_size=params.generation.batch_size)


def sampling(params: Params, seed: int) -> Sampling:
    g = params.generation
    return Sampling(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=seed)
