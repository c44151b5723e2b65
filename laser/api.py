"""Use a trained LaSeR model: load an exported directory, score a response, solve a problem by self-verified voting.

    import laser
    model = laser.load("release")                            # or any HF causal LM dir + self_reward_config=FILE
    model.score("What is 17 + 25?", "17 + 25 = 42. The answer is \\boxed{42}.")   # r_s; clipped > 0.5: verified
    result = model.solve("What is 17 + 25?", k=8)              # k samples, self-reward-weighted majority vote
    result.answer, result.votes, [(s.answer, s.score, s.self_verified) for s in result.samples]

The settings come from the export (laser/model_card.py): ``config.json``'s ``laser`` key, else ``laser.json``, else
the file passed as ``self_reward_config`` (a ``laser.json`` or the base model's ``ref/ref_constant.json``). The
prompt is rendered as in training (laser.data.render_prompt: chat template, instruction, few-shot turns) from the
export's ``prompt`` settings.

Two ways to the same score (README "Contracts"): :meth:`LaserModel.solve` reads log π(z_c | x, y, EOS) in the
generation pass (laser.generation, as the rollout stage does); :meth:`LaserModel.score` scores a given response
with one forward over prompt + response + EOS. Both agree to float precision (tests/test_api.py).

Light to import: torch, transformers and math-verify are imported when a model is loaded or a vote is taken.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laser.errors import ModelError
from laser.model_card import CONFIG_KEY, LASER_JSON, self_reward_config_from

log = logging.getLogger("laser.api")

SELF_VERIFIED_THRESHOLD = 0.5  # a clipped score above this means "self-verified correct"
DEFAULT_MAX_NEW_TOKENS = 512  # when the export does not say (a model without our generation settings)
EQUIVALENCES = ("math", "exact")


# ------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are rendered (as params ``prepare.instruction``, ``prepare.few_shot``, ``prepare.prompt_format``)."""

    instruction: str
    few_shot: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns
    format: str = "chat"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> PromptSettings:
        try:
            turns = tuple((str(t["user"]), str(t["assistant"])) for t in data.get("few_shot", []))
            settings = cls(str(data["instruction"]), turns, str(data.get("format", "chat")))
        except (KeyError, TypeError, AttributeError) as err:
            raise ModelError(f"{where}: the prompt settings need 'instruction' and 'few_shot' as "
                             f"[{{'user', 'assistant'}}, ...] ({type(err).__name__}: {err})") from None
        if settings.format not in ("chat", "plain"):
            raise ModelError(f"{where}: prompt format {settings.format!r} is not 'chat' or 'plain'")
        return settings

    @classmethod
    def training_defaults(cls) -> PromptSettings:
        """The pipeline's default prompt (laser.config.PrepareParams): for a model whose export does not say."""
        from laser.config import PrepareParams
        from laser.model_card import prompt_settings

        return cls.from_dict(prompt_settings(PrepareParams()), "laser.config.PrepareParams")


@dataclass(frozen=True)
class ModelSettings:
    """Everything :func:`load` read about a model besides its weights; ``source`` says where it came from."""

    self_reward: Any  # laser.score.SelfRewardConfig
    prompt: PromptSettings
    generation: dict[str, Any]
    source: str


def _self_reward_from(data: Any, where: str):
    """A :class:`laser.score.SelfRewardConfig` from the laser.json keys, or from the base model's
    ref/ref_constant.json (its candidates' statistics: z_c chosen by laser.runtime.self_reward_config with the
    default params' β_v and headroom margin)."""
    if isinstance(data, dict) and "candidates" in data and "self_reward_token_id" not in data:  # a ref_constant.json
        from laser.config import Params
        from laser.runtime import self_reward_config

        return self_reward_config(Params(), reference=data)[0]
    return self_reward_config_from(data, where)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return data


