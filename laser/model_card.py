"""An export that explains itself: the self-reward settings inside ``config.json``, ``laser.json`` and a model card.

What the train stage writes beside the weights (see README "Contracts"):

- ``config.json`` carries the settings under one key, :data:`CONFIG_KEY` (``"laser"``), so a plain
  ``AutoModelForCausalLM.from_pretrained(dir)`` has them in ``model.config.laser``::

      {"self_reward_token": "<|z_c|>", "self_reward_token_id": 259, "c_ref": -11.5, "beta_v": 0.1,
       "loss": "mse", ["incorrect_token_id": 260,]   # "sft" and z_i: the SFT ablation only
       "prompt": {"instruction": "...", "few_shot": [{"user": "...", "assistant": "..."}], "format": "chat"},
       "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48}}

- ``laser.json``: the same dict (its first four keys are the historical ``laser.json``; readers that know only
  those ignore the rest); :func:`self_reward_config_from` is its one reader;
- ``README.md``: a model card (base model, training data and steps, the train-time numbers, how to score and vote).

:mod:`laser.api` reads these back. Light: no transformers, no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from laser.config import GenerationParams, Params, PrepareParams
from laser.errors import ModelError
from laser.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from laser.score import SelfRewardConfig  # imports torch: `import laser.api` stays light without it

CONFIG_KEY = "laser"  # the key of config.json that holds the settings
LASER_JSON = "laser.json"
CARD_FILE = "README.md"
SELF_REWARD_KEYS = ("self_reward_token", "self_reward_token_id", "c_ref", "beta_v")  # required, in this order
HUB_NAMES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # built-in names -> hub ids


def prompt_settings(prepare: PrepareParams) -> dict[str, Any]:
    """How the training prompts were rendered (laser.data.render_prompt): instruction, few-shot turns, format."""
    return {"instruction": prepare.instruction,
            "few_shot": [{"user": t.user, "assistant": t.assistant} for t in prepare.few_shot],
            "format": prepare.prompt_format}


def export_settings(self_reward_config, prepare: PrepareParams, generation: GenerationParams) -> dict[str, Any]:
    """The dict stored under ``config.json[CONFIG_KEY]`` and as ``laser.json``. ``self_reward_config``: a
    :class:`laser.score.SelfRewardConfig` (z_c, its id, c_ref, β_v; z_i for the SFT ablation)."""
    return {**laser_json(self_reward_config), "prompt": prompt_settings(prepare),
            "generation": {"temperature": generation.temperature, "top_p": generation.top_p,
                           "max_new_tokens": generation.max_new_tokens}}


def self_reward_config_from(data: object, where: str) -> SelfRewardConfig:
    """The laser.json keys (``SELF_REWARD_KEYS``; ``loss`` and, for the sft ablation, ``incorrect_token_id``)
    -> a :class:`SelfRewardConfig`; a :class:`ModelError` naming ``where`` and what is wrong otherwise. The one
    reader of that contract: the rollout stage and ``laser.load`` both come here."""
    from laser.score import SelfRewardConfig

    if not isinstance(data, dict):
        raise ModelError(f"{where}: the self-reward settings are not a JSON object")
    missing = [k for k in SELF_REWARD_KEYS if k not in data]
    if missing:
        raise ModelError(f"{where}: the self-reward settings lack {missing} (they need {list(SELF_REWARD_KEYS)})")
    try:
        z_i = None if data.get("incorrect_token_id") is None else int(data["incorrect_token_id"])
        kind = data.get("loss", "mse" if z_i is None else "sft")  # exports before "loss" was written: inferred
        return SelfRewardConfig(str(data["self_reward_token"]), int(data["self_reward_token_id"]),
                                float(data["c_ref"]), float(data["beta_v"]), kind=kind, z_i_id=z_i)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{where}: bad self-reward settings ({err})") from None


def laser_json(config: SelfRewardConfig) -> dict:
    """The ``laser.json`` contract keys of ``config``: SELF_REWARD_KEYS, the loss kind, z_i's id for sft."""
    data = {"self_reward_token": config.z_c_token, "self_reward_token_id": config.z_c_id, "c_ref": config.c_ref,
            "beta_v": config.beta_v, "loss": config.kind}
    return data if config.z_i_id is None else {**data, "incorrect_token_id": config.z_i_id}


def write_export_files(out_dir: str | Path, settings: dict[str, Any], card: str) -> None:
    """``laser.json`` (the settings) and ``README.md`` (the card) in ``out_dir``; config.json gets the settings
    from ``model.config.laser`` at ``save_pretrained`` (the caller sets it, see stages/train.py)."""
    atomic_write_json(Path(out_dir) / LASER_JSON, settings)
    atomic_write_text(Path(out_dir) / CARD_FILE, card)


# ------------------------------------------------------------------------------------------------------ model card


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _pipes(value: Any) -> str:
    """A table cell's text: ``|`` escaped (a z_c such as ``<|z_c|>`` would split the cell, code span or not)."""
    return str(value).replace("|", "\\|")


def _base_model(name: str) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id for the card's metadata or None)."""
    if name in HUB_NAMES:
        return f"`{HUB_NAMES[name]}` (the pipeline's built-in `{name}`)", HUB_NAMES[name]
    if "/" in name and not Path(name).exists() and name.count("/") == 1:
        return f"`{name}`", name
    return f"`{name}`", None


