"""params.yaml validation: every bad value fails at load with the key path, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from laser.config import Params, ParamsError, apply_profile, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_and_profiles_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        assert isinstance(load_params(ROOT / "params.yaml", profile=profile), Params)


def test_empty_file_gives_defaults(tmp_path):
    params = load_params(_write(tmp_path, {}))
    assert params.self_reward.beta_v == 0.1 and params.self_reward.alpha == 0.1
    assert params.self_reward.tau == 0.1 and params.self_reward.std_threshold == 0.1


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"self_reward": {"tau": 1.5}}, ["self_reward.tau", "1.5", "[0, 1]"]),
        ({"self_reward": {"beta_v": 0}}, ["self_reward.beta_v", "0", "> 0"]),
        ({"self_reward": {"beta_v": -0.1}}, ["self_reward.beta_v", "-0.1"]),
        ({"train": {"group_size": 1}}, ["train.group_size", "1", ">= 2"]),
        ({"train": {"lr": "fast"}}, ["train.lr", "'fast'", "a finite number"]),
        ({"train": {"lr": float("inf")}}, ["train.lr", "inf", "a finite number"]),
        ({"train": {"offload_optimizer": True}}, ["train.optimizer", "'adamw'", "cpu_adam when"]),
        ({"train": {"offload_optimizer": True, "optimizer": "cpu_adam", "zero_stage": 0}},
         ["train.zero_stage", "1, 2 or 3 when"]),
        ({"paths": {"eval_report": "/tmp/report.md"}}, ["paths.eval_report", "relative to the project root"]),
        ({"paths": {"rollouts_dir": "../rollouts"}}, ["paths.rollouts_dir", "without '..'"]),
        ({"paths": {"train_data": " "}}, ["paths.train_data", "a non-empty path"]),
        ({"paths": {"rollouts_dir": "."}}, ["paths.rollouts_dir", "relative to the project root"]),
        ({"train": {"lr": 10**400}}, ["train.lr", "a finite number"]),
        ({"train": {"steps": 2.5}}, ["train.steps", "2.5", "an integer"]),
        ({"train": {"stepz": 3}}, ["unknown key train.stepz", "allowed keys", "steps"]),
        ({"nonsense": 1}, ["unknown key nonsense"]),
        ({"self_reward": {"loss": "bce2"}}, ["self_reward.loss", "'bce2'", "'mse' | 'sft'"]),
        ({"self_reward": {"loss": "sft"}}, ["self_reward.incorrect_token", "None"]),
        ({"generation": {"backend": "tgi"}}, ["generation.backend", "'hf'"]),
        ({"prepare": {"train": {"kind": "jsonl"}}}, ["prepare.train.path", "a file path"]),
        ({"prepare": {"train": {"path": "x.jsonl"}}}, ["missing required key prepare.train.kind"]),
        ({"prepare": {"eval_sets": {"a": {"kind": "synthetic", "operators": ["/"]}}}},
         ["prepare.eval_sets.a.operators"]),
        ({"train": {"prompts_per_step": 3, "group_size": 4, "mini_batch_size": 8}},
         ["train.mini_batch_size", "8", "divisor of prompts_per_step * group_size = 12"]),
        ({"train": {"adv_eps": 0}}, ["train.adv_eps", "a number > 0"]),
        ({"prepare": {"train": {"kind": "synthetic", "limit": 10}}}, ["prepare.train.limit", "num_problems"]),
        ({"train": {"grad_clip": 0}}, ["train.grad_clip", "null for no clipping"]),
        ({"train": {"weight_decay": -0.1}}, ["train.weight_decay", "a number >= 0"]),
        ({"train": {"warmup_steps": -1}}, ["train.warmup_steps", "an int >= 0"]),
        ({"rollout": {"samples_per_problem": 0}}, ["rollout.samples_per_problem", "an int > 0"]),
        ({"rollout": {"models": ["base"]}}, ["rollout.models"]),  # unknown key: the models are dvc.yaml's foreach
        ({"model": {"trust_remote_code": "yes"}}, ["model.trust_remote_code", "true or false"]),
    ],
)
def test_bad_params_fail_with_key_value_and_allowed(tmp_path, data, fragments):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, data))
    message = str(err.value)
    assert str(tmp_path / "params.yaml") in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen(tmp_path):
    params = load_params(_write(tmp_path, {}))
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_apply_profile_merges_and_validates(tmp_path):
    params_path = _write(tmp_path, {"train": {"steps": 5, "lr": 1e-5}})
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"train": {"steps": 2}}))
    params = apply_profile(params_path, profile)
    assert params.train.steps == 2 and params.train.lr == 1e-5
    assert yaml.safe_load(params_path.read_text())["train"] == {"steps": 2, "lr": 1e-5}
    profile.write_text(yaml.safe_dump({"train": {"steps": 0}}))
    with pytest.raises(ParamsError, match=r"train\.steps"):
        apply_profile(params_path, profile)
    assert yaml.safe_load(params_path.read_text())["train"]["steps"] == 2  # untouched on failure
