"""How hard candidate synthetic tasks are for the base model: its accuracy on held-out problems.

    python bench/bench_task_difficulty.py [--problems 48] [--samples 4] [--tasks '{"name": {SourceParams...}}']

The self-reward loss needs both correct and incorrect samples, so the default task is chosen where the base model
is right 30-70% of the time (issue: held-out evaluation). Each task draws ``--problems`` synthetic problems (seed
5, a stream neither the default train nor eval set uses), renders them with params.yaml's instruction and
few-shot turns, samples ``--samples`` answers each at params.yaml's generation settings, and verifies them.
Results are appended task by task (a stopped run keeps the tasks it finished) to
bench/results/task_difficulty.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser.config import SourceParams, load_params
from laser.data import generate_synthetic, render_prompt
from laser.io import atomic_write_json
from laser.runtime import base_model_dir, open_generator, sampling
from laser.verify import summarize, verify_batch

RESULTS = Path(__file__).resolve().parent / "results" / "task_difficulty.json"
DEFAULT_TASKS = {  # every knob explicit: SourceParams' defaults are the chosen task (ops12_w10)
    "digits1": {"min_digits": 1, "max_digits": 1, "max_operand": None, "word_fraction": 0.25},
    "ops12_w10": {"min_digits": 1, "max_digits": 2, "max_operand": 12, "word_fraction": 0.1},
    "ops12": {"min_digits": 1, "max_digits": 2, "max_operand": 12, "word_fraction": 0.25},
    "ops15_w10": {"min_digits": 1, "max_digits": 2, "max_operand": 15, "word_fraction": 0.1},
    "ops20": {"min_digits": 1, "max_digits": 2, "max_operand": 20, "word_fraction": 0.25},
    "ops20_nowords": {"min_digits": 1, "max_digits": 2, "max_operand": 20, "word_fraction": 0.0},
}


def measure(params, generator, tokenizer, task: dict, problems: int, samples: int) -> dict:
    rows = list(itertools.islice(generate_synthetic(SourceParams(kind="synthetic", seed=5, **task), "m"), problems))
    p = params.prepare
    prompts = [tokenizer(render_prompt(r.problem, p.instruction, p.few_shot, tokenizer, p.prompt_format)[1],
                         add_special_tokens=False)["input_ids"] for r in rows]
    start = time.perf_counter()
    completions = generator.generate(prompts, samples, sampling(params, 3))
    verdicts = verify_batch([c.text for c in completions], [rows[c.prompt_index].answer for c in completions],
                            timeout_s=params.verifier.timeout_s)
    return {"task": task, "problems": problems, "samples_per_problem": samples, **summarize(verdicts),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tasks", default=json.dumps(DEFAULT_TASKS))
    args = parser.parse_args()
    params = load_params("params.yaml")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("machine", f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 threads")
    results.setdefault("model", params.model.name)
    with open_generator(params, base_model_dir(params)) as (tokenizer, generator):
        for name, task in json.loads(args.tasks).items():
            if name in results.get("tasks", {}):
                continue  # finished by an earlier (stopped) run
            results.setdefault("tasks", {})[name] = measure(params, generator, tokenizer, task, args.problems,
                                                            args.samples)
            print(name, results["tasks"][name], flush=True)
            atomic_write_json(RESULTS, results)

if __name__ == "__main__":
    main()