TRAIN_ROWS = (("final_reward_mean", "reward (verifier) at the last step"),
              ("last_quarter_reward_mean", "reward, mean over the last quarter of the steps"),
              ("final_sv_f1", "self-verification F1 at the last step"),
              ("last_quarter_sv_f1", "self-verification F1, last quarter"),
              ("final_sv_acc_correct", "self-verification accuracy on correct answers, last step"),
              ("final_sv_acc_incorrect", "self-verification accuracy on incorrect answers, last step"),
              ("final_self_reward_mse", "self-reward MSE at the last step"))


def render_model_card(params: Params, variant: str, settings: dict[str, Any], train_rows: int | None,
                      train_metrics: dict[str, Any] | None = None, eval_metrics: dict[str, Any] | None = None,
                      model_dir: str | None = None) -> str:
    """The export's README.md. ``train_metrics``: train/<variant>/metrics.json (``stages.train.final_metrics``);
    ``eval_metrics``: eval/metrics.json when it belongs to this model (the train stage runs before evaluate, so
    it passes None and the card points to the report instead). ``params``: as ``variant`` sees them
    (``Params.for_variant``)."""
    model_dir = model_dir or params.paths.trained(variant).model
    base, hub_id = _base_model(params.model.name)
    t, sr = params.train, params.self_reward
    method = "LaSeR" if sr.enabled else "GRPO only (self_reward.enabled: false; the score is untrained)"
    front = ["---", "library_name: transformers", "tags:", "- laser", "- self-rewarding", "- grpo"]
    if hub_id:
        front += [f"base_model: {hub_id}"]
    front += ["---", ""]
    data = f"`{params.paths.train_data}`" + (f" ({train_rows} problems)" if train_rows is not None else "")
    lines = [
        *front,
        f"# {Path(model_dir).name}: {method}",
        "",
        "A causal LM trained with LaSeR (Last-Token Self-Rewarding RL, arXiv 2510.14943): besides answering, it "
        "scores its own answer in one token. After the response's EOS the log-probability of the token "
        f"z_c = `{settings['self_reward_token']}` gives the self-reward score "
        "r_s = β_v · (log π(z_c | x, y, EOS) − c_ref); clipped to [0, 1], a score > 0.5 means "
        "\"self-verified correct\", and the scores weight majority voting over samples.",
        "",
        "## Training",
        "",
        f"- base model: {base}",
        f"- training data: {data}",
        f"- steps: {t.steps} ({t.prompts_per_step} prompts × {t.group_size} samples per step, lr {t.lr:g}, "
        f"{t.lr_schedule} schedule, ZeRO-{t.zero_stage})",
        f"- self-reward: loss `{sr.loss}`, α = {sr.alpha:g}, β_v = {sr.beta_v:g}, τ = {sr.tau:g}, "
        f"warm-ups w_r = {sr.warmup_rl_steps}, w_sr = {sr.warmup_self_reward_steps}",
        f"- generation: temperature {params.generation.temperature:g}, top-p {params.generation.top_p:g}, "
        f"at most {params.generation.max_new_tokens} new tokens",
        "",
        "## Self-reward settings",
        "",
        f"`config.json` key `{CONFIG_KEY}` (and `{LASER_JSON}`, the same dict):",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| {k} | `{_pipes(settings[k])}` |" for k in (*SELF_REWARD_KEYS, "incorrect_token_id") if k in settings),
        f"| prompt format | `{settings['prompt']['format']}`, {len(settings['prompt']['few_shot'])} few-shot "
        "turn(s), instruction below |",
        "",
        f"Instruction: {settings['prompt']['instruction']}",
        "",
        "## Results",
        "",
    ]
    if train_metrics:
        run = params.paths.trained(variant)
        lines += [f"During training (π_old's rollouts of each step; `{run.metrics}`, per step in `{run.steps}`):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {_fmt(train_metrics.get(key))} |" for key, label in TRAIN_ROWS
                  if key in train_metrics]
        lines.append("")
    lines += _eval_lines(eval_metrics, params)
    lines += [
        "## Use it",
        "",
        "```python",
        "import laser",
        f"model = laser.load(\"{model_dir}\")",
        "model.score(\"What is 17 + 25?\", \"17 + 25 = 42. The answer is \\\\boxed{42}.\")  # > 0.5: self-verified",
        "result = model.solve(\"What is 17 + 25?\", k=8)  # k samples, self-reward-weighted majority vote",
        "print(result.answer, result.votes)",
        "```",
        "",
        f"Or: `laser solve --model {model_dir} --k 8 \"What is 17 + 25?\"` (`--json` for machines), "
        f"`laser score --model {model_dir} --problem ... --response ...`. A plain "
        f"`AutoModelForCausalLM.from_pretrained` works too: the settings are in `model.config.{CONFIG_KEY}`.",
        "",
    ]
    return "\n".join(lines)


def _eval_lines(eval_metrics: dict[str, Any] | None, params: Params) -> list[str]:
    if not eval_metrics:
        return [f"Evaluation on the held-out sets (accuracy, maj@K / self-reward-weighted maj@K, self-verification "
                f"F1, AUROC, ECE; base vs trained) is written by the evaluate stage after this export: see "
                f"`{params.paths.eval_report}` and `{params.paths.eval_metrics}`.", ""]
    view = eval_metrics.get("headline_view", "macro")
    lines = [f"Evaluation (`{params.paths.eval_metrics}`, headline `{view}`):", "", "| model | metric | value |",
             "|---|---|---|"]
    for model, mm in eval_metrics.get("models", {}).items():
        head = mm.get("headline", {}).get(view, {})
        lines += [f"| {model} | {key} | {_fmt(value)} |" for key, value in head.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return [*lines, ""]


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file's dict, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
