"""Data sources for the prepare stage: readers, the synthetic arithmetic generator, answer cleaning, prompts.

Every reader yields :class:`Row` (a usable problem) or :class:`Reject` (a bad row, with where and why), so the
caller can count and report every row it drops. Nothing here writes files.

Light to import: ``datasets`` (Hugging Face sources) and ``pyarrow`` (parquet sources) are imported when used.
"""

from __future__ import annotations

import json
import numbers
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from laser.boxes import last_boxed
from laser.config import FewShotTurn, SourceParams
from laser.errors import SourceError


@dataclass(frozen=True)
class Row:
    id: str
    problem: str
    answer: str
    line: int  # 1-based line (jsonl), row number (parquet, hf) or draw number (synthetic)
    key: str = ""  # the held-out key (:func:`problem_keys`): for synthetic rows the expression, wording ignored

    def keys(self) -> set[str]:
        """Every key under which this row counts as the same problem as another (train/eval overlap)."""
        return problem_keys(self.problem) | ({self.key} if self.key else set())


@dataclass(frozen=True)
class Reject:
    line: int
    reason: str
    detail: str = ""


# -------------------------------------------------------------------------------------------------------- answers

_GSM8K_MARK = "####"
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strip_thousands(text: str) -> str:
    """``1,000`` -> ``1000`` for numbers with thousands separators; anything else unchanged."""
    return text.replace(",", "") if _THOUSANDS.match(text) else text


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution (``... <<16-3-4=9>>9 ...\\n#### 1,018``) -> ``1018``."""
    final = _CALCULATOR.sub("", solution.rsplit(_GSM8K_MARK, 1)[-1]).strip()
    final = final.removeprefix("$").rstrip(".").strip()
    return strip_thousands(final)


def clean_answer(value: Any) -> str | None:
    """A gold answer as a clean string, or None when it is unusable (the caller says why).

    Ints stay ints (``5`` -> ``'5'``; ``5.0`` -> ``'5'``), other floats use ``repr`` (``0.5`` -> ``'0.5'``).
    Strings are stripped; a GSM8K solution (with ``####``) gives its final answer; a solution with ``\\boxed{}``
    (e.g. MATH's ``solution`` field) gives the last boxed content. Booleans, lists, dicts: None.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _GSM8K_MARK in text:
        return gsm8k_final_answer(text)
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
    return text


_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\$")
_EXPRESSION = re.compile(r"\d+(?:\s*[-+*]\s*\d+)+")


def normalize_problem(text: str) -> str:
    """The text key for duplicate detection: case, ``$``, LaTeX spacing macros and all whitespace ignored."""
    return "".join(_LATEX_SPACING.sub("", text).casefold().split())


def expression_key(numbers_: Sequence[int], operators: Sequence[str]) -> str:
    """The canonical key of an arithmetic problem: operands and operators in order (``3+4``), wording ignored."""
    return "expr:" + "".join(f"{n}{op}" for n, op in zip(numbers_, [*operators, ""]))


def problem_keys(text: str) -> set[str]:
    """The keys of a free-text problem: its normalised text, and the expression key of a single arithmetic
    expression written in it (``What is 3 + 4?`` -> ``expr:3+4``), so a few-shot turn or a file problem that
    words a synthetic problem differently still counts as that problem."""
    keys = {"text:" + normalize_problem(text)}
    expressions = _EXPRESSION.findall(text)
    if len(expressions) == 1:
        tokens = re.findall(r"\d+|[-+*]", expressions[0])
        keys.add(expression_key([int(t) for t in tokens[::2]], tokens[1::2]))
    return keys


# -------------------------------------------------------------------------------------------------- file readers


def _row_from_record(record: Any, line: int, source: SourceParams, default_id: str) -> Row | Reject:
    if not isinstance(record, dict):
        return Reject(line, "not_an_object", f"found {type(record).__name__}")
    problem = record.get(source.problem_field)
    if problem is None:
        return Reject(line, "missing_problem", f"no field {source.problem_field!r}")
    if not isinstance(problem, str):
        return Reject(line, "invalid_problem", f"{source.problem_field!r} is a {type(problem).__name__}")
    if not problem.strip():
        return Reject(line, "empty_problem")
    if source.answer_field not in record or record[source.answer_field] is None:
        return Reject(line, "missing_answer", f"no field {source.answer_field!r}")
    try:
        answer = clean_answer(record[source.answer_field])
    except ValueError as err:  # an int past Python's digit limit (a parquet/hf int column or a Python caller)
        return Reject(line, "invalid_answer", f"{source.answer_field!r}: {str(err)[:200]}")
    if answer is None:
        return Reject(line, "invalid_answer", f"{source.answer_field!r} = {str(record[source.answer_field])[:80]!r}")
    if not answer:
        return Reject(line, "empty_answer")
    if source.id_field is not None:
        raw_id = record.get(source.id_field)
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
            return Reject(line, "missing_id", f"no field {source.id_field!r}")
        row_id = str(raw_id).strip()
    else:
        row_id = default_id
    return Row(row_id, problem.strip(), answer, line)


def read_jsonl(path: str | Path, source: SourceParams, id_prefix: str) -> Iterator[Row | Reject]:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"jsonl file not found: {path}")
    with path.open("rb") as lines:  # decoded line by line: one bad byte rejects its line, not the file
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a UTF-8 BOM (Windows editors) is no row
            except UnicodeDecodeError as err:
                yield Reject(number, "invalid_utf8", str(err))
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as err:  # bad JSON, an int past Python's digit limit, deep nesting
                yield Reject(number, "invalid_json", str(err)[:200])
                continue
            yield _row_from_record(record, number, source, f"{id_prefix}-{number:06d}")


def read_parquet(path: str | Path, source: SourceParams, id_prefix: str) -> Iterator[Row | Reject]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"parquet file not found: {path}")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:
        raise SourceError(f"{path} is not a readable parquet file ({type(err).__name__}: {err})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield _row_from_record(record, number, source, f"{id_prefix}-{number:06d}")


def read_hf(source: SourceParams, id_prefix: str) -> Iterator[Row | Reject]:
    what = f"Hugging Face dataset {source.dataset!r}" + (f" (config {source.config!r})" if source.config else "")
    try:
        import datasets

        dataset = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as err:  # offline, unknown name, missing split: one line, no traceback
        message = (str(err).strip().splitlines() or [""])[0][:200]
        raise SourceError(
            f"{what}, split {source.split!r}, could not be loaded ({type(err).__name__}: {message}). "
            "Offline? Save it once as a local file and use kind: jsonl (or parquet) with path: <file>") from None
    for number, record in enumerate(dataset, start=1):
        yield _row_from_record(record, number, source, f"{id_prefix}-{number:06d}")


# ---------------------------------------------------------------------------------------------------- synthetic

_NAMES = ("Tom", "Anna", "Ravi", "Mia", "Leo", "Sara", "Omar", "Lina", "Ben", "Yuki")
_OBJECTS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "eggs", "stamps")
_QUESTION_TEMPLATES = ("What is {expr}?", "Calculate {expr}.", "Compute {expr}.")
_WORD_TEMPLATES = {
    "+": ("{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
          "There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?"),
    "-": ("{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?",
          "There are {a} {obj} in a box. {name} takes out {b}. How many {obj} are left in the box?"),
    "*": ("{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
          "{name} buys {a} packs of {obj}. Each pack has {b} {obj}. How many {obj} does {name} buy?"),
}


def evaluate_expression(numbers_: Sequence[int], operators: Sequence[str]) -> int:
    """The exact value of ``n0 op0 n1 op1 n2 ...`` with the usual precedence (``*`` before ``+``/``-``)."""
    terms, signs = [numbers_[0]], [1]
    for op, value in zip(operators, numbers_[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


def _operand(rng: random.Random, source: SourceParams) -> int:
    max_digits = source.max_digits if source.max_operand is None else min(source.max_digits,
                                                                          len(str(source.max_operand)))
    digits = rng.randint(source.min_digits, max_digits)
    largest = 10**digits - 1 if source.max_operand is None else min(10**digits - 1, source.max_operand)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 1, largest)


class SyntheticProblem(NamedTuple):
    text: str
    answer: int
    key: str  # :func:`expression_key`: the same for every wording of these operands and operators


def _draw_problem(rng: random.Random, source: SourceParams, operators: list[str], word: bool,
                  tries: int = 100) -> SyntheticProblem | None:
    """A problem of this shape with a non-negative answer, or None when ``tries`` draws found none (some shapes
    have none: ten one-digit subtractions). One operation always succeeds at once."""
    for _ in range(tries):
        values = [_operand(rng, source) for _ in range(len(operators) + 1)]
        if len(operators) == 1 and operators[0] == "-" and values[0] < values[1]:
            values.reverse()
        answer = evaluate_expression(values, operators)
        if answer >= 0:
            break
    else:
        return None
    if word:
        template = rng.choice(_WORD_TEMPLATES[operators[0]])
        text = template.format(name=rng.choice(_NAMES), obj=rng.choice(_OBJECTS), a=values[0], b=values[1])
    else:
        expr = " ".join([str(values[0])] + [f"{op} {v}" for op, v in zip(operators, values[1:])])
        text = rng.choice(_QUESTION_TEMPLATES).format(expr=expr)
    return SyntheticProblem(text, answer, expression_key(values, operators))


def synthetic_problem(rng: random.Random, source: SourceParams, avoid: set[str] | frozenset = frozenset(),
                      tries: int = 20) -> SyntheticProblem:
    """One problem, its exact integer answer (never negative) and its key, drawn from ``rng``.

    The shape (number of operations, operators, word problem or not) is drawn first, then up to ``tries`` draws of
    numbers and wording look for a text not in ``avoid``; if the shape has none left, the last draw is returned.
    A shape with no non-negative answer is drawn again (one operation always has one, so this ends).
    """
    draw = None
    while draw is None:
        count = rng.randint(1, source.max_operations)
        operators = [rng.choice(source.operators) for _ in range(count)]
        word = count == 1 and rng.random() < source.word_fraction
        draw = _draw_problem(rng, source, operators, word)
    for _ in range(tries - 1):
        if draw.text not in avoid:
            break
        draw = _draw_problem(rng, source, operators, word) or draw
    return draw


def generate_synthetic(source: SourceParams, id_prefix: str) -> Iterator[Row | Reject]:
    """An endless, seeded stream of synthetic problems; the caller takes as many as it needs.

    Problems are distinct while the settings allow: when every problem of a shape has been produced (one-digit
    ``a + b`` has 81), that shape repeats rather than being skipped, so the mix of shapes stays as configured.
    """
    rng = random.Random(f"laser-synthetic-{source.seed}")
    seen: set[str] = set()
    number = 0
    while True:
        problem = synthetic_problem(rng, source, seen)
        seen.add(problem.text)
        number += 1
        yield Row(f"{id_prefix}-{number:06d}", problem.text, str(problem.answer), number, problem.key)


def read_source(source: SourceParams, id_prefix: str) -> Iterator[Row | Reject]:
    if source.kind == "synthetic":
        return generate_synthetic(source, id_prefix)
    if source.kind == "jsonl":
        return read_jsonl(source.path, source, id_prefix)
    if source.kind == "parquet":
        return read_parquet(source.path, source, id_prefix)
    if source.kind == "hf":
        return read_hf(source, id_prefix)
    raise SourceError(f"unknown source kind {source.kind!r}")


def source_label(source: SourceParams) -> str:
    """What the ``source`` column says: ``synthetic``, the file path, or ``hf:<dataset>[/<config>]``."""
    if source.kind == "synthetic":
        return "synthetic"
    if source.kind == "hf":
        return f"hf:{source.dataset}" + (f"/{source.config}" if source.config else "")
    return str(source.path)


# ------------------------------------------------------------------------------------------------------- prompts


def build_messages(problem: str, instruction: str, few_shot: Sequence[FewShotTurn]) -> list[dict[str, str]]:
    """Chat turns: the few-shot user/assistant pairs, then the problem; the first user turn starts with the
    instruction (no system turn: small chat models follow a user-turn instruction better)."""
    messages: list[dict[str, str]] = []
    for turn in few_shot:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    messages.append({"role": "user", "content": problem})
    if instruction.strip():
        messages[0] = {"role": "user", "content": f"{instruction.strip()}\n\n{messages[0]['content']}"}
    return messages


def render_plain(problem: str, instruction: str, few_shot: Sequence[FewShotTurn]) -> str:
    """The template for models without a chat template: the instruction, then ``Question: ...\nAnswer: ...``
    blocks (few-shot pairs, then the problem) ending with ``Answer:`` for the model to continue."""
    blocks = [f"Question: {turn.user}\nAnswer: {turn.assistant}" for turn in few_shot]
    blocks.append(f"Question: {problem}\nAnswer:")
    if instruction.strip():
        blocks.insert(0, instruction.strip())
    return "\n\n".join(blocks)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(problem: str, instruction: str, few_shot: Sequence[FewShotTurn], tokenizer,
                  prompt_format: str) -> tuple[list[dict[str, str]], str]:
    """(chat messages, prompt text). The text is the tokenizer's chat template with the generation prompt for
    ``chat`` when the tokenizer has one, else :func:`render_plain`."""
    messages = build_messages(problem, instruction, few_shot)
    if prompt_format == "chat" and has_chat_template(tokenizer):
        return messages, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages, render_plain(problem, instruction, few_shot)
