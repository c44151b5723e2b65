"""The prepare stage: sources, answer cleaning, prompts, rejects, duplicates, determinism, outputs."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from laser.config import FewShotTurn, PathsParams, PrepareParams, SourceParams, load_params
from laser.data import (
    SourceError,
    clean_answer,
    evaluate_expression,
    expression_key,
    generate_synthetic,
    gsm8k_final_answer,
    normalize_problem,
    problem_keys,
    render_prompt,
)
from stages.prepare import _BATCH, prepare, schema, write_outputs

ROOT = Path(__file__).resolve().parents[1]


def small(**overrides) -> PrepareParams:
    base = PrepareParams(train=SourceParams(kind="synthetic", num_problems=200),
                         eval_sets={"synthetic": SourceParams(kind="synthetic", split="test", num_problems=40,
                                                              seed=1)})
    return replace(base, **overrides)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --------------------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("value, expected", [
    (5, "5"), (5.0, "5"), (0.5, "0.5"), (-3, "-3"), (" 18 ", "18"), ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18", "18"), ("... #### 1,080", "1080"),
    ("#### $12.", "12"), ("so it is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"), ("1,2", "1,2"),
    (True, None), ([1, 2], None), (None, None), (float("nan"), None),
])
def test_clean_answer(value, expected):
    assert clean_answer(value) == expected


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("He pays 2*$3=$<<2*3=6>>6.\n#### 109,200,000") == "109200000"


def test_evaluate_expression_precedence():
    assert evaluate_expression([2, 3, 4], ["+", "*"]) == 14
    assert evaluate_expression([10, 2, 3], ["-", "-"]) == 5
    assert evaluate_expression([2, 3, 4, 5], ["*", "-", "*"]) == -14


# ------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_problems_are_exact_distinct_and_seeded():
    source = SourceParams(kind="synthetic", min_digits=1, max_digits=3, max_operand=None, max_operations=3,
                          operators=("+", "-", "*"),
                          word_fraction=0.5, seed=7)
    take = [r for _, r in zip(range(300), generate_synthetic(source, "t"))]
    again = [r for _, r in zip(range(300), generate_synthetic(source, "t"))]
    assert take == again
    assert len({r.problem for r in take}) == 300
    other_seed = [r for _, r in zip(range(300), generate_synthetic(replace(source, seed=8), "t"))]
    assert [r.problem for r in other_seed] != [r.problem for r in take]
    words = 0
    for row in take:
        assert int(row.answer) >= 0
        expr = re.fullmatch(r"(?:What is|Calculate|Compute) ([\d +*-]+)[?.]", row.problem)
        if expr is None:
            words += 1
            continue
        tokens = expr.group(1).split()
        values, ops = [int(t) for t in tokens[::2]], tokens[1::2]
        assert evaluate_expression(values, ops) == int(row.answer)
        assert 1 <= len(ops) <= 3 and all(1 <= len(str(v)) <= 3 for v in values)
    assert 0 < words < 300


def test_synthetic_shapes_without_a_non_negative_answer_are_redrawn():
    """Ten one-digit subtractions are always negative (9 - 10*1 < 0): such shapes are drawn again, never hang."""
    source = SourceParams(kind="synthetic", min_digits=1, max_digits=1, max_operations=10, operators=("-",))
    rows = [r for _, r in zip(range(50), generate_synthetic(source, "t"))]
    assert len(rows) == 50 and all(int(r.answer) >= 0 for r in rows)
    assert max(r.problem.count(" - ") for r in rows) > 1  # longer feasible shapes still appear


def test_default_synthetic_mix_is_easy_arithmetic(tiny_tokenizer):
    """The default task, tuned on SmolLM2-135M-Instruct (~40% right): operands 1-12, +/-, a tenth word problems."""
    data = prepare(PrepareParams(), tiny_tokenizer)
    rows = data.train.rows
    assert len(rows) == 2000 and not data.errors
    numbers = [int(x) for r in rows for x in re.findall(r"\d+", r["problem"])]
    assert max(numbers) == 12 and all(0 <= int(r["answer"]) <= 24 for r in rows)
    words = sum(not re.match(r"(What is|Calculate|Compute) ", r["problem"]) for r in rows) / len(rows)
    assert 0.05 < words < 0.2
    assert any(" - " in r["problem"] for r in rows) and any(" + " in r["problem"] for r in rows)
    # 222 expressions (144 sums, 78 differences) x 3 wordings, less the eval set's: they repeat, not replaced
    assert len({r["problem"] for r in rows}) < 2000
    assert len({r["id"] for r in rows}) == 2000


# ------------------------------------------------------------------------------------------------ the stage itself


def test_prepare_default_schema_prompts_and_determinism(tiny_tokenizer):
    params = small()
    data = prepare(params, tiny_tokenizer)
    assert not data.errors
    table = data.train.table()
    assert table.schema == schema()
    assert table.num_rows == 200 and data.eval_sets["synthetic"].table().num_rows == 40
    assert len(set(table.column("id").to_pylist())) == 200
    row = data.train.rows[0]
    assert row["source"] == "synthetic" and row["split"] == "train"
    assert data.eval_sets["synthetic"].rows[0]["split"] == "test"
    # messages: instruction starts the first user turn, few-shot pairs, then the problem
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant"] * len(params.few_shot) + ["user"]
    assert row["messages"][0]["content"].startswith(params.instruction)
    assert row["messages"][-1]["content"] == row["problem"]
    assert row["messages"][1]["content"] == params.few_shot[0].assistant
    assert row["prompt"] == tiny_tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                                                add_generation_prompt=True)
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["prompt_tokens"] == len(tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    # deterministic, and no train problem is an eval problem
    again = prepare(params, tiny_tokenizer)
    assert again.train.table().equals(table) and again.stats == data.stats
    eval_problems = {r["problem"] for r in data.eval_sets["synthetic"].rows}
    assert not eval_problems & set(table.column("problem").to_pylist())
    assert data.stats["sets"]["train"]["rows_read"] == 200 + data.stats["duplicates_of_eval_removed"]


def test_plain_format_and_missing_chat_template(tiny_tokenizer):
    few = (FewShotTurn("What is 1 + 1?", "\\boxed{2}"),)
    data = prepare(small(prompt_format="plain", few_shot=few, instruction="Box it."), tiny_tokenizer)
    row = data.train.rows[0]
    expected = f"Box it.\n\nQuestion: What is 1 + 1?\nAnswer: \\boxed{{2}}\n\nQuestion: {row['problem']}\nAnswer:"
    assert row["prompt"] == expected
    assert data.stats["prompt_format"] == "plain"

    class NoTemplate:
        chat_template = None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    data = prepare(small(few_shot=()), NoTemplate())
    assert data.stats["prompt_format"] == "plain" and data.stats["prompt_format_requested"] == "chat"
    assert data.train.rows[0]["prompt"].endswith("\nAnswer:")


def test_jsonl_field_mapping_rejects_and_duplicates(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"q": "How many legs do 2 cats have?", "a": "Each cat has 4 legs: 2*4=<<2*4=8>>8\n#### 8", "k": "a"},
        "{not json",
        {"q": "  ", "a": "1", "k": "b"},
        {"q": "What is 1+1?", "k": "c"},
        {"q": "What is 2+2?", "a": 4.0, "k": "d"},
        {"q": "Eval   problem one?", "a": "1", "k": "e"},  # same as an eval problem up to whitespace
        {"q": "What is 5+5?", "a": "10", "k": "d"},  # duplicate id
        [1, 2],
        {"q": "What is 3+3?", "a": "6", "k": "f"},
        {"q": "What is 4+4?", "a": "8", "k": "g"},
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"problem": "Eval problem one?", "answer": 1},
                                                  {"problem": "Eval problem two?", "answer": "\\frac{1}{2}"}])
    params = small(
        train=SourceParams(kind="jsonl", path=str(train), problem_field="q", answer_field="a", id_field="k"),
        eval_sets={"mine": SourceParams(kind="jsonl", path=str(evals), split="test")},
        max_reject_fraction=1.0)
    data = prepare(params, tiny_tokenizer)
    assert [(r["id"], r["answer"]) for r in data.train.rows] == [("a", "8"), ("d", "4"), ("f", "6"), ("g", "8")]
    assert [(r["id"], r["answer"]) for r in data.eval_sets["mine"].rows] == [("mine-000001", "1"),
                                                                             ("mine-000002", "\\frac{1}{2}")]
    stats = data.stats["sets"]["train"]
    assert stats["rejected_by_reason"] == {"duplicate_id": 1, "empty_problem": 1, "invalid_json": 1,
                                           "missing_answer": 1, "not_an_object": 1}
    assert stats["held_out_removed"] == {"mine": 1} and stats["rows_read"] == 10
    assert data.stats["held_out"]["mine"] == {"train_rows_removed": 1, "eval_rows_removed_as_few_shot": 0,
                                              "overlap_with_train": 0, "overlap_with_few_shot": 0}
    assert stats["reject_fraction"] == pytest.approx(5 / 10)
    by_line = {r["line"]: r["reason"] for r in data.rejects}
    assert by_line == {2: "invalid_json", 3: "empty_problem", 4: "missing_answer", 6: "duplicate_of_eval",
                       7: "duplicate_id", 8: "not_an_object"}
    assert all(r["file"] == str(train) and r["set"] == "train" for r in data.rejects)


def test_invalid_utf8_rejects_its_line_only(tmp_path, tiny_tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"problem": "What is 1+1?", "answer": "2"}\n'
                      b'{"problem": "caf\xe9 costs?", "answer": "3"}\n'  # latin-1, not UTF-8
                      b'{"problem": "What is 2+2?", "answer": "4"}\n')
    data = prepare(small(train=SourceParams(kind="jsonl", path=str(train)), max_reject_fraction=0.5), tiny_tokenizer)
    assert [r["answer"] for r in data.train.rows] == ["2", "4"]
    assert [(r["line"], r["reason"]) for r in data.train.rejects] == [(2, "invalid_utf8")]


def test_bom_and_rows_json_cannot_hold_are_rejects_not_crashes(tmp_path):
    """A UTF-8 BOM is not part of the first row; an int past Python's 4300-digit limit (ValueError) and 100,000
    nested '[' (RecursionError) reject their line and the rows after them are read."""
    from laser.data import Reject, Row, read_jsonl

    train = tmp_path / "t.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + b'{"problem": "first?", "answer": 1}\n'
                      + b'{"problem": "huge?", "answer": ' + b"7" * 5000 + b"}\n"
                      + b"[" * 100_000 + b"\n"
                      + b'{"problem": "last?", "answer": 2}\n')
    items = list(read_jsonl(train, SourceParams(kind="jsonl", path=str(train)), "t"))
    assert [(i.line, i.problem) for i in items if isinstance(i, Row)] == [(1, "first?"), (4, "last?")]
    assert [(i.line, i.reason) for i in items if isinstance(i, Reject)] == [(2, "invalid_json"), (3, "invalid_json")]
    huge = next(i for i in items if isinstance(i, Reject))
    assert "digits" in huge.detail and len(huge.detail) <= 200

    from laser.data import _row_from_record

    reject = _row_from_record({"problem": "p", "answer": 10**5000}, 1, SourceParams(kind="parquet", path="x"), "x")
    assert isinstance(reject, Reject) and reject.reason == "invalid_answer"


def _stage_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _stage_project(tmp_path: Path, repo_cache: Path, train: dict | None = None, **paths) -> Path:
    params = {"paths": {"cache_dir": str(repo_cache), **paths}, "model": {"name": "tiny-random"},
              "prepare": {"train": train or {"kind": "synthetic", "num_problems": 20},
                          "eval_sets": {"syn": {"kind": "synthetic", "num_problems": 5, "seed": 3, "split": "test"}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _run_prepare(project: Path, runner=None, **kwargs):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "stages.prepare", "--params", "params.yaml"]
    options = {"cwd": project, "env": _stage_env(), "capture_output": True, "text": True, "timeout": 300}
    return runner(cmd, **kwargs, **options) if runner else subprocess.run(cmd, **options)


def test_stage_reads_a_bom_file_past_rows_json_cannot_hold(tmp_path, tiny_model_dir, repo_cache):
    """The real stage: before, the 5000-digit answer crashed it (exit 1, traceback, no stats, no later row)."""
    rows = [b'{"problem": "Count the stars in sky %d.", "answer": %d}\n' % (i, i) for i in range(60)]
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + rows[0] + b'{"problem": "x", "answer": ' + b"7" * 5000
                                           + b"}\n" + b"[" * 100_000 + b"\n" + b"".join(rows[1:]))
    project = _stage_project(tmp_path, repo_cache, {"kind": "jsonl", "path": "train.jsonl"})
    done = _run_prepare(project)
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())["sets"]["train"]
    assert stats["rows"] == 60 and stats["rejected_by_reason"] == {"invalid_json": 2}
    assert pq.read_table(tmp_path / "data" / "train.parquet").column("answer").to_pylist()[0] == "0"  # BOM row
    rejects = [json.loads(line) for line in (tmp_path / "data" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects if r["set"] == "train"] == [(2, "invalid_json"),
                                                                                  (3, "invalid_json")]


def test_stage_with_a_read_only_data_dir_fails_for_good_in_one_line(tmp_path, tiny_model_dir, repo_cache,
                                                                    readonly_run):
    """Before: a PermissionError traceback, exit 1, which the flow retried three times."""
    project = _stage_project(tmp_path, repo_cache)
    (project / "data").mkdir()
    done = _run_prepare(project, readonly_run, readonly=[project / "data"])
    assert done.returncode == 3, done.stderr  # laser.cli.PERMANENT_EXIT: not retried
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "data/stats.json" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_stage_refuses_output_paths_that_are_project_files(tmp_path, tiny_model_dir, repo_cache):
    """Before: `paths.data_stats: params.yaml` replaced the params with the stats (exit 0)."""
    project = _stage_project(tmp_path, repo_cache, data_stats="params.yaml")
    before = (project / "params.yaml").read_text()
    done = _run_prepare(project)
    assert done.returncode == 2, done.stderr  # laser.cli.BAD_PARAMS_EXIT, at params load
    assert "paths.data_stats" in done.stderr and "project's own files" in done.stderr
    assert (project / "params.yaml").read_text() == before and not (project / "data").exists()


def test_reject_limit_fails_but_writes_stats_and_rejects(tmp_path, tiny_tokenizer, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", ["{bad", {"problem": "ok?", "answer": "1"}])
    params = small(train=SourceParams(kind="jsonl", path=str(train)), max_reject_fraction=0.2)
    data = prepare(params, tiny_tokenizer)
    assert data.errors and "train" in data.errors[0] and "invalid_json" in data.errors[0]
    monkeypatch.chdir(tmp_path)  # output paths are relative to the project root
    paths = PathsParams(train_data="out/train.parquet", eval_data_dir="out/eval", data_stats="out/stats.json",
                        data_rejects="out/rejects.jsonl")
    write_outputs(data, paths)
    assert not Path(paths.train_data).exists()
    assert json.loads(Path(paths.data_stats).read_text())["ok"] is False
    rejects = [json.loads(x) for x in Path(paths.data_rejects).read_text().splitlines()]
    assert [r["reason"] for r in rejects if r["set"] == "train"] == ["invalid_json"]


def test_prompt_too_long_and_limit(tmp_path, tiny_tokenizer):
    rows = [{"problem": "short?", "answer": i} for i in range(5)]
    rows.insert(2, {"problem": "long " * 300 + "?", "answer": 1})
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    params = small(train=SourceParams(kind="jsonl", path=str(train), limit=3), max_prompt_tokens=600,
                   max_reject_fraction=0.5)
    data = prepare(params, tiny_tokenizer)
    assert [r["answer"] for r in data.train.rows] == ["0", "1", "2"]
    assert data.stats["sets"]["train"]["rejected_by_reason"] == {"prompt_too_long": 1}
    assert data.stats["sets"]["train"]["rows_read"] == 4  # rows after the limit are not read


def test_synthetic_source_whose_every_prompt_is_too_long_stops_and_fails(tiny_tokenizer):
    """An endless source stops once its rejects exceed what the limit allows, instead of reading forever."""
    data = prepare(small(max_prompt_tokens=5), tiny_tokenizer)
    train = data.stats["sets"]["train"]
    assert train["rows"] == 0 and train["rejected_by_reason"]["prompt_too_long"] <= 2 * _BATCH
    assert data.errors and "no usable rows" in data.errors[0]
    assert "repeated a held-out problem" not in data.errors[0]  # the length, not the overlap, stopped it


def test_synthetic_source_with_too_many_rejects_stops_short_and_fails(tiny_tokenizer):
    """Some rows fit, too many do not: the set stops once the limit cannot be met, and that is an error."""
    source = SourceParams(kind="synthetic", num_problems=400, min_digits=1, max_digits=9, max_operand=None)
    budget = len(tiny_tokenizer(render_prompt("What is 5 + 5?", PrepareParams().instruction, PrepareParams().few_shot,
                                              tiny_tokenizer, "chat")[1], add_special_tokens=False)["input_ids"])
    data = prepare(small(train=source, max_prompt_tokens=budget + 4, max_reject_fraction=0.5), tiny_tokenizer)
    train = data.stats["sets"]["train"]
    assert 0 < train["rows"] < 400 and train["rejected"] > 0
    assert any(e.startswith("train") for e in data.errors), data.errors


def test_synthetic_train_whose_every_problem_is_held_out_stops_and_says_why(tiny_tokenizer):
    """One-digit sums, nearly all of them in the eval set. Before, prepare read the generator until the few
    problems left filled the set (with none left, forever: each row removed, memory growing); now it stops after
    ten sets' worth of removals and names the overlap."""
    space = dict(kind="synthetic", min_digits=1, max_digits=1, max_operand=9, max_operations=1, operators=["+"],
                 word_fraction=0.0)
    params = small(train=SourceParams(num_problems=20, seed=3, **space),
                   eval_sets={"all": SourceParams(num_problems=300, split="test", seed=4, **space)})
    data = prepare(params, tiny_tokenizer)
    train = data.stats["sets"]["train"]
    assert train["rows"] < 20 and train["short_by"] == 20 - train["rows"]
    assert 10 * 20 + _BATCH < sum(train["held_out_removed"].values()) <= 10 * 20 + 2 * _BATCH  # the limit
    assert any(e.startswith("train") and "repeated a held-out problem" in e and "widen" in e for e in data.errors)