def read_settings(model_dir: str | Path, self_reward_config: str | Path | None = None) -> ModelSettings:
    """The self-reward and prompt settings of ``model_dir``: ``self_reward_config`` (a file or a dir with a
    ``laser.json``) when given, else ``config.json``'s ``laser`` key, else ``laser.json``; a clear
    :class:`ModelError` naming what to pass when none has them. Prompt settings missing everywhere fall back to
    the pipeline's defaults (with a warning)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist")
    found: list[tuple[dict[str, Any], str]] = []
    if self_reward_config is not None:
        path = Path(self_reward_config)
        path = path / LASER_JSON if path.is_dir() else path
        data = _read_json(path)
        if data is None:
            raise ModelError(f"self-reward config {path} does not exist")
        found.append((data, str(path)))
    config = _read_json(model_dir / "config.json")
    if config is not None and isinstance(config.get(CONFIG_KEY), dict):
        found.append((config[CONFIG_KEY], f"{model_dir / 'config.json'}[{CONFIG_KEY!r}]"))
    laser_json = _read_json(model_dir / LASER_JSON)
    if laser_json is not None:
        found.append((laser_json, str(model_dir / LASER_JSON)))
    if not found:
        raise ModelError(
            f"{model_dir} has no self-reward config: its config.json has no {CONFIG_KEY!r} key and there is no "
            f"{LASER_JSON} (a LaSeR export has both). For another model pass one: --self-reward-config FILE "
            "(Python: self_reward_config=FILE), a laser.json or the base model's ref/ref_constant.json")
    data, source = found[0]
    self_reward = _self_reward_from(data, source)
    prompt_data = next(((d["prompt"], w) for d, w in found if isinstance(d.get("prompt"), dict)), None)
    if prompt_data is None:
        log.warning("%s: no prompt settings saved with the model; rendering prompts with the pipeline's defaults "
                    "(laser.config.PrepareParams)", model_dir)
        prompt = PromptSettings.training_defaults()
    else:
        prompt = PromptSettings.from_dict(*prompt_data)
    generation = next((d["generation"] for d, _ in found if isinstance(d.get("generation"), dict)), {})
    return ModelSettings(self_reward, prompt, dict(generation), source)


# -------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Sample:
    """One sampled answer: ``score`` is r_s (unclipped; None when the response was truncated: no EOS, no score),
    ``self_verified`` is clip(score, 0, 1) > 0.5."""

    index: int
    response: str
    answer: str | None  # the last \\boxed{} content, None when there is none
    score: float | None
    self_verified: bool
    finish_reason: str  # "eos" | "length"
    num_tokens: int


@dataclass(frozen=True)
class Vote:
    """One distinct answer (equivalent answers merged): its samples' count and summed vote weight."""

    answer: str
    count: int
    weight: float  # the sum of clip(score, 0, 1) over its samples


@dataclass(frozen=True)
class Solution:
    """``answer``: the self-reward-weighted majority vote (None when no sample gave an answer); ``votes`` best
    first; ``samples`` in sampling order."""

    problem: str
    answer: str | None
    votes: list[Vote]
    samples: list[Sample] = field(default_factory=list)

    @property
    def self_verified(self) -> bool:
        """Whether a sample with the voted answer verified itself."""
        return any(s.self_verified for s in self.samples if s.answer is not None and s.answer == self.answer)

    def to_dict(self) -> dict[str, Any]:
        return {"problem": self.problem, "answer": self.answer, "self_verified": self.self_verified,
                "votes": [asdict(v) for v in self.votes], "samples": [asdict(s) for s in self.samples]}


