"""A few decoded samples of every train step, with reward and score (as TRL's completions table): what the policy
actually writes, readable after the run.

``paths.train_completions`` (JSON lines, ``train.completions_per_step`` lines per step; persist, not cached, and
truncated with the step log on resume), one object per sample::

    {"step": 3, "sample": 5, "prompt_tail": "...What is 7 + 5?<|im_end|>\\n<|im_start|>assistant\\n",
     "response": "7 + 5 = 12. The answer is \\\\boxed{12}.", "answer": "12", "finish_reason": "eos",
     "reward": 1.0, "judged": true, "score": 0.41}

``score`` is r_s under π_old (the rollout-time score; null for a truncated sample), ``reward`` the verifier's.
The samples are picked without randomness: correct and incorrect ones alternately (a correct one first), each
class in sampling order, so a table shows both when the step has both.
:func:`completions_markdown` renders the last step's samples as a Markdown table (for the report).

Light: no torch (the rollout's tensors are only read through ``.tolist()``), no transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT_TAIL_CHARS = 160  # the end of the prompt: the problem, not the few-shot turns before it
COLUMNS = ("step", "sample", "prompt_tail", "response", "answer", "finish_reason", "reward", "judged", "score")


def pick_samples(rewards: Sequence[float], count: int) -> list[int]:
    """``count`` sample indices: correct (reward > 0.5) and incorrect ones alternately, a correct one first,
    each class in order; when one class runs out the other fills in."""
    correct = [i for i, r in enumerate(rewards) if r > 0.5]
    incorrect = [i for i, r in enumerate(rewards) if r <= 0.5]
    picked: list[int] = []
    while len(picked) < min(count, len(rewards)):
        for group in (correct, incorrect):
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return sorted(picked)


def completion_samples(rollout, tokenizer, step: int, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` decoded samples of one step's ``laser.trainer.Rollout`` (this rank's share)."""
    from laser.verify import last_boxed

    if count <= 0 or not rollout.responses:
        return []
    rewards = [float(r) for r in rollout.rewards.tolist()]
    finished = [bool(f) for f in rollout.finished.tolist()]
    judged = [bool(j) for j in rollout.judged.tolist()]
    scores = [float(s) for s in rollout.old_scores.tolist()]
    out = []
    for i in pick_samples(rewards, count):
        prompt = tokenizer.decode(rollout.prompts[i], skip_special_tokens=False)
        response = tokenizer.decode(rollout.responses[i], skip_special_tokens=True)
        out.append({"step": step, "sample": i, "prompt_tail": prompt[-PROMPT_TAIL_CHARS:], "response": response,
                    "answer": last_boxed(response), "finish_reason": "eos" if finished[i] else "length",
                    "reward": rewards[i], "judged": judged[i], "score": scores[i] if finished[i] else None})
    return out


def append_completions(path: str | Path, samples: Sequence[dict[str, Any]]) -> None:
    """Append one JSON line per sample (the step log's way: a crash loses at most the step being written)."""
    if not samples:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def read_completions(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a completions file ([] when it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _cell(value: Any, limit: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.3f}"
    else:
        text = str(value)
    text = " ".join(text.split())  # one line per row
    if len(text) > limit:
        text = "…" + text[-(limit - 1):] if limit > 1 else "…"
    return text.replace("|", "\\|")


def completions_markdown(samples_or_path: str | Path | Sequence[dict[str, Any]], step: int | None = None,
                         max_chars: int = 120) -> str:
    """A Markdown section with the samples of ``step`` (default: the last step in the file) as a table; an empty
    string when there are none. Long texts keep their end (where the answer is), cut to ``max_chars``."""
    samples = (read_completions(samples_or_path) if isinstance(samples_or_path, (str, Path))
               else list(samples_or_path))
    if not samples:
        return ""
    step = max(s["step"] for s in samples) if step is None else step
    rows = [s for s in samples if s["step"] == step]
    if not rows:
        return ""
    lines = [f"## Sampled completions (train step {step})", "",
             "A few of the step's rollouts as the policy wrote them: the verifier's reward and the model's own "
             "score r_s (π_old, at rollout time; – when truncated).", "",
             "| sample | prompt (end) | response | answer | reward | score |", "|---|---|---|---|---|---|"]
    for s in rows:
        lines.append("| " + " | ".join([_cell(s.get("sample"), 8), _cell(s.get("prompt_tail"), max_chars // 2),
                                        _cell(s.get("response"), max_chars), _cell(s.get("answer"), 24),
                                        _cell(s.get("reward"), 8), _cell(s.get("score"), 8)]) + " |")
    return "\n".join([*lines, ""])
