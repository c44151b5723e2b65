"""The vLLM engine as a worker process, run from the vLLM environment (``.venv-vllm``, scripts/setup_vllm.sh).

vLLM pins transformers and fastapi below what prefect needs, so it cannot live in the pipeline's environment;
the stages stay there and drive this process through :class:`laser.vllm_backend.VLLMGenerator`. It imports
only the standard library, torch and vllm (``laser/__init__.py`` is import-light).

Protocol: one JSON object per line on stdin, one reply per line on the process's original stdout (fd 1 is then
pointed at stderr, so whatever vLLM prints goes to the log, never into the protocol). Every reply has ``ok``;
a failed request answers ``{"ok": false, "error": <traceback>}`` and the worker keeps serving.

- ``{"op": "start", "engine": {...LLM kwargs}}`` -> ``{"ok": true, "vllm": <version>}``
- ``{"op": "generate", "requests": [{"prompt_token_ids", "seed"}], "temperature", "top_p", "max_new_tokens",
  "stop_token_ids", "probe_token_ids"}`` -> ``{"ok": true, "outputs": [{"token_ids", "probe_logprobs"}]}``
- ``{"op": "reload", "weights_path": DIR}`` -> the engine's weights replaced from DIR's safetensors, then its
  prefix cache reset (without the reset, blocks computed by the old weights are reused: scores silently wrong)
- ``{"op": "stop"}``

z_c is scored inside the generation request (issue 14's forced step): :class:`ForceProbeAfterStop` forces the
first probe token once a request's last output token is a stop token; the request runs with ``ignore_eos`` and
stops on the probe token, and ``logprob_token_ids`` reads the probes' log-probs at that step. vLLM takes those
log-probs from the raw logits, before custom logits processors, so the forced token's log-prob is the
unrestricted log π(z_c | x, y, EOS) — the value the HF backend reads after feeding EOS. The same processor
masks the probe token everywhere else (so only the forced step can end a request on it; z_c is an unused
special token, whose probability there is ~e^-15): the response's own tokens are sampled as without it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

# The V1 model runner's logits-processor interface (vllm.v1.sample.logits_processor); Model Runner V2 has another.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

FORCE_KEY = "laser_force_after_stop"  # SamplingParams.extra_args: {"token": probe id, "stop_ids": [...]}


class ForceProbeAfterStop(LogitsProcessor):
    """For requests with ``extra_args[FORCE_KEY]``: after a stop token only the probe token may follow; before
    it, the probe token is masked."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[list[int], int, frozenset[int]]] = {}  # batch row -> (output ids, probe, stops)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(FORCE_KEY)
        if spec is not None and not (isinstance(spec.get("token"), int) and spec.get("stop_ids")):
            raise ValueError(f"extra_args.{FORCE_KEY} needs an int 'token' and a non-empty 'stop_ids'")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get(FORCE_KEY)
            if spec is None:
                self.rows.pop(row, None)
            else:
                self.rows[row] = (output_ids, spec["token"], frozenset(spec["stop_ids"]))
        for source, target, direction in batch_update.moved:
            moving = self.rows.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                other = self.rows.pop(target, None)
                if other is not None:
                    self.rows[source] = other
            if moving is not None:
                self.rows[target] = moving

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (output_ids, probe, stops) in self.rows.items():
            if output_ids and output_ids[-1] in stops:
                value = logits[row, probe].clone()
                logits[row] = float("-inf")
                logits[row, probe] = value
            else:
                logits[row, probe] = float("-inf")
        return logits


