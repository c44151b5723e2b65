"""Stage prepare: the train set and every named eval set as parquet, with stats and a rejects file.

    python -m stages.prepare [--params params.yaml]

Sources (``prepare.train``, ``prepare.eval_sets.<name>``; see ``laser.config.SourceParams``): the seeded
``synthetic`` arithmetic generator, local ``jsonl`` / ``parquet`` files (``problem_field``, ``answer_field``,
``id_field`` map the columns; GSM8K ``#### N`` answers and ``\\boxed{}`` solutions give the final answer; numeric
answers are stringified), or a Hugging Face dataset (``hf``; offline it fails with one line naming it).

Outputs, each written atomically:

- ``paths.train_data`` and ``{paths.eval_data_dir}/<name>.parquet``, one row per problem, with the schema
  :data:`SCHEMA`:

  ====================  ===========================================  ==============================================
  ``id``                string, unique within the file                ``id_field`` value, else ``<set>-<n:06d>``
  ``source``            string                                        ``synthetic``, the file path, ``hf:<name>``
  ``split``             string                                        the source's ``split`` label
  ``problem``           string                                        the problem text, stripped
  ``answer``            string                                        the clean gold answer (``18``, ``\\frac{1}{2}``)
  ``messages``          list<struct<role: string, content: string>>   few-shot user/assistant turns, then the
                                                                      problem; the first user turn starts with
                                                                      ``prepare.instruction``
  ``prompt``            string                                        the rendered prompt text: the chat template
                                                                      with the generation prompt, or the plain
                                                                      ``Question: ...\\nAnswer:`` template
  ``prompt_tokens``     int64                                         tokens in ``prompt`` (no special tokens added)
  ====================  ===========================================  ==============================================

- ``paths.data_stats``: JSON: per set (``train``, ``eval/<name>``) its source, split, rows read, rows kept,
  rejects by reason, the reject fraction, duplicates removed (train) and prompt-token stats; plus totals.
- ``paths.data_rejects``: JSON lines ``{"set", "file", "line", "reason", "detail"}``: every row not kept (bad rows;
  train rows that repeat an eval problem, reason ``duplicate_of_eval``; eval rows that repeat a few-shot turn,
  reason ``duplicate_of_few_shot``; both with ``overlaps``: the set or turn repeated).

Rows are read in order until a set has ``limit`` rows (``num_problems`` for synthetic); rejected and duplicate
rows do not count towards it. Rejects: ``invalid_json``, ``not_an_object``, ``missing_problem``,
``invalid_problem``, ``empty_problem``, ``missing_answer``, ``invalid_answer``, ``empty_answer``, ``missing_id``,
``duplicate_id``, ``prompt_too_long`` (> ``max_prompt_tokens``). When a set's rejected fraction exceeds
``max_reject_fraction``, the stage writes the stats and rejects, not the data, and fails naming the set and the
reasons.

Held out by construction: two problems are the same when they share a key (:func:`laser.data.problem_keys`): the
text up to case, ``$``, LaTeX spacing and whitespace, or, for arithmetic, the operands and operators in order
whatever the wording (``What is 3 + 4?`` = ``Tom has 3 apples and gets 4 more...``). Eval sets leave out problems
that repeat a few-shot turn (its answer is in the prompt); train leaves out every problem that repeats an eval
problem. ``stats["held_out"][<eval set>]`` counts both removals and re-checks the written rows: overlap 0.
The output is a pure function of the params (and the source files): same seed, same bytes.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laser.config import Params, PrepareParams, SourceParams
from laser.data import (
    Reject,
    Row,
    has_chat_template,
    problem_keys,
    read_source,
    render_prompt,
    source_label,
)
from laser.errors import SourceError

log = logging.getLogger("laser.stages.prepare")

_BATCH = 256  # rows tokenized at once


def schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("prompt", pa.string()),
        ("prompt_tokens", pa.int64()),
    ])


@dataclass
class PreparedSet:
    name: str  # "train" or "eval/<name>"
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    rejects: list[dict[str, Any]]

    def table(self):
        import pyarrow as pa

        return pa.Table.from_pylist(self.rows, schema=schema())


@dataclass
class PreparedData:
    train: PreparedSet
    eval_sets: dict[str, PreparedSet]
    stats: dict[str, Any]
    rejects: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)  # reject limits exceeded: the data must not be written


@dataclass(frozen=True)
class _Exclusion:
    """Why a row whose key is excluded from a set is removed: the reason, and the set (or turn) it repeats."""
    reason: str  # duplicate_of_eval | duplicate_of_few_shot
    other: str  # the eval set, or "few_shot[i]"


@dataclass
class _SetBuilder:
    """One set being built: the rows kept (and their held-out keys), the rows rejected (with file and line) and
    the counters."""
    name: str  # "train" or "eval/<name>"
    label: str  # the source, as written in stats and rejects
    rows: list[dict[str, Any]] = field(default_factory=list)
    keys: list[set[str]] = field(default_factory=list)  # keys[i]: Row.keys() of rows[i]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # bad rows by reason (held-out removals are not bad)
    removed: Counter[str] = field(default_factory=Counter)  # held-out removals by the set or turn they repeat
    seen_ids: set[str] = field(default_factory=set)
    read: int = 0

    def reject(self, line: int, reason: str, detail: str = "", *, bad: bool = True, **extra: Any) -> None:
        if bad:
            self.reasons[reason] += 1
        self.rejects.append({"set": self.name, "file": self.label, "line": line, "reason": reason,
                             "detail": detail, **extra})

    def take(self, stream: Iterator[Row | Reject], want: int, exclude: dict[str, _Exclusion],
             max_read: int | None = None) -> list[Row] | None:
        """Up to ``want`` valid rows from ``stream`` whose keys are not excluded, reading at most ``max_read``
        items (an endless generator whose rows are all excluded would fill nothing); None once it is exhausted."""
        batch: list[Row] = []
        for read, item in enumerate(stream, 1):
            self.read += 1
            if isinstance(item, Reject):
                self.reject(item.line, item.reason, item.detail)
            elif (hit := _excluded(item, exclude)) is not None:
                self.removed[hit.other] += 1
                self.reject(item.line, hit.reason, f"same problem as {hit.other!r}", bad=False, overlaps=hit.other)
            else:
                batch.append(item)
            if len(batch) == want or read == max_read:
                return batch
        return batch or None

    def admit(self, batch: list[Row], source: SourceParams, params: PrepareParams, tokenizer) -> None:
        """Render and tokenize ``batch`` (one tokenizer call: the cost of this stage) and keep the rows that fit."""
        rendered = [render_prompt(r.problem, params.instruction, params.few_shot, tokenizer, params.prompt_format)
                    for r in batch]
        counts = [len(ids) for ids in tokenizer([p for _, p in rendered], add_special_tokens=False)["input_ids"]]
        for row, (messages, prompt), n_tokens in zip(batch, rendered, counts):
            if n_tokens > params.max_prompt_tokens:
                self.reject(row.line, "prompt_too_long",
                            f"{n_tokens} tokens > max_prompt_tokens {params.max_prompt_tokens}")
            elif row.id in self.seen_ids:
                self.reject(row.line, "duplicate_id", f"id {row.id!r} seen before")
            else:
                self.seen_ids.add(row.id)
                self.keys.append(row.keys())
                self.rows.append({"id": row.id, "source": self.label, "split": source.split, "problem": row.problem,
                                  "answer": row.answer, "messages": messages, "prompt": prompt,
                                  "prompt_tokens": n_tokens})

    def stats(self, source: SourceParams, target: int | None) -> dict[str, Any]:
        rejected = sum(self.reasons.values())
        token_counts = [r["prompt_tokens"] for r in self.rows]
        stats = {
            "source": self.label,
            "kind": source.kind,
            "split": source.split,
            "rows": len(self.rows),
            "rows_read": self.read,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(self.reasons.items())),
            "reject_fraction": rejected / self.read if self.read else 0.0,
            "held_out_removed": dict(sorted(self.removed.items())),
            "prompt_tokens": {
                "min": min(token_counts, default=0),
                "mean": round(statistics.fmean(token_counts), 2) if token_counts else 0.0,
                "max": max(token_counts, default=0),
            },
        }
        if target is not None and len(self.rows) < target:
            stats["short_by"] = target - len(self.rows)  # the source ran out (or the generator found no new problems)
        return stats


def _removed_note(stats: dict[str, Any]) -> str:
    """Why a synthetic set stopped when its held-out removals, not its bad rows, used up the reads."""
    removed = sum(stats["held_out_removed"].values())
    if stats["kind"] != "synthetic" or removed <= stats["rejected"]:
        return ""
    return (f"; {removed} more repeated a held-out problem ({stats['held_out_removed']}): the generator's problems "
            "are mostly the eval sets' (widen it: max_operand, max_digits, operators; or shrink the eval sets)")


def _excluded(row: Row, exclude: dict[str, _Exclusion]) -> _Exclusion | None:
    return next((exclude[key] for key in sorted(row.keys()) if key in exclude), None)


def _hopeless(rejected: int, removed: int, target: int, params: PrepareParams) -> bool:
    """True once an endless source's rejects exceed the limit even if every later row were kept (or, with no
    limit, exceed ten times the set), or its held-out removals exceed ten times the set (the generator's space is
    mostly the eval sets'): it stops instead of reading forever, and prepare() fails."""
    return (rejected > params.max_reject_fraction * (target + rejected) or rejected > 10 * target + _BATCH
            or removed > 10 * target + _BATCH)


def _build_set(set_name: str, source: SourceParams, params: PrepareParams, tokenizer,
               exclude: dict[str, _Exclusion]) -> tuple[PreparedSet, list[set[str]]]:
    """Read ``source`` until the set is full, leaving out rows with a key in ``exclude``; returns the set and
    the keys of its rows."""
    target = source.num_problems if source.kind == "synthetic" else source.limit
    builder = _SetBuilder(set_name, source_label(source))
    stream = read_source(source, set_name.removeprefix("eval/"))
    while target is None or len(builder.rows) < target:
        batch = builder.take(stream, _BATCH if target is None else min(_BATCH, target - len(builder.rows)), exclude,
                             max_read=_BATCH if source.kind == "synthetic" else None)
        if batch is None:
            break
        if batch:  # empty: a synthetic read whose rows were all held out
            builder.admit(batch, source, params, tokenizer)
        if source.kind == "synthetic" and _hopeless(sum(builder.reasons.values()), sum(builder.removed.values()),
                                                    target, params):
            break  # an endless source whose rows keep failing (every prompt too long, say) would never fill the set
    return PreparedSet(set_name, builder.rows, builder.stats(source, target), builder.rejects), builder.keys


def few_shot_exclusions(params: PrepareParams) -> dict[str, _Exclusion]:
    """The keys of the few-shot turns: an eval problem equal to one has its answer in the prompt."""
    return {key: _Exclusion("duplicate_of_few_shot", f"few_shot[{i}]")
            for i, turn in enumerate(params.few_shot) for key in problem_keys(turn.user)}


def held_out_report(train_keys: list[set[str]], eval_keys: dict[str, list[set[str]]],
                    params: PrepareParams, removed: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per eval set: the rows removed to hold it out, and the overlap that is left (checked on the rows written,
    independently of the removal: 0 by construction)."""
    in_train = set().union(*train_keys)
    in_few_shot = set(few_shot_exclusions(params))
    return {name: {"train_rows_removed": removed["train"].get(name, 0),
                   "eval_rows_removed_as_few_shot": sum(removed[f"eval/{name}"].values()),
                   "overlap_with_train": sum(bool(k & in_train) for k in keys),
                   "overlap_with_few_shot": sum(bool(k & in_few_shot) for k in keys)}
            for name, keys in eval_keys.items()}


def prepare(params: PrepareParams, tokenizer) -> PreparedData:
    """Build every set, eval sets first: they leave out problems that repeat a few-shot turn, and train leaves out
    every problem that shares a key with an eval problem (same text up to case and spacing, or same operands and
    operators in any wording). Pure: nothing is written."""
    few_shot = few_shot_exclusions(params)
    built = {name: _build_set(f"eval/{name}", source, params, tokenizer, few_shot)
             for name, source in params.eval_sets.items()}
    eval_sets = {name: prepared for name, (prepared, _) in built.items()}
    exclude: dict[str, _Exclusion] = {}
    for name, (_, keys) in built.items():
        for key in set().union(*keys):
            exclude.setdefault(key, _Exclusion("duplicate_of_eval", name))
    train, train_keys = _build_set("train", params.train, params, tokenizer, exclude)
    removed = {s.name: s.stats["held_out_removed"] for s in [train, *eval_sets.values()]}
    held_out = held_out_report(train_keys, {name: keys for name, (_, keys) in built.items()}, params, removed)

    all_sets = [train, *eval_sets.values()]
    errors = []
    for prepared in all_sets:
        s = prepared.stats
        if s["rows"] == 0:
            errors.append(f"{prepared.name} ({s['source']}): no usable rows (read {s['rows_read']}, rejected "
                          f"{s['rejected_by_reason'] or 'none'}{_removed_note(s)})")
        elif s["reject_fraction"] > params.max_reject_fraction:
            errors.append(f"{prepared.name} ({s['source']}): {s['rejected']} of {s['rows_read']} rows rejected "
                          f"({s['reject_fraction']:.1%} > prepare.max_reject_fraction "
                          f"{params.max_reject_fraction:.1%}): {s['rejected_by_reason']}")
        elif s["kind"] == "synthetic" and s.get("short_by"):  # a generator never runs out: it was stopped
            errors.append(f"{prepared.name} ({s['source']}): stopped {s['short_by']} rows short after "
                          f"{s['rejected']} rejected rows: {s['rejected_by_reason']}{_removed_note(s)}")
    totals: Counter[str] = Counter()
    for prepared in all_sets:
        totals.update(prepared.stats["rejected_by_reason"])
    use_chat = params.prompt_format == "chat" and has_chat_template(tokenizer)
    stats = {
        "prompt_format": "chat" if use_chat else "plain",
        "prompt_format_requested": params.prompt_format,
        "few_shot_turns": len(params.few_shot),
        "max_prompt_tokens": params.max_prompt_tokens,
        "sets": {prepared.name: prepared.stats for prepared in all_sets},
        "rows": {prepared.name: prepared.stats["rows"] for prepared in all_sets},
        "rejected_by_reason": dict(sorted(totals.items())),
        "held_out": held_out,
        "duplicates_of_eval_removed": sum(v["train_rows_removed"] for v in held_out.values()),
        "ok": not errors,
        "errors": errors,
    }
    rejects = [r for prepared in all_sets for r in prepared.rejects]
    return PreparedData(train, eval_sets, stats, rejects, errors)


def write_outputs(prepared: PreparedData, paths) -> None:
    """Stats and rejects always (to explain a failure); the parquet files only when there is no error."""
    import json

    import pyarrow.parquet as pq

    from laser.io import atomic_path, atomic_write_json

    atomic_write_json(paths.data_stats, prepared.stats)
    with atomic_path(paths.data_rejects) as tmp, tmp.open("w") as out:
        for record in prepared.rejects:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    if prepared.errors:
        return
    targets = [(prepared.train, Path(paths.train_data))]
    targets += [(s, Path(paths.eval_data_dir) / f"{name}.parquet") for name, s in prepared.eval_sets.items()]
    for prepared_set, path in targets:
        with atomic_path(path) as tmp:
            pq.write_table(prepared_set.table(), tmp)


def run(params: Params, args) -> None:
    from laser.errors import StageError
    from laser.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(params.model.name, params.paths.cache_dir),
                               params.model.trust_remote_code)
    try:
        prepared = prepare(params.prepare, tokenizer)
    except SourceError as err:
        raise StageError(str(err)) from None
    write_outputs(prepared, params.paths)
    if prepared.errors:
        raise StageError("prepare: " + "; ".join(prepared.errors) + f" (details: {params.paths.data_rejects})")
    for name, count in prepared.stats["rows"].items():
        log.info("%s: %d rows", name, count)
    log.info("rejected %s; held out: %s", prepared.stats["rejected_by_reason"] or "none", prepared.stats["held_out"])


def main(argv=None) -> None:
    from laser.cli import stage_main

    stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