def test_parquet_source_with_int_answers(tmp_path, tiny_tokenizer):
    path = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"id": [60, 61], "problem": ["Find x.", "Find y."], "answer": [204, 25]}), path)
    params = small(eval_sets={"aime": SourceParams(kind="parquet", path=str(path), id_field="id", split="test")})
    data = prepare(params, tiny_tokenizer)
    assert [(r["id"], r["answer"], r["source"]) for r in data.eval_sets["aime"].rows] == [
        ("60", "204", str(path)), ("61", "25", str(path))]


def test_missing_file_and_offline_hf_fail_with_one_clear_line(tmp_path, tiny_tokenizer, monkeypatch):
    with pytest.raises(SourceError, match="not found"):
        prepare(small(train=SourceParams(kind="jsonl", path=str(tmp_path / "nope.jsonl"))), tiny_tokenizer)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore soup")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError) as info:
        prepare(small(train=SourceParams(kind="hf", dataset="openai/gsm8k", config="main")), tiny_tokenizer)
    message = str(info.value)
    assert "\n" not in message and "openai/gsm8k" in message and "kind: jsonl" in message


def test_main_writes_all_outputs_atomically(tmp_path, monkeypatch, repo_cache, capsys):
    from stages.prepare import main

    params = {
        "paths": {"cache_dir": str(repo_cache)},
        "model": {"name": "tiny-random"},
        "prepare": {"train": {"kind": "synthetic", "num_problems": 50},
                    "eval_sets": {"syn": {"kind": "synthetic", "num_problems": 10, "seed": 3, "split": "test"}}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    main([])
    assert pq.read_table("data/train.parquet").num_rows == 50
    assert pq.read_table("data/eval/syn.parquet").schema == schema()
    assert json.loads(Path("data/stats.json").read_text())["rows"] == {"train": 50, "eval/syn": 10}
    assert Path("data/rejects.jsonl").exists()
    assert not [p for p in Path("data").rglob(".*tmp*")]
    assert "train: 50 rows" in capsys.readouterr().out

    params["prepare"]["train"] = {"kind": "jsonl", "path": "missing.jsonl"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 3  # laser.cli.PERMANENT_EXIT: the flow does not retry it
    assert "missing.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
def test_gsm8k_and_math500_files(shared_data, tiny_tokenizer):
    params = small(
        train=SourceParams(kind="jsonl", path=str(shared_data / "gsm8k" / "train.jsonl"), problem_field="question",
                           limit=300),
        eval_sets={
            "gsm8k": SourceParams(kind="jsonl", path=str(shared_data / "gsm8k" / "test.jsonl"),
                                  problem_field="question", split="test"),
            "math500": SourceParams(kind="jsonl", path=str(shared_data / "benchmarks" / "math500" / "test.jsonl"),
                                    id_field="unique_id", split="test"),
            "aime24": SourceParams(kind="jsonl", path=str(shared_data / "benchmarks" / "aime24" / "test.jsonl"),
                                   id_field="id", split="test"),
        },
        max_prompt_tokens=4096)
    data = prepare(params, tiny_tokenizer)
    assert not data.errors and data.stats["rejected_by_reason"] == {}
    gsm = data.eval_sets["gsm8k"].rows
    assert len(gsm) == 1319 and all(re.fullmatch(r"-?\d+", r["answer"]) for r in gsm)
    assert len(data.train.rows) == 300
    assert len(data.eval_sets["math500"].rows) == 500 and len(data.eval_sets["aime24"].rows) == 30
    assert random.Random(0).choice(data.eval_sets["math500"].rows)["id"].startswith("test/")


# -------------------------------------------------------------------------------------------------------- held out


def _arithmetic_key(problem: str, answer: str) -> tuple:
    """An independent key (not laser.data's): the numbers in the text, in order, and the answer. For the synthetic
    one-operation task it fixes the operator too (operands are >= 1, so a + b != a - b)."""
    return (*[int(x) for x in re.findall(r"\d+", problem)], int(answer))


def test_default_eval_set_is_held_out_from_train_and_few_shot(tiny_tokenizer):
    """The default sets share no (operands, operator) with each other in any wording, and no eval problem is a
    few-shot turn (before: all 32 eval problems had a twin in train, one was the few-shot "What is 3 + 4?")."""
    params = load_params(ROOT / "params.yaml").prepare
    data = prepare(params, tiny_tokenizer)
    assert not data.errors
    train = {_arithmetic_key(r["problem"], r["answer"]) for r in data.train.rows}
    for name, prepared in data.eval_sets.items():
        keys = [_arithmetic_key(r["problem"], r["answer"]) for r in prepared.rows]
        assert not set(keys) & train, name
        few_shot = {normalize_problem(t.user) for t in params.few_shot}
        assert not {normalize_problem(r["problem"]) for r in prepared.rows} & few_shot
        held_out = data.stats["held_out"][name]
        assert held_out["overlap_with_train"] == 0 and held_out["overlap_with_few_shot"] == 0
        assert held_out["train_rows_removed"] > 0  # the exclusion did work: some draws were twins
    assert len(data.train.rows) == params.train.num_problems


def test_file_sources_are_held_out_up_to_case_spacing_and_latex(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "Find  $x$ if \\, x + 1 = 2.", "answer": "1"},  # the eval problem, other case and spacing
        {"problem": "Tom has 2 apples and gets 5 more. How many apples does Tom have now?", "answer": "7"},
        {"problem": "What is 2 + 5?", "answer": "7"},  # same expression as eval row 3, other wording
        {"problem": "A different problem.", "answer": "3"},
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"problem": "find x if x+1=2.", "answer": "1"},
        {"problem": "What is 3 + 4?", "answer": "7"},  # the default few-shot turn: its answer is in the prompt
        {"problem": "Calculate 2 + 5.", "answer": "7"},
    ])
    params = small(train=SourceParams(kind="jsonl", path=str(train)),
                   eval_sets={"mine": SourceParams(kind="jsonl", path=str(evals))}, max_reject_fraction=0.0)
    data = prepare(params, tiny_tokenizer)
    assert not data.errors  # held-out removals are not bad rows
    assert [r["problem"] for r in data.eval_sets["mine"].rows] == ["find x if x+1=2.", "Calculate 2 + 5."]
    assert [r["problem"] for r in data.train.rows] == [
        "Tom has 2 apples and gets 5 more. How many apples does Tom have now?", "A different problem."]
    assert data.stats["held_out"]["mine"] == {"train_rows_removed": 2, "eval_rows_removed_as_few_shot": 1,
                                              "overlap_with_train": 0, "overlap_with_few_shot": 0}
    reasons = {(r["set"], r["line"]): (r["reason"], r["overlaps"]) for r in data.rejects}
    assert reasons == {("train", 1): ("duplicate_of_eval", "mine"), ("train", 3): ("duplicate_of_eval", "mine"),
                       ("eval/mine", 2): ("duplicate_of_few_shot", "few_shot[0]")}


def test_problem_keys_ignore_wording_of_one_expression():
    assert expression_key([3, 4], ["+"]) in problem_keys("What is 3 + 4?")
    assert problem_keys("Compute 3+4.") & problem_keys("What is 3 + 4?")
    assert not problem_keys("What is 4 + 3?") & problem_keys("What is 3 + 4?")
    assert len(problem_keys("Is 1 + 2 more than 2 + 0?")) == 1  # two expressions: the text key only