def exact_equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Answers that differ after normalisation (and as numbers) are different: no math-verify."""
    return [False] * len(pairs)


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float | None],
                  equivalence: str = "math") -> tuple[int, list[Vote]]:
    """(the index of the sample whose answer wins, -1 when none answered; the votes, best first).

    Answers are clustered by laser.answers.cluster_answers (exact after normalisation, numbers numerically, then
    ``equivalence``: "math" = in-process math-verify, "exact" = nothing more); each sample votes with
    clip(score, 0, 1) (laser.metrics.vote: ties go to more votes, then to the earliest sample)."""
    import numpy as np

    from laser.answers import cluster_answers, math_verify_equivalent
    from laser.metrics import clip_scores, vote

    if equivalence not in EQUIVALENCES:
        raise ValueError(f"equivalence {equivalence!r}: allowed {EQUIVALENCES}")
    equivalent = math_verify_equivalent if equivalence == "math" else exact_equivalent
    (ids,), _pairs = cluster_answers([list(answers)], equivalent)
    weights = clip_scores([np.nan if s is None else s for s in scores])
    winner = int(vote(np.array([ids]), weights[None, :])[0]) if ids else -1
    clusters: dict[int, list[int]] = {}
    for i, c in enumerate(ids):
        if c >= 0:
            clusters.setdefault(c, []).append(i)
    votes = [Vote(str(answers[members[0]]).strip(), len(members), round(float(weights[members].sum()), 6))
             for members in clusters.values()]
    votes.sort(key=lambda v: (-v.weight, -v.count))  # stable: then first appearance
    if winner >= 0:  # laser.metrics.vote decides ties (it rounds weights); keep its winner first
        win = str(answers[winner]).strip()
        votes.sort(key=lambda v: v.answer != win)
    return winner, votes


# ---------------------------------------------------------------------------------------------------------- model


class LaserModel:
    """A loaded model with its self-reward settings; see the module docstring."""

    def __init__(self, model, tokenizer, settings: ModelSettings, model_dir: str | Path):
        self.model, self.tokenizer, self.settings, self.model_dir = model, tokenizer, settings, Path(model_dir)
        self.self_reward = settings.self_reward
        vocab = model.get_output_embeddings().weight.shape[0]
        bad = [i for i in self.self_reward.probe_token_ids if not 0 <= i < vocab]
        if bad:
            raise ModelError(f"{settings.source}: self-reward token id(s) {bad} are outside this model's "
                             f"vocabulary (size {vocab}): the config belongs to another model")

    # --------------------------------------------------------------------------------------------- prompts

    def render(self, problem: str) -> str:
        """The prompt text for ``problem``, rendered as the training prompts were."""
        from laser.config import FewShotTurn
        from laser.data import render_prompt

        p = self.settings.prompt
        turns = [FewShotTurn(user, assistant) for user, assistant in p.few_shot]
        return render_prompt(problem, p.instruction, turns, self.tokenizer, p.format)[1]

    def prompt_ids(self, problem: str) -> list[int]:
        """Token ids of the rendered prompt (no special tokens added: the template has them), as the pipeline."""
        return self.tokenizer(self.render(problem), add_special_tokens=False)["input_ids"]

    @property
    def stop_token_ids(self) -> list[int]:
        from laser.generation import default_stop_ids

        return default_stop_ids(self.model, self.tokenizer)

    # --------------------------------------------------------------------------------------------- scoring

    def score(self, problem: str, response: str, *, rendered: bool = False) -> float:
        """r_s of ``response`` (text) to ``problem`` (rendered as in training; ``rendered=True``: ``problem`` is
        the full prompt text already): one forward over prompt + response + EOS."""
        prompt_ids = (self.tokenizer(problem, add_special_tokens=False)["input_ids"] if rendered
                      else self.prompt_ids(problem))
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return self.score_ids(prompt_ids, response_ids)

    def score_ids(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
        """r_s from token ids; an EOS is appended unless ``response_ids`` ends with one (a rollout's ids do)."""
        from laser.generation import full_forward_probe_logprobs

        response_ids = list(response_ids)
        stops = self.stop_token_ids
        if not response_ids or response_ids[-1] not in stops:
            eos = self.tokenizer.eos_token_id
            response_ids.append(eos if eos is not None else stops[0])
        probe_ids = self.self_reward.probe_token_ids
        values = full_forward_probe_logprobs(self.model, list(prompt_ids), response_ids, probe_ids)
        return float(self.self_reward.score(dict(zip(probe_ids, values))))

    # --------------------------------------------------------------------------------------------- solving

    def solve(self, problem: str, k: int = 8, *, temperature: float | None = None, top_p: float | None = None,
              max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 16,
              equivalence: str = "math", progress: bool = False) -> Solution:
        """Sample ``k`` answers (scored in the generation pass) and take the self-reward-weighted majority vote.
        Sampling defaults are the export's training settings (``generation``), else T = 1, top-p 1 and
        ``DEFAULT_MAX_NEW_TOKENS``."""
        from laser.boxes import last_boxed
        from laser.config import GenerationParams, Params
        from laser.metrics import clip_scores
        from laser.runtime import make_generator, sampling

        if k < 1:
            raise ValueError(f"k = {k}: at least 1 sample is needed")
        g = self.settings.generation
        params = Params(generation=GenerationParams(  # the pipeline's factories build generator and Sampling
            temperature=float(g.get("temperature", 1.0) if temperature is None else temperature),
            top_p=float(g.get("top_p", 1.0) if top_p is None else top_p),
            max_new_tokens=int(g.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS) if max_new_tokens is None
                               else max_new_tokens),
            batch_size=batch_size))
        generator = make_generator(params, self.model, self.tokenizer)
        completions = generator.generate([self.prompt_ids(problem)], k, sampling(params, seed),
                                         probe_token_ids=self.self_reward.probe_token_ids, progress=progress)
        scores = [self.self_reward.score(c.probe_logprobs) for c in completions]
        clipped = clip_scores([float("nan") if s is None else s for s in scores])
        samples = [Sample(index=c.sample_index, response=c.text, answer=last_boxed(c.text), score=s,
                          self_verified=s is not None and bool(w > SELF_VERIFIED_THRESHOLD),
                          finish_reason=c.finish_reason, num_tokens=len(c.response_token_ids))
                   for c, s, w in zip(completions, scores, clipped)]
        winner, votes = weighted_vote([s.answer for s in samples], scores, equivalence)
        answer = samples[winner].answer if winner >= 0 else None
        return Solution(problem, answer, votes, samples)


def load(model_dir: str | Path, self_reward_config: str | Path | None = None, *, dtype: str = "float32",
         device: str | None = None, trust_remote_code: bool = False) -> LaserModel:
    """Load an exported model directory (ours, or any HF causal LM with ``self_reward_config``: a laser.json or
    a ref_constant.json). ``dtype``: float32 (default, as params ``model.dtype``: scores match the pipeline's),
    bfloat16 or auto; ``device``: default CUDA when available, else CPU."""
    settings = read_settings(model_dir, self_reward_config)  # before any weights: a missing config fails fast
    model_dir = Path(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"model directory {model_dir} has no *.safetensors file (only safetensors are loaded)")
    import torch

    from laser.models import load_model, load_tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_model(model_dir, dtype, trust_remote_code, device)
    return LaserModel(model, tokenizer, settings, model_dir)
