"""params.yaml validation: every bad value fails at load with the key path, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from laser.config import Params, apply_profile, load_params
from laser.errors import ParamsError

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
        ({"train": {"steps": 10**400}}, ["train.steps", "1329 bits", "magnitude <= 2**63 - 1"]),
        ({"train": {"checkpoint_every": 2**63}}, ["train.checkpoint_every", "magnitude <= 2**63 - 1"]),
        # outputs must not be project files (a stage replaces its outputs) nor nested in each other
        ({"paths": {"data_rejects": "stages/prepare.py"}}, ["paths.data_rejects", "outside the project's own files"]),
        ({"paths": {"data_stats": "params.yaml"}}, ["paths.data_stats", "'params.yaml'", "project's own files"]),
        ({"paths": {"eval_plots": "./dvc.yaml"}}, ["paths.eval_plots", "project's own files"]),
        ({"paths": {"eval_report": ".git/HEAD"}}, ["paths.eval_report", "project's own files"]),
        ({"paths": {"eval_data_dir": "data"}}, ["paths.train_data", "inside, paths.eval_data_dir = 'data'"]),
        ({"paths": {"eval_metrics": "train/metrics.json"}}, ["paths.eval_metrics", "paths.train_dir"]),
            # training variants: names, known keys, the released one exists
            ({"variants": {"base": {}}}, ["variants.base", "not 'base'"]),
            ({"variants": {"laser": {}, "grpo": {"self_reward": {"enabld": False}}}},
             ["variants.grpo.self_reward.enabld", "allowed keys here"]),
            ({"variants": {"laser": {"train": {"lr": "fast"}}}}, ["variants.laser.train.lr", "a finite number"]),
            ({"variants": {"laser": {"rollout": {}}}}, ["variants.laser.rollout", "allowed keys here: self_reward,"]),
            ({"variants": {"grpo": {}}}, ["package.variant", "one of the variants: grpo"]),
            ({"variants": {}}, ["variants", "at least one training variant"]),
            # a cross-field check inside a variant says it is the variant's values
            ({"variants": {"laser": {}, "big": {"train": {"prompts_per_step": 3}}}},
             ["train.mini_batch_size", "divisor of prompts_per_step * group_size = 12", "(in variants.big:"]),
            # what the shared ref_constant stage reads cannot differ per variant
            ({"variants": {"laser": {}, "b": {"self_reward": {"token": "<|x|>"}}}},
             ["variants.b.self_reward.token cannot be set per variant", "ref_constant"]),
            ({"variants": {"laser": {"self_reward": {"loss": "sft"}}}}, ["variants.laser.self_reward.loss"]),
        ({"paths": {"cache_dir": "rollouts/cache"}}, ["paths.cache_dir", "paths.rollouts_dir = 'rollouts'"]),
    ],
)
def test_bad_params_fail_with_key_value_and_allowed(tmp_path, data, fragments):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, data))
    message = str(err.value)
    assert str(tmp_path / "params.yaml") in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_sibling_outputs_and_an_outside_cache_are_fine(tmp_path):
    params = load_params(_write(tmp_path, {"paths": {"data_stats": "data/eval_stats.json", "cache_dir": "/var/cache/x",
                                                     "eval_plots": "eval/plots2"}}))
    assert params.paths.data_stats == "data/eval_stats.json"


def test_project_files_cover_every_tracked_top_level_name():
    """PROJECT_FILES (no output path may be or lie in one) lists every top-level name git tracks here."""
    import subprocess

    from laser.config import PROJECT_FILES

    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout")
    assert {line.split("/", 1)[0] for line in out.stdout.splitlines()} <= PROJECT_FILES


def test_yaml_1_2_floats_as_dvc_exp_run_set_param_writes_them(tmp_path):
    """``dvc exp run -S train.lr=1e-5`` (README) writes ``lr: 1e-05``, which YAML 1.1 (PyYAML) reads as a string.
    This applies the override with DVC's own code path for ``-S`` and loads the result."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(path, ["train.lr=1e-5", "self_reward.beta_v=2E-1", "verifier.timeout_s=1e1",
                           "flow.retry_delay_s=.5"])
    assert "lr: 1e-05" in path.read_text()  # the form PyYAML alone would read as '1e-05'
    params = load_params(path)
    assert params.train.lr == 1e-5 and params.self_reward.beta_v == 0.2 and params.verifier.timeout_s == 10.0
    assert params.flow.retry_delay_s == 0.5
    more = tmp_path / "more.yaml"
    more.write_text("self_reward:\n  alpha: 1E-1\n  tau: -1.0e+0\ntrain:\n  steps: 1_0\n")
    with pytest.raises(ParamsError, match=r"self_reward\.tau = -1\.0 "):  # a number, judged as one
        load_params(more)
    more.write_text("self_reward:\n  alpha: 1E-1\ntrain:\n  steps: 10\n  adv_eps: 1e-8\n")
    params = load_params(more)
    assert params.self_reward.alpha == 0.1 and params.train.steps == 10 and params.train.adv_eps == 1e-8
    assert isinstance(params.train.steps, int)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad.write_text("train:\n  steps: " + "9" * 5000 + "\n")  # past Python's int digit limit
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


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
    with pytest.raises(ParamsError, match=r"train\.steps") as err:
        apply_profile(params_path, profile)
    assert f"profile {profile}" in str(err.value)  # the profile holds the bad value, not params.yaml alone
    assert yaml.safe_load(params_path.read_text())["train"]["steps"] == 2  # untouched on failure
    with pytest.raises(ParamsError, match=f"{params_path} \\+ profile {profile}: .*train\\.steps"):
        load_params(params_path, profile)


def test_a_variant_view_checks_its_own_overrides_only(tmp_path):
    """for_variant applies one variant's overrides; the other variants' overrides, valid over the shared
    sections, are not re-checked against this variant's (k2's batch geometry broke p8's before)."""
    params = load_params(_write(tmp_path, {"variants": {
        "laser": {}, "k2": {"train": {"group_size": 2, "mini_batch_size": 8}},
        "p8": {"train": {"prompts_per_step": 8, "mini_batch_size": 32}}}}))
    k2, p8 = params.for_variant("k2"), params.for_variant("p8")
    assert (k2.train.group_size, k2.train.mini_batch_size, k2.train.prompts_per_step) == (2, 8, 4)
    assert (p8.train.prompts_per_step, p8.train.mini_batch_size, p8.train.group_size) == (8, 32, 4)
    assert params.train == load_params(_write(tmp_path, {})).train  # the shared sections are unchanged
    assert k2.variants == params.variants and k2.paths == params.paths


def test_dataclass_defaults_are_params_yaml():
    """One source of defaults: a test building Params() runs what users run (before, seven knobs differed:
    train.steps 20 vs 8, lr 1e-6 vs 1e-5, max_new_tokens 64 vs 48, ...)."""
    assert load_params(ROOT / "params.yaml") == Params()


def test_rollouts_per_step_is_one_property():
    from laser.config import TrainParams

    train = TrainParams(prompts_per_step=3, group_size=4, mini_batch_size=12, micro_batch_size=6)
    assert train.rollouts_per_step == 12
