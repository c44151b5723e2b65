"""Glue the stages share, one factory per runtime object: the base model's directory, the generator, ``Sampling``,
prompt tokenisation, "verify these completions", the self-reward config, and the digests that decide whether a
stage's partial work (checkpoints, finished rollouts) may be resumed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

from laser.config import Params, VerifierParams
from laser.errors import StageError
from laser.generation import Generator, HFGenerator, Sampling, default_stop_ids
from laser.models import load_model, load_tokenizer, resolve_model_dir
from laser.score import SelfRewardConfig, score_headroom
from laser.verify import verify_batch


def base_model_dir(params: Params) -> Path:
    return resolve_model_dir(params.model.name, params.paths.cache_dir)


def make_generator(params: Params, model, tokenizer) -> Generator:
    """The in-process generator over an HF ``model`` (the API's and the HF backend's)."""
    return HFGenerator(model, tokenizer, batch_size=params.generation.batch_size)


@contextlib.contextmanager
def open_generator(params: Params, model_dir: str | Path, seed: int = 0) -> Iterator[tuple[object, Generator]]:
    """The one place a stage's generator is built, switching on ``generation.backend``: (tokenizer, generator)
    for ``model_dir``. ``hf`` loads the model here; ``vllm`` starts a vLLM worker over the directory (no HF model
    in this process) and stops it on exit."""
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code)
    if params.generation.backend == "vllm":
        with vllm_generator(params, model_dir, tokenizer, seed) as generator:
            yield tokenizer, generator
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else None
    model = load_model(model_dir, params.model.dtype, params.model.trust_remote_code, device)
    yield tokenizer, make_generator(params, model, tokenizer)


def vllm_generator(params: Params, model_dir: str | Path, tokenizer, seed: int = 0):
    """A :class:`laser.vllm_backend.VLLMGenerator` over ``model_dir`` with ``generation.vllm`` (a context manager:
    it stops its worker on exit)."""
    from laser.vllm_backend import VLLMGenerator

    stop_ids = stop_ids_for_dir(model_dir, tokenizer, params.model.trust_remote_code)
    return VLLMGenerator(model_dir, tokenizer, params.generation.vllm, stop_ids, seed)


def stop_ids_for_dir(model_dir: str | Path, tokenizer, trust_remote_code: bool) -> list[int]:
    """What ends a response for the model in ``model_dir``, without loading it: as
    :func:`laser.generation.default_stop_ids` (the tokenizer's EOS and the generation config's)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        config = None
    return default_stop_ids(types.SimpleNamespace(generation_config=config), tokenizer)


def sampling(params: Params, seed: int) -> Sampling:
    """The one place ``Sampling`` is built from ``generation.*``."""
    g = params.generation
    return Sampling(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=seed)


def tokenize_prompts(tokenizer, problems: Sequence[dict]) -> list[list[int]]:
    """Token ids of each prepared ``prompt`` text (already chat-formatted: no special tokens added)."""
    return [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]


def choose_z_c(stats: list[dict], beta_v: float, margin: float, auto: bool) -> int:
    """The index of z_c among the candidates: the steadiest (smallest std) of those whose c_ref leaves room for a
    score of 1 (:func:`laser.score.score_headroom` >= ``margin``). A likely token has a small std but a c_ref
    near 0, where no answer could ever score 1. A named token (``auto`` False) must pass the same test."""
    fits = [j for j, s in enumerate(stats) if score_headroom(s["mean"], beta_v) >= margin]
    if not fits:
        worst = stats[0] if not auto else max(stats, key=lambda s: s["mean"])
        which = f"self_reward.token {worst['token']!r}" if not auto else f"none of the {len(stats)} candidates"
        room = -worst["mean"] - margin  # 1/beta_v may be at most this
        fix = (f"raise self_reward.beta_v to at least {1 / room:.3g}, or " if room > 0 else "") + \
            "name a rarer token in self_reward.token"
        raise StageError(
            f"{which}: c_ref = {worst['mean']:.2f} leaves no room for a score of 1 at beta_v = {beta_v} (it needs "
            f"log pi(z_c) = c_ref + 1/beta_v = {worst['mean'] + 1 / beta_v:.2f} <= -{margin}, "
            f"self_reward.headroom_margin): {fix}")
    return min(fits, key=lambda j: stats[j]["std"])


def self_reward_config(params: Params, reference: dict | None = None) -> tuple[SelfRewardConfig, str | None]:
    """The base model's self-reward config from the ref_constant statistics (``reference``, default: read
    ``paths.ref_constant``) and ``self_reward.*``: z_c chosen by :func:`choose_z_c`, c_ref its mean log-prob,
    beta_v and the loss kind from params. Returns (config, a warning when beta_v * std(log pi_ref(z_c)) exceeds
    ``self_reward.noise_warning``, else None)."""
    sr = params.self_reward
    if reference is None:
        try:
            reference = json.loads(Path(params.paths.ref_constant).read_text())
        except FileNotFoundError:
            raise StageError(f"{params.paths.ref_constant}: not found (run the ref_constant stage)") from None
    if "candidates" not in reference:
        raise StageError(f"{params.paths.ref_constant}: no candidates (written by an older ref_constant stage: "
                         "rerun it, e.g. dvc repro -f -s ref_constant)")
    stats = reference["candidates"]
    z_c = stats[choose_z_c(stats, sr.beta_v, sr.headroom_margin, auto=reference["selection"] == "auto")]
    z_i = reference.get("incorrect_token_id") if sr.loss == "sft" else None
    config = SelfRewardConfig(z_c["token"], z_c["token_id"], z_c["mean"], sr.beta_v, kind=sr.loss, z_i_id=z_i)
    noise = sr.beta_v * z_c["std"]
    warning = None
    if noise > sr.noise_warning:
        warning = (f"z_c {z_c['token']!r}: beta_v * std(log pi_ref) = {noise:.3f} exceeds "
                   f"self_reward.noise_warning {sr.noise_warning}: the self-reward score starts noisy")
    return config, warning


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
