"""Answer equivalence for voting (plumbing of the ``evaluate`` stage): which extracted answers count as the same.

Per problem, answers are grouped by exact match after light normalisation (:func:`normalize_answer`); two plain
numbers are compared numerically; every other pair of group representatives goes to an :data:`EquivalenceFn` (a
batch of (a, b) pairs -> bools), and groups judged equivalent are merged (transitively) by
:func:`cluster_answers`. :func:`verifier_equivalent` uses the math-verify process pool of :mod:`laser.verify` (hard
timeouts); :func:`math_verify_equivalent` runs the same check (:func:`laser.verify.check_answer`) in-process.
Both import math-verify lazily, so importing this module stays light.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

EquivalenceFn = Callable[[Sequence[tuple[str, str]]], list[bool]]

MAX_VERIFY_CHARS = 300  # longer answers are compared as normalised strings only (math-verify can hang on them)

_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle")


def normalize_answer(answer: Any) -> str | None:
    """Light normalisation for exact matching: strip ``$``, spacing macros, ``\\left``/``\\right``, whitespace,
    a trailing period; ``\\dfrac``/``\\tfrac`` -> ``\\frac``. None (or NaN, or empty after normalising) -> None."""
    if not isinstance(answer, str):
        return None
    s = answer.strip().strip("$")
    s = _LATEX_SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = "".join(s.split()).rstrip(".")
    return s or None


def _as_number(normalized: str) -> float | None:
    try:
        value = float(normalized)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def math_verify_equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """In-process equivalence of answer pairs (a as gold, b as prediction) by the verifier's own
    :func:`laser.verify.check_answer`, the check the workers run in production (math-verify's signal timeouts
    off: they work only on the main thread).

    Guarded: an answer longer than ``MAX_VERIFY_CHARS``, or a pair check_answer cannot judge, gives False. There
    is no hard timeout here; :func:`verifier_equivalent` runs the same check in a process pool that has one.
    """
    if not pairs:
        return []
    from laser.verify import check_answer

    gold_cache: dict = {}
    return [max(len(a), len(b)) <= MAX_VERIFY_CHARS and check_answer(b, a, gold_cache)[0] == "correct"
            for a, b in pairs]


def verifier_equivalent(timeout_s: float, num_workers: int = 2, unjudged: Counter | None = None) -> EquivalenceFn:
    """An equivalence function backed by :func:`laser.verify.verify_batch` (process pool, hard timeouts):
    b is equivalent to a when ``\\boxed{b}`` verifies "correct" against gold a. A pair it cannot judge (a
    timeout, an error, an answer over ``MAX_VERIFY_CHARS``) counts as not equivalent and is counted in
    ``unjudged`` by reason."""

    def equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
        if not pairs:
            return []
        from laser.boxes import boxed
        from laser.verify import UNJUDGED, verify_batch

        keep = [i for i, (a, b) in enumerate(pairs) if max(len(a), len(b)) <= MAX_VERIFY_CHARS]
        verdicts = verify_batch([boxed(pairs[i][1]) for i in keep], [pairs[i][0] for i in keep],
                                timeout_s=timeout_s, num_workers=num_workers)
        out = [False] * len(pairs)
        for i, verdict in zip(keep, verdicts):
            out[i] = verdict.status == "correct"
        if unjudged is not None:
            unjudged["too_long"] += len(pairs) - len(keep)
            unjudged.update(v.status for v in verdicts if v.status in UNJUDGED)
        return out

    return equivalent


# ------------------------------------------------------------------------------------------------------ clustering


class _ExactGroups:
    """One problem's answers grouped by exact match after :func:`normalize_answer`: ``ids[i]`` is sample i's group
    (-1 for no answer), ``reps[g]`` group g's first raw answer (stripped), ``numbers[g]`` its value if a plain
    number. ``parents`` is a union-find forest over the groups (a root is the smallest group id of its set)."""

    def __init__(self, answers: Sequence[Any]) -> None:
        index: dict[str, int] = {}
        self.ids: list[int] = []
        self.reps: list[str] = []
        self.numbers: list[float | None] = []
        for answer in answers:
            key = normalize_answer(answer)
            if key is None:
                self.ids.append(-1)
                continue
            if key not in index:
                index[key] = len(self.reps)
                self.reps.append(answer.strip())
                self.numbers.append(_as_number(key))
            self.ids.append(index[key])
        self.parents = list(range(len(self.reps)))

    def find(self, g: int) -> int:
        parents = self.parents
        while parents[g] != g:
            parents[g] = parents[parents[g]]
            g = parents[g]
        return g

    def union(self, g: int, h: int) -> None:
        g, h = self.find(g), self.find(h)
        if g != h:
            self.parents[max(g, h)] = min(g, h)

    def cluster_ids(self) -> list[int]:
        """Sample -> cluster id in 0..C-1, numbered by first appearance; -1 for no answer."""
        renumber: dict[int, int] = {}
        return [-1 if g < 0 else renumber.setdefault(self.find(g), len(renumber)) for g in self.ids]


def _merge_numbers_and_collect_queries(
        groups: Sequence[_ExactGroups]) -> dict[tuple[str, str], list[tuple[int, int, int]]]:
    """Merge groups whose representatives are numerically equal plain numbers; every other pair of groups of a
    problem becomes a query: (rep_g, rep_h) -> [(problem, g, h), ...], in first-seen order."""
    queries: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for p, grp in enumerate(groups):
        rep, num = grp.reps, grp.numbers
        for g in range(len(rep)):
            for h in range(g + 1, len(rep)):
                if num[g] is not None and num[h] is not None:
                    if math.isclose(num[g], num[h], rel_tol=1e-9, abs_tol=1e-12):
                        grp.union(g, h)
                else:
                    queries.setdefault((rep[g], rep[h]), []).append((p, g, h))
    return queries


def cluster_answers(problems: Sequence[Sequence[Any]], equivalent: EquivalenceFn) -> tuple[list[list[int]], int]:
    """Cluster ids per problem: ``problems[p][i]`` is sample i's extracted answer (str or None).

    Returns (ids, number of pairs sent to ``equivalent``): ``ids[p][i]`` is -1 for no answer, else a cluster id
    in 0..C-1 numbered by first appearance. All pairs of all problems go to ``equivalent`` in one batch.
    """
    groups = [_ExactGroups(answers) for answers in problems]
    queries = _merge_numbers_and_collect_queries(groups)
    pairs = list(queries)
    verdicts = equivalent(pairs) if pairs else []
    if len(verdicts) != len(pairs):
        raise ValueError(f"equivalence function returned {len(verdicts)} verdicts for {len(pairs)} pairs")
    for pair, same in zip(pairs, verdicts):
        if same:
            for p, g, h in queries[pair]:
                groups[p].union(g, h)
    return [grp.cluster_ids() for grp in groups], len(pairs)
