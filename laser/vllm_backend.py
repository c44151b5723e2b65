"""``generation.backend: vllm``: the :class:`laser.generation.Generator` interface over a vLLM worker process.

The engine runs in its own environment (``generation.vllm.python``, set up by ``bash scripts/setup_vllm.sh``;
see laser/vllm_worker.py for why and for the protocol); this side sends token ids and gets token ids and probe
log-probs back, and decodes text with the pipeline's own tokenizer, so the rollout parquet contract is the HF
backend's: ``finish_reason`` "eos" | "length", probe log-probs null when truncated, the final EOS kept.

z_c is read inside the generation request (one forced step after EOS; laser/vllm_worker.py): equal to the HF
backend's full-forward value in fp32 (tests/test_vllm.py) at ~1.03x the cost of plain generation (issue 14).

Sampling differs from the HF backend's draws (vLLM's own sampler, seeded per sample with the same per-sample
seed), so the two backends give different, equally distributed samples.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from laser.config import VLLMParams
from laser.errors import StageError
from laser.generation import Completion, Sampling, sample_seed

SETUP_COMMAND = "bash scripts/setup_vllm.sh"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def engine_kwargs(settings: VLLMParams, model_dir: str | Path, seed: int) -> dict:
    """``vllm.LLM`` keyword arguments from ``generation.vllm``."""
    import torch

    dtype = settings.dtype
    if dtype == "auto":  # bf16 moves CPU z_c log-probs by 0.26-0.38 nats (issue 14): fp32 there
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    kwargs = dict(model=str(Path(model_dir).resolve()), dtype=dtype, seed=seed, max_model_len=settings.max_model_len,
                  enable_prefix_caching=settings.enable_prefix_caching, max_num_seqs=settings.max_num_seqs,
                  tensor_parallel_size=settings.tensor_parallel_size,
                  gpu_memory_utilization=settings.gpu_memory_utilization,
                  enforce_eager=not torch.cuda.is_available(),  # CPU: no graph capture to pay for at start-up
                  use_tqdm_on_load=False)  # the trainer's weight push reloads every step: a progress bar each
    if settings.block_size is not None:
        kwargs["block_size"] = settings.block_size
    return kwargs


class VLLMWorker:
    """The worker process: started on first use, one JSON line per request and per reply, stopped by
    :meth:`close` (or at exit). A reply that does not come within ``timeout_s`` or a worker that exits is a
    :class:`StageError` naming what happened; the worker's own output is in the stage's log (its stderr)."""

    def __init__(self, settings: VLLMParams):
        self.settings = settings
        self.python = Path(settings.python)
        if not self.python.is_absolute():
            self.python = Path.cwd() / self.python
        if not self.python.exists():
            raise StageError(f"generation.backend vllm: the vLLM environment's python {self.python} does not exist "
                             f"(generation.vllm.python): set it up with `{SETUP_COMMAND}`")
        self.process: subprocess.Popen | None = None

    def start(self, engine: dict) -> str:
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), VLLM_CPU_KVCACHE_SPACE=str(
            self.settings.cpu_kvcache_space_gb), VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            VLLM_ENABLE_V1_MULTIPROCESSING="0")  # the engine in the worker process itself: one process less
        env.update(colocated_device(self.settings.tensor_parallel_size))
        self.process = subprocess.Popen([str(self.python), "-m", "laser.vllm_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        return self.call("start", timeout_s=self.settings.start_timeout_s, engine=engine)["vllm"]

    def call(self, op: str, timeout_s: float | None = None, **request) -> dict:
        if self.process is None or self.process.poll() is not None:
            raise StageError(f"the vLLM worker is not running (exit code {self.process and self.process.returncode}"
                             "); its output is in this stage's log")
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout_s)
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise StageError(f"the vLLM worker failed on {op!r}:\n{reply['error']}")
        return reply

    def _read_line(self, timeout_s: float | None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.process.stdout], [], [], wait)
            if ready:
                line = self.process.stdout.readline()
                if line:
                    return line
                code = self.process.wait()
                raise StageError(f"the vLLM worker exited (code {code}); its output is in this stage's log")
            if deadline is not None and time.monotonic() >= deadline:
                self.close()
                raise StageError(f"the vLLM worker did not answer within {timeout_s:.0f} s "
                                 "(generation.vllm.start_timeout_s)")

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.process = None


def colocated_device(tensor_parallel_size: int) -> dict[str, str]:
    """Under a multi-GPU launcher (``LOCAL_RANK`` set) each training rank's engine takes its rank's GPU: the
    ``CUDA_VISIBLE_DEVICES`` entry at ``LOCAL_RANK``. With tensor parallelism > 1 the engine sees every GPU."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or tensor_parallel_size > 1 or not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": devices[int(local_rank) % len(devices)]}


class VLLMGenerator:
    """Rollouts from a vLLM engine over ``model_dir`` (an HF model directory). ``reload(directory)`` replaces
    the engine's weights (the train stage pushes the policy's each step) and resets its prefix cache."""

    def __init__(self, model_dir: str | Path, tokenizer, settings: VLLMParams, stop_token_ids: Sequence[int],
                 seed: int = 0):
        self.tokenizer, self.stop_token_ids = tokenizer, sorted(set(stop_token_ids))
        self.worker = VLLMWorker(settings)
        self.version = self.worker.start(engine_kwargs(settings, model_dir, seed))

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), progress: bool = False,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        jobs = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
        if not jobs:
            return []
        requests = [{"prompt_token_ids": list(prompts[p]), "seed": sample_seed(sampling, seeds, p, k)}
                    for p, k in jobs]
        reply = self.worker.call("generate", requests=requests, temperature=sampling.temperature,
                                 top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                                 stop_token_ids=self.stop_token_ids, probe_token_ids=list(probe_token_ids))
        return [self._completion(prompts, job, output, sampling.max_new_tokens)
                for job, output in zip(jobs, reply["outputs"])]

    def _completion(self, prompts, job, output: dict, budget: int) -> Completion:
        prompt_index, sample_index = job
        response = output["token_ids"]
        probe = output["probe_logprobs"]
        if probe is None:  # truncated: the request ran one step past the budget for a possible z_c step
            response = response[:budget]
        # a stop token in the extra step is past the budget: cut off above, so the sample is truncated, as in HF
        finished = bool(response) and response[-1] in self.stop_token_ids
        return Completion(
            prompt_index=prompt_index, sample_index=sample_index, prompt_token_ids=list(prompts[prompt_index]),
            response_token_ids=list(response), text=self.tokenizer.decode(response, skip_special_tokens=True),
            finish_reason="eos" if finished else "length",
            probe_logprobs={int(t): v for t, v in probe.items()} if probe is not None else None)

    def reload(self, weights_dir: str | Path) -> None:
        self.worker.call("reload", weights_path=str(Path(weights_dir).resolve()))

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

