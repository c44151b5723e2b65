"""laser.api / the `laser` command / the self-explaining export, on the tiny random model (CPU, seconds)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from laser.config import Params, build
from laser.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
C_REF = -11.5
FEW_SHOT = [{"user": "What is 3 + 4?", "assistant": "The answer is \\boxed{7}."}]


def _params(repo_cache) -> Params:
    return build(Params, {"paths": {"cache_dir": str(repo_cache)}, "model": {"name": "tiny-random"},
                          "prepare": {"few_shot": FEW_SHOT},
                          "generation": {"max_new_tokens": 40, "batch_size": 8},
                          "rollout": {"samples_per_problem": 4}})


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir, repo_cache) -> Path:
    """An export written by the train stage's own export_model (a ZeRO-0 stand-in for the engine: no DeepSpeed
    run needed to test what lands in the directory)."""
    from laser.models import load_model, load_tokenizer, token_id
    from laser.score import SelfRewardConfig
    from stages.train import export_model

    tokenizer = load_tokenizer(tiny_model_dir)
    engine = types.SimpleNamespace(module=load_model(tiny_model_dir), zero_optimization_stage=lambda: 0)
    config = SelfRewardConfig("<|z_c|>", token_id(tokenizer, "<|z_c|>"), C_REF, 0.1)
    project = tmp_path_factory.mktemp("export")
    params = _params(repo_cache)
    with contextlib.chdir(project):  # output paths are relative to the project root
        export_model(engine, tokenizer, "laser", config, 0, params, train_rows=20,
                     train_metrics={"steps": 8, "final_reward_mean": 0.25, "final_sv_f1": 0.5})
    return project / params.paths.trained("laser").model


@pytest.fixture(scope="module")
def loaded(export_dir):
    import laser

    return laser.load(export_dir)


def _console(argv, capsys) -> tuple[int, str, str]:
    from laser.console import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -------------------------------------------------------------------------------------------------------- export


def test_export_carries_the_self_reward_settings_in_config_json_and_explains_itself(export_dir, tiny_tokenizer):
    from transformers import AutoConfig

    from laser.rollouts import read_self_reward_config

    settings = json.loads((export_dir / "config.json").read_text())["laser"]
    z_c = tiny_tokenizer.convert_tokens_to_ids("<|z_c|>")
    assert {k: settings[k] for k in ("self_reward_token", "self_reward_token_id", "c_ref", "beta_v")} == {
        "self_reward_token": "<|z_c|>", "self_reward_token_id": z_c, "c_ref": C_REF, "beta_v": 0.1}
    assert settings["prompt"] == {"instruction": Params().prepare.instruction, "few_shot": FEW_SHOT, "format": "chat"}
    assert settings["generation"]["max_new_tokens"] == 40
    assert AutoConfig.from_pretrained(export_dir).laser == settings  # a plain HF load carries them
    assert json.loads((export_dir / "laser.json").read_text()) == settings  # laser.json: the same, a superset
    assert read_self_reward_config(export_dir).z_c_id == z_c  # ... still read by the rollout stage
    card = (export_dir / "README.md").read_text()
    for text in ("tiny-random", "data/train.parquet` (20 problems)", "steps: 8", "laser.load(", "model.solve(",
                 "laser solve --model", "eval/report.md", "0.250", "`<\\|z_c\\|>`"):
        assert text in card, text


def test_package_links_the_export_and_writes_a_card_with_this_runs_eval_numbers(export_dir, tmp_path, repo_cache,
                                                                                 monkeypatch):
    import shutil

    from laser.errors import StageError
    from stages.package import package

    monkeypatch.chdir(tmp_path)
    shutil.copytree(export_dir, "models/laser")
    params = _params(repo_cache)
    with pytest.raises(StageError, match=r"metrics\.json is missing: run the evaluate stage"):
        package(params)
    assert not Path("release").exists()  # nothing half-written
    Path("train/laser").mkdir(parents=True)
    Path("train/laser/metrics.json").write_text(json.dumps({"steps": 8, "final_reward_mean": 0.25,
                                                             "train_problems": 20}))
    Path("eval").mkdir()
    Path("eval/metrics.json").write_text(json.dumps({"headline_view": "macro", "models": {
        "laser": {"headline": {"macro": {"mean_accuracy": 0.4375, "sv_f1": 0.8125}}},
        "base": {"headline": {"macro": {"mean_accuracy": 0.3125}}}}}))
    release = package(params)
    weights = next(Path("models/laser").glob("*.safetensors"))
    assert (release / weights.name).stat().st_ino == weights.stat().st_ino  # a hard link, not a second copy
    assert json.loads((release / "config.json").read_text())["laser"]["c_ref"] == C_REF
    card = (release / "README.md").read_text()
    for text in ("| laser | mean_accuracy | 0.438 |", "| laser | sv_f1 | 0.812 |",
                 "| base | mean_accuracy | 0.312 |", "(20 problems)", 'laser.load("release")'):
        assert text in card, text
    assert "written by the evaluate stage after this export" not in card
    assert "eval/report.md" in Path("models/laser/README.md").read_text()  # train's export is unchanged


# --------------------------------------------------------------------------------------------------------- score


def test_score_equals_the_rollout_stage_score(export_dir, loaded, repo_cache, tiny_tokenizer, capsys):
    """The rollout stage (z_c read in the generation pass) and the API's one forward over prompt + response + EOS
    give the same score, from token ids, from the response text and from `laser score`."""
    from laser.data import render_prompt
    from laser.rollouts import read_self_reward_config
    from laser.runtime import open_generator
    from stages.rollout import rollout_eval_set

    params = _params(repo_cache)
    problems = []
    for i, (a, b) in enumerate([(2, 5), (4, 4), (6, 1)]):
        text = f"What is {a} + {b}?"
        prompt = render_prompt(text, params.prepare.instruction, params.prepare.few_shot, tiny_tokenizer,
                               params.prepare.prompt_format)[1]  # as the prepare stage renders it
        problems.append({"id": f"p{i}", "problem": text, "answer": str(a + b), "prompt": prompt})
    with open_generator(params, export_dir) as (tokenizer, generator):
        rows, _counts = rollout_eval_set(params, generator, tokenizer, read_self_reward_config(export_dir), problems,
                                         "t")
    scored = [r for r in rows if r["score"] is not None]
    assert len(scored) >= 4
    by_id = {p["id"]: p for p in problems}
    for row in scored:
        problem = by_id[row["problem_id"]]["problem"]
        assert loaded.prompt_ids(problem) == row["prompt_token_ids"]  # the same prompt rendering as training
        assert loaded.score_ids(row["prompt_token_ids"], row["response_token_ids"]) == pytest.approx(
            row["score"], abs=1e-5)
    text_rows = [r for r in scored if tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"]
                 == r["response_token_ids"][:-1]]  # the text round-trips to the same ids (no special token in it)
    assert text_rows
    row = text_rows[0]
    problem = by_id[row["problem_id"]]["problem"]
    assert loaded.score(problem, row["response"]) == pytest.approx(row["score"], abs=1e-5)
    code, out, _err = _console(["score", "--model", export_dir, "--problem", problem, "--response", row["response"],
                                "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["score"] == pytest.approx(row["score"], abs=1e-5)
    assert result["self_verified"] == (min(max(result["score"], 0.0), 1.0) > 0.5)


# --------------------------------------------------------------------------------------------------------- solve


def test_laser_solve_returns_an_answer_and_k_scored_samples(export_dir, loaded, capsys):
    code, out, _err = _console(["solve", "--model", export_dir, "--k", 6, "--seed", 3, "--equivalence", "exact",
                                "--json", "What is 2 + 5?"], capsys)
    assert code == 0
    result = json.loads(out)
    samples = result["samples"]
    assert len(samples) == 6 and [s["index"] for s in samples] == list(range(6))
    assert result["answer"] is not None and result["answer"] in {s["answer"] for s in samples}
    for s in samples:
        assert (s["score"] is None) == (s["finish_reason"] == "length")
        assert s["self_verified"] == (s["score"] is not None and min(max(s["score"], 0.0), 1.0) > 0.5)
    assert sum(v["count"] for v in result["votes"]) == sum(s["answer"] is not None for s in samples)
    assert result["votes"][0]["answer"] == result["answer"]
    # the generation-pass scores are the one-forward scores of the same responses
    finished = next(s for s in samples if s["score"] is not None)
    assert loaded.score("What is 2 + 5?", finished["response"]) == pytest.approx(finished["score"], abs=1e-5)

    code, out, _err = _console(["solve", "--model", export_dir, "--k", 6, "--seed", 3, "--equivalence", "exact",
                                "What is 2 + 5?"], capsys)
    assert code == 0
    assert out.startswith(f"answer: {result['answer']} (") and "votes:" in out and "samples:" in out
    assert out.count("score ") == 6


def test_weighted_vote_follows_the_scores_and_falls_back_to_the_majority():
    from laser.api import weighted_vote

    answers = ["1", "2", "2.0", None, "1"]
    winner, votes = weighted_vote(answers, [0.9, 0.2, 0.3, 0.99, None], equivalence="exact")
    assert answers[winner] == "1" and [(v.answer, v.count, v.weight) for v in votes] == [("1", 2, 0.9),
                                                                                        ("2", 2, 0.5)]
    winner, votes = weighted_vote(["3", "4", "4"], [-1.0, -0.5, -0.2], equivalence="exact")  # all weights 0
    assert winner == 1 and votes[0].answer == "4" and votes[0].count == 2
    assert weighted_vote([None, None], [0.9, 0.9])[0] == -1


def test_render_uses_the_saved_prompt_settings(loaded):
    prompt = loaded.render("What is 8 + 1?")
    assert prompt.index(Params().prepare.instruction) < prompt.index("What is 3 + 4?") < prompt.index("What is 8 + 1?")
    assert prompt.endswith("<|im_start|>assistant\n")  # the chat template's generation prompt


# --------------------------------------------------------------------------------------------------- bad input


def test_a_model_without_self_reward_settings_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    import laser

    with pytest.raises(ModelError, match=r"no self-reward config.*--self-reward-config FILE"):
        laser.load(tiny_model_dir)
    code, out, err = _console(["solve", "--model", tiny_model_dir, "What is 1 + 1?"], capsys)
    assert code == 3 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "no self-reward config" in err and "--self-reward-config" in err
    code, _out, err = _console(["score", "--model", tmp_path / "missing", "--problem", "x", "--response", "y"],
                               capsys)
    assert code == 3 and err.count("\n") == 1 and "does not exist" in err
    code, _out, err = _console(["solve", "--model", tiny_model_dir, "--k", 0, "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "at least 1 sample" in err
    for bad in ("nan", "inf", "-0.5"):  # nan compared false to "< 0" and reached the sampler
        code, _out, err = _console(["solve", "--model", tiny_model_dir, "--temperature", bad, "x"], capsys)
        assert code == 2 and err.count("\n") == 1 and "a finite number >= 0" in err, (bad, err)


def test_any_hf_model_scores_with_a_self_reward_config_file(tiny_model_dir, tiny_tokenizer, tmp_path):
    import laser

    config = tmp_path / "laser.json"
    config.write_text(json.dumps({"self_reward_token": "<|z_c|>", "c_ref": C_REF, "beta_v": 0.1,
                                  "self_reward_token_id": tiny_tokenizer.convert_tokens_to_ids("<|z_c|>")}))
    model = laser.load(tiny_model_dir, self_reward_config=config)
    assert model.settings.prompt.instruction == Params().prepare.instruction  # no prompt saved: the defaults
    assert isinstance(model.score("What is 1 + 1?", "The answer is \\boxed{2}."), float)
    config.write_text(json.dumps({"self_reward_token": "<|z_c|>", "c_ref": C_REF, "beta_v": 0.1,
                                  "self_reward_token_id": 10**6}))
    with pytest.raises(ModelError, match="outside this model's vocabulary"):
        laser.load(tiny_model_dir, self_reward_config=config)


def test_the_module_entry_point_and_help():
    """`python -m laser.console` (what the `laser` script runs): help for each command, errors before any model."""
    run = [sys.executable, "-m", "laser.console"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for command in ("solve", "score", "report"):
        done = subprocess.run([*run, command, "--help"], capture_output=True, text=True, env=env, check=True)
        assert "--model" in done.stdout or "--evaluate" in done.stdout
    done = subprocess.run([*run, "run", "--help"], capture_output=True, text=True, env=env, check=True)
    assert "flows.pipeline" in done.stdout and "--profile" in done.stdout
    done = subprocess.run([*run, "solve", "--model", "/nonexistent/model", "x"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 3 and done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr


def test_import_laser_api_is_light():
    code = "import sys, laser, laser.api, laser.console; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={"PYTHONPATH": str(ROOT)}).stdout.split())
    assert not loaded & {"torch", "transformers", "math_verify", "pyarrow", "numpy"}


def test_report_and_run_are_thin_aliases(tmp_path, capsys, monkeypatch):
    tmp_path = tmp_path.resolve()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "pipeline.py").write_text("")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    code, out, err = _console(["report", "--root", tmp_path], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "no report at" in err and "laser run" in err
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.md").write_text("# LaSeR report\n")
    assert _console(["report", "--root", tmp_path], capsys)[:2] == (0, "# LaSeR report\n")
    assert _console(["report", "--root", tmp_path, "--path"], capsys)[1].strip() == str(tmp_path / "eval" / "report.md")

    calls = []
    monkeypatch.setattr("laser.console.subprocess.call", lambda cmd, cwd, env: calls.append((cmd, cwd)) or 0)
    monkeypatch.chdir(tmp_path / "eval")  # the project root is found above the current directory
    assert _console(["run", "--profile", "smoke", "--force", "train"], capsys)[0] == 0
    assert calls[-1] == ([sys.executable, "-m", "flows.pipeline", "--profile", "smoke", "--force", "train"],
                         tmp_path)
    assert _console(["report", "--evaluate"], capsys)[0] == 0
    assert calls[-1][0][1:3] == ["-m", "stages.evaluate"] and calls[-1][1] == tmp_path