class Worker:
    def __init__(self):
        self.llm = None

    def start(self, engine: dict) -> dict:
        import vllm

        # by its importable name, not this __main__'s class: vLLM's engine process may be spawned, not forked
        from laser.vllm_worker import ForceProbeAfterStop as processor

        self.llm = vllm.LLM(logits_processors=[processor], **engine)
        logging.getLogger(ExpectedReloadWarnings.LOGGER).addFilter(ExpectedReloadWarnings())
        return {"vllm": vllm.__version__}

    def generate(self, requests: list[dict], temperature: float, top_p: float, max_new_tokens: int,
                 stop_token_ids: list[int], probe_token_ids: list[int]) -> dict:
        from vllm import SamplingParams, TokensPrompt

        probing = bool(probe_token_ids)

        def params(seed: int) -> SamplingParams:
            common = dict(temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True, detokenize=False)
            if not probing:
                return SamplingParams(max_tokens=max_new_tokens, stop_token_ids=stop_token_ids, **common)
            # one step more than the budget: a response whose EOS is its last allowed token still gets z_c
            return SamplingParams(
                max_tokens=max_new_tokens + 1, stop_token_ids=[probe_token_ids[0]],
                logprob_token_ids=list(probe_token_ids),
                extra_args={FORCE_KEY: {"token": probe_token_ids[0], "stop_ids": stop_token_ids}}, **common)

        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
        results = self.llm.generate(prompts, [params(r["seed"]) for r in requests], use_tqdm=False)
        return {"outputs": [self._output(r.outputs[0], probing, probe_token_ids) for r in results]}

    @staticmethod
    def _output(output, probing: bool, probe_token_ids: list[int]) -> dict:
        token_ids = list(output.token_ids)
        if not probing:
            return {"token_ids": token_ids, "probe_logprobs": None}
        probe = probe_token_ids[0]
        if len(token_ids) >= 2 and token_ids[-1] == probe:  # the forced step after a stop token
            step = output.logprobs[-1]
            return {"token_ids": token_ids[:-1],
                    "probe_logprobs": {str(t): float(step[t].logprob) for t in probe_token_ids}}
        return {"token_ids": token_ids, "probe_logprobs": None}  # truncated: the caller cuts the extra step off

    def reload(self, weights_path: str) -> dict:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
        self.llm.collective_rpc(retie_word_embeddings)
        self.llm.reset_prefix_cache()
        return {}


class ExpectedReloadWarnings(logging.Filter):
    """``reload_weights`` warns "<layer>: Failed to load weights" for layers a checkpoint holds no tensor for by
    design: RotaryEmbedding (its cos/sin cache is computed, never saved) and a tied ParallelLMHead (re-tied right
    after by :func:`retie_word_embeddings`). Said once per train step each, it is noise; other layers still warn."""

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
    EXPECTED = frozenset({"RotaryEmbedding", "ParallelLMHead"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and record.args[0] in self.EXPECTED)


def retie_word_embeddings(worker) -> bool:
    """Tie the LM head to the input embeddings again after ``reload_weights`` (run in each vLLM worker).

    vLLM 0.32's in-place reload loads ``embed_tokens`` but finds nothing to load for a tied ``lm_head`` (the
    checkpoint has no such tensor) and puts the head's *old* tensor back, untying it: the engine then samples
    and scores with the previous step's head (measured on the tiny model after one optimizer step: z_c off by
    0.44 nats, exactly the value of the new body with the old head). The head's weight processing runs again
    after the tie, as at load: on CPU it packs the weight for its GEMM, and the packed copy is what is used."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return False
    head = model.lm_head.tie_weights(model.model.embed_tokens)
    head.quant_method.process_weights_after_loading(head)
    return True

def serve(lines, reply) -> None:
    worker = Worker()
    for line in lines:
        request = json.loads(line)
        op = request.pop("op")
        if op == "stop":
            reply({"ok": True})
            return
        try:
            result = getattr(worker, op)(**request) if op in ("start", "generate", "reload") else None
            if result is None:
                raise ValueError(f"unknown op {op!r}")
            reply({"ok": True, **result})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output goes to stderr: the protocol stream stays clean
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        serve(sys.stdin, reply)
    except BrokenPipeError:
        # the trainer reading the replies is gone (killed): nothing is left to answer. Point the protocol fd at
        # /dev/null so the interpreter's final flush does not raise the same error again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), protocol.fileno())
        print("vllm_worker: the process reading replies closed the pipe; stopping", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
