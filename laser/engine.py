"""DeepSpeed plumbing: the config built from params, process-group set-up, and ZeRO-3 parameter gathering.

Everything ``torch.distributed`` lives here and in laser/trainer.py; the core math never sees it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from laser.batch import PolicyModel
from laser.config import TrainParams
from laser.errors import StageError
from laser.models import resolve_compute_dtype, resolve_dtype

log = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group: gloo on CPU, nccl on GPU. Returns (rank, world_size).

    Launched by ``torchrun`` / ``deepspeed`` the env vars are set; a plain ``python -m`` run is a world of 1.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group. Without it a gloo rank can abort at interpreter exit ("terminate called without
    an active exception": its threads outlive the objects they use), failing a run whose work is all done."""
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        _unlink_shm_allreduce_buffer(rank)


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's segment of DeepSpeed's CPU shared-memory all-reduce. DeepSpeed creates it when all
    ranks are local (its launcher sets LOCAL_SIZE) and never unlinks it: each run left one workspace per rank in
    RAM-backed /dev/shm. Every peer mapped it at start-up, so unlinking at the end breaks no one."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")  # DeepSpeed's shm.cpp: SHM_BUFFER_NAME_uid_addr_port_rank
    Path("/dev/shm", name).unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ZeRO-3's reduce bucket is allocated whole and gradients are copied into it: at DeepSpeed's default (5e8
# elements) it held all 135M fp32 gradients a second time. 2e7 (80 MB fp32): -330 MB peak RSS in a one-step probe
# on the bench batch (bench/results/train_step_memory.json has the breakdown after the change).
REDUCE_BUCKET_ELEMENTS = 2 * 10**7


def deepspeed_config(train: TrainParams, dtype: str, world_size: int) -> dict:
    """The DeepSpeed config for ``train`` (ZeRO stage, precision, batch geometry, clipping, offload)."""
    micro = train.micro_batch_size
    accumulation = max(1, train.mini_batch_size // (micro * world_size))
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Persistent parameters stay whole on every rank (no gather per forward). A world of 1 has nothing to
        # partition, so all are; otherwise DeepSpeed's default (tensors under 1e5 elements: norms, biases).
        # DeepSpeed's memory-efficient linear (an autograd Function replacing F.linear, so that backward does not
        # hold gathered weights) only helps partitioned weights: with none, torch's linear is 5% faster and
        # peaks 0.5 GB lower (bench/results/train_step_fp32_avx2.json, laser_fp32_native_linear).
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    stage3_param_persistence_threshold=10**12 if world_size == 1 else 10**5,
                    memory_efficient_linear=world_size > 1,
                    reduce_bucket_size=REDUCE_BUCKET_ELEMENTS)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": 0.0 if train.grad_clip is None else train.grad_clip,  # DeepSpeed's 0 means off
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_dtype(dtype) == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(train: TrainParams):
    """Multiplier of the base LR at optimizer step ``i`` (0-based): linear warm-up then constant/cosine/linear."""
    total = train.steps * train.ppo_epochs * (train.rollouts_per_step // train.mini_batch_size)

    def factor(i: int) -> float:
        if i < train.warmup_steps:
            return (i + 1) / train.warmup_steps
        progress = (i - train.warmup_steps) / max(1, total - train.warmup_steps)
        if train.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if train.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def build_optimizer(model: torch.nn.Module, train: TrainParams):
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "cpu_adam":
        if not train.offload_optimizer and torch.cuda.is_available():  # DeepSpeed puts the model on the GPU
            raise StageError("train.optimizer cpu_adam keeps its state on the CPU: with the model on a GPU set "
                             "train.offload_optimizer: true, or use train.optimizer: adamw")
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-built once into TORCH_EXTENSIONS_DIR (~60 s)

        return DeepSpeedCPUAdam(params, lr=train.lr, weight_decay=train.weight_decay, adamw_mode=True)
    # fused: one pass over weights, gradients and both moments (torch's CPU default loops over elementwise ops,
    # each a pass over 135M floats): 0.89x the update step, 0.7 GB lower peak (bench/results/train_step_fp32_avx2.json)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)


def initialize(model: torch.nn.Module, train: TrainParams, dtype: str, world_size: int):
    """``deepspeed.initialize`` over ``model`` (a HF causal LM) wrapped as a :class:`laser.batch.PolicyModel`
    (the LM head only where the losses read it, ``train.compute_dtype`` autocast), with the params' config,
    optimizer and LR schedule; returns the engine. ``engine.module.causal_lm`` is the HF model."""
    import warnings

    import deepspeed

    # DeepSpeed 0.19 calls torch.distributed's deprecated reduce_scatter_tensor at every backward (a FutureWarning
    # per step) and all_gather_into_tensor at every gather (each step's weight push to vLLM): not ours
    for deprecated in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=f".*{deprecated}.* is deprecated", category=FutureWarning)
    if train.gradient_checkpointing:  # recompute each layer in backward: activations stop dominating memory
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    compute_dtype = resolve_compute_dtype(train.compute_dtype)
    log.info("training forward in %s (train.compute_dtype: %s)", compute_dtype, train.compute_dtype)
    model = PolicyModel(model, train.logits_chunk, compute_dtype)
    optimizer = build_optimizer(model, train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(train, dtype, world_size))
    return engine


@contextlib.contextmanager
def gathered_for_generation(engine) -> Iterator[torch.nn.Module]:
    """The full model, ZeRO-3 parameters gathered and its partition hooks removed, for fast generation.

    Decoding through the hooks re-gathers every layer at every step (~3x slower here). Pending prefetches
    are released first: gathering a parameter still in flight fails with "Cannot partition a param in flight".
    For ZeRO stages < 3 the module is yielded as is. Yields the HF causal LM (``engine.module.causal_lm``).
    """
    import deepspeed

    model = getattr(engine.module, "causal_lm", engine.module)
    if engine.zero_optimization_stage() != 3:
        yield model
        return
    offload = engine.optimizer.parameter_offload
    engine.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:
            offload.setup_zero_stage3_hooks()


def write_policy_weights(engine, directory: str | Path, shard_bytes: int = 256 * 2**20) -> list[Path]:
    """The policy's weights as HF-named safetensors shards in ``directory`` (what a vLLM engine reloads), each
    parameter gathered on its own: under ZeRO-3 no rank ever holds more than one parameter plus one shard of
    ``shard_bytes`` beyond its partition. Every rank must call it (a gather is collective); each writes its own
    ``directory``. Shards are written by rename; a stale shard of an earlier, larger write is removed."""
    import deepspeed
    from safetensors.torch import save_file

    model = getattr(engine.module, "causal_lm", engine.module)
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:
        engine.empty_partition_cache()  # a parameter still in flight from a prefetch cannot be gathered
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        path = directory / f"policy-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        written.append(path)
        shard.clear()

    for name, param in model.named_parameters():  # a tied weight is listed once (vLLM re-ties it)
        with deepspeed.zero.GatheredParameters([param]) if zero3 else contextlib.nullcontext():
            shard[name] = param.detach().to("cpu", copy=True).contiguous()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    for stale in set(directory.glob("policy-*.safetensors")) - set(written):
        stale.unlink()
    return written
