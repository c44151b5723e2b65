"""Rollouts from the policy being trained: the train stage's generator, always at the trainer's current weights.

Two implementations behind one ``generate`` (the :class:`laser.generation.Generator` call), built by
:func:`open_policy_generator`:

- :class:`InProcessPolicyGenerator` (``generation.backend: hf``): the HF decode loop over the DeepSpeed module
  itself, ZeRO-3 parameters gathered for the duration (laser.engine.gathered_for_generation).
- :class:`VLLMPolicyGenerator` (``generation.backend: vllm``): a colocated vLLM engine; before each generation
  the policy's weights are written, one gathered parameter at a time, as safetensors shards under
  ``generation.vllm.weight_sync_dir`` (RAM on Linux: /dev/shm) and the engine reloads them and resets its prefix
  cache. Departure from TRL/OpenRLHF on GPU, which hand each gathered parameter straight to vLLM's
  ``load_weights`` in the same process or over NCCL: the engine here lives in its own process and
  environment, so weights cross as files; on CPU that is also the only path that works (vLLM's CPU backend
  repacks its linear weights, and ``load_weights`` of raw tensors fails there; issue 14).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from laser import engine as ds
from laser.config import Params
from laser.generation import Completion, Sampling
from laser.runtime import make_generator, vllm_generator


class InProcessPolicyGenerator:
    def __init__(self, engine, make_generator):
        self.engine, self.make_generator = engine, make_generator
        self.last_sync_seconds = 0.0

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), seeds: Sequence[int] | None = None) -> list[Completion]:
        with ds.gathered_for_generation(self.engine) as model:
            model.eval()
            return self.make_generator(model).generate(prompts, num_samples, sampling,
                                                       probe_token_ids=probe_token_ids, seeds=seeds)

    def close(self) -> None:
        pass


class VLLMPolicyGenerator:
    def __init__(self, engine, vllm_generator, sync_root: str | Path, rank: int = 0):
        self.engine, self.vllm = engine, vllm_generator
        # one directory per checkout and rank, not per process: a killed run's retry reuses (and then removes) it
        # rather than leaving a model-sized copy in RAM-backed /dev/shm
        checkout = hashlib.sha256(str(Path.cwd().resolve()).encode()).hexdigest()[:12]
        self.sync_dir = Path(sync_root) / f"laser-policy-{checkout}-rank{rank}"
        self.last_sync_seconds = 0.0

    def sync(self) -> None:
        """Push the trainer's current weights into the engine (every rank: the gather is collective)."""
        start = time.perf_counter()
        ds.write_policy_weights(self.engine, self.sync_dir)
        self.vllm.reload(self.sync_dir)
        self.last_sync_seconds = time.perf_counter() - start

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), seeds: Sequence[int] | None = None) -> list[Completion]:
        self.sync()
        return self.vllm.generate(prompts, num_samples, sampling, probe_token_ids=probe_token_ids, seeds=seeds)

    def close(self) -> None:
        # the model-sized copy in RAM goes first: stopping the engine may wait (up to 30 s) on a worker that a
        # killed run's KILL then interrupts
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        self.vllm.close()


@contextlib.contextmanager
def open_policy_generator(params: Params, engine, tokenizer, model_dir: str | Path, seed: int = 0, rank: int = 0):
    """The train stage's generator at the trainer's current weights (laser.policy_generation), switching on
    ``generation.backend``; a vLLM engine is started over ``model_dir`` (the base model: its weights are replaced
    before every generation) and stopped on exit."""
    if params.generation.backend == "hf":
        yield InProcessPolicyGenerator(engine, lambda model: make_generator(params, model, tokenizer))
        return
    policy = VLLMPolicyGenerator(engine, vllm_generator(params, model_dir, tokenizer, seed),
                                 params.generation.vllm.weight_sync_dir, rank)
    try:
        yield policy
    finally:
        policy.close()
