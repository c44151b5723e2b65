"""Glue the stages share: the base model's directory, a generator built from params, the digests that decide
whether a stage's partial work (checkpoints, finished rollouts) may be resumed."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from laser.config import Params, VerifierParams
from laser.generation import HFGenerator, Sampling
from laser.models import load_model, load_tokenizer, resolve_model_dir
from laser.verify import verify_batch


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


def verify_completions(completions, golds: list, verifier: VerifierParams, require_single_boxed: bool) -> list:
    """Verdicts for sampled completions against their gold answers, in the shared verifier pool. Training gates
    with ``verifier.require_single_boxed``, evaluation with ``rollout.require_single_boxed``."""
    return verify_batch([c.text for c in completions], golds, timeout_s=verifier.timeout_s,
                        num_workers=verifier.num_workers, require_single_boxed=require_single_boxed)


def code_digest() -> str:
    """Hash of the loaded ``laser`` and ``stages`` sources: DVC reruns a stage when its code changed, and then the
    partial work of the old code (a checkpoint, finished rollouts) must not be resumed; a crash-and-retry runs the
    same code and resumes."""
    source_dirs = {Path(__file__).resolve().parents[1] / name for name in ("laser", "stages")}
    files = sorted({Path(module.__file__).resolve() for name, module in list(sys.modules.items())
                    if getattr(module, "__file__", None)
                    # by path as well as by name: under ``python -m stages.X`` the stage is ``__main__``
                    and (name.split(".")[0] in ("laser", "stages")
                         or Path(module.__file__).resolve().parent in source_dirs)})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """Hash of files' names, sizes and modification times (not their bytes: a model is gigabytes). Every artifact
    here is written by rename, so a rewritten file has a new mtime."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
