"""Answer verification with math-verify in a pool of worker processes: any thread, hard per-item timeouts.

``verify_batch(responses, golds, timeout_s=...)`` returns one :class:`Verdict` per response:

- the predicted answer is the content of the response's last complete ``\\boxed{...}`` (or ``\\fbox{...}``),
  found here with balanced braces; none (or an empty one) -> ``no_answer``. With ``require_single_boxed`` (the
  official format gate) a response with more than one box is ``no_answer`` too (``pred_answer`` keeps the last);
- ``\\boxed{pred}`` and ``\\boxed{gold}`` are parsed and compared by math-verify -> ``correct`` / ``incorrect``;
- an item still running after ``timeout_s`` -> ``timeout``: its worker is killed and replaced, the rest of the
  batch goes on;
- an exception while parsing or comparing (math-verify is called with ``raise_on_error=True``), a gold answer that
  does not parse, an answer math-verify gives up parsing (too deep, too many digits: it would fall back to a
  string compare), or a worker that dies -> ``error`` with the message. Errors are statuses, never a silent 0:
  :func:`summarize` counts them.

Why processes: math-verify's own timeouts use ``signal.alarm``, which works only in the main thread (Prefect runs
tasks in threads) and cannot stop C-level big-integer work. Here they are disabled and the parent enforces the
deadline instead. Workers are plain ``python -c`` subprocesses talking over two pipes: safe to start from a
threaded parent, and, unlike multiprocessing's spawn/forkserver, they never re-import the caller's ``__main__``.
A replaced worker needs ~1 s to import math-verify; the other workers go on meanwhile.

Throughput: work goes out in chunks; a worker streams one small message per finished item, so the parent always
knows which item is running and since when: the deadline is per item (``timeout_s`` from the moment the parent
sees the previous item finish), with no re-runs. Finding the boxes runs in the workers too, inside that
deadline, in one linear pass. Identical (response, gold) pairs in a batch are verified once; a worker caches
parsed gold answers and its verdicts per (answer, gold); plain integers and integer fractions skip LaTeX parsing
(:func:`fast_parse`, which builds exactly what math-verify's parser would). Measured numbers: bench/bench_verify.py.

Threads: a :class:`VerifierPool` serves calls from several threads one batch at a time (a lock); the
module-level :func:`verify_batch` uses one shared pool per ``num_workers``, started on first use, closed at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import math
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Literal

from laser.boxes import boxed, find_boxes, has_box, last_boxed
from laser.errors import VerifierError

Status = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
STATUSES: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "error")
UNJUDGED: frozenset[str] = frozenset({"timeout", "error"})  # no verdict: reward 0 would be a guess, not a judgement

_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy 2-core machine can take a while
_MAX_CHUNK = 32
_GOLD_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Verdict:
    status: Status
    reward: int  # 1 only for "correct"
    pred_answer: str | None  # content of the last \boxed{}; None when there is none
    error: str | None = None  # the message, for status "error" (and "timeout")


# ------------------------------------------------------------------------------------------------- gold answers


def _gold_string(gold: object) -> str:
    """A gold answer as the string sent to the workers (cheap; the box, if any, is taken off there)."""
    if gold is None:
        return ""  # -> status "error" (an unparseable gold), never a silent "incorrect"
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    try:
        return str(gold).strip()
    except ValueError:  # an int past Python's digit limit: "error" (gold not parsed), not an exception here
        return ""


def _gold_text(gold: object) -> str:
    text = _gold_string(gold)
    inner = last_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    return inner if inner is not None else text


# ----------------------------------------------------------------------------------------------------- the worker


def _quiet_math_verify() -> None:
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


_INTEGER = re.compile(r"[+-]?\d{1,100}")
_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(-?\d{1,100})\}\{(\d{1,100})\}")
_SLASH = re.compile(r"(-?\d{1,100})/(\d{1,100})")


def fast_parse(answer: str) -> list | None:
    """What ``math_verify.parse(boxed(answer))`` returns, built directly for plain integers and integer
    fractions (``\\frac``, ``\\dfrac``, ``\\tfrac``, ``a/b``), or None for anything else.

    Latex parsing is ~1 ms per answer, nearly all of the verification time of typical answers; this skips it.
    tests/test_verify.py checks it against ``parse`` on many strings.
    """
    from sympy import Integer, Rational

    if _INTEGER.fullmatch(answer):
        return [Integer(int(answer)), answer]
    match = _FRACTION.fullmatch(answer)
    if match and int(match[3]) != 0:
        sign, num, den = match.groups()
        value = Rational(int(num), int(den))
        return [-value if sign else value, re.sub(r"\\[dt]frac", r"\\frac", answer, count=1)]
    match = _SLASH.fullmatch(answer)
    if match and int(match[2]) != 0:
        return [Rational(int(match[1]), int(match[2])), f"\\frac{{{match[1]}}}{{{match[2]}}}"]
    return None


_gave_up: list[str] = []  # why math-verify's LaTeX parser gave up during the current _parse (see _probe_giving_up)


def _probe_giving_up() -> bool:
    """Record, in ``_gave_up``, every time math-verify's LaTeX parser gives up rather than rejects the syntax.

    math-verify swallows parser exceptions and falls back to comparing the answer as a plain string, so a failure
    to judge (``1+1+...+1`` with 5001 terms: ``RecursionError``; an integer past Python's digit limit) would read
    as ``incorrect``. latex2sympy reports malformed LaTeX with a plain ``Exception`` (the model's answer is wrong);
    anything else (recursion, size limits, sympy errors) means the parser gave up. Returns False when math-verify
    no longer has the hook (then any answer that parses only as a string counts as given up).
    """
    import math_verify.parser as parser

    original = getattr(parser, "parse_latex_cached", None)
    if original is None:
        return False
    if getattr(original, "_laser_probe", False):
        return True

    def probed(latex: str):
        try:
            return original(latex)
        except Exception as err:
            if type(err) is not Exception:
                _gave_up.append(f"{type(err).__name__}: {str(err)[:200]}")
            raise

    probed._laser_probe = True  # type: ignore[attr-defined]
    parser.parse_latex_cached = probed
    return True


def _parse(answer: str) -> tuple[list, str | None]:
    """math-verify's parse of ``\\boxed{answer}``, and why the parser gave up (None: it did not) when nothing but
    the string itself came out."""
    from math_verify import parse

    fast = fast_parse(answer)
    if fast is not None:
        return fast, None
    probing = _probe_giving_up()
    _gave_up.clear()
    parsed = parse(boxed(answer), parsing_timeout=None, raise_on_error=True)
    if not parsed or any(not isinstance(x, str) for x in parsed):
        return parsed, None  # nothing extracted (no math in it), or parsed
    if _gave_up:
        return parsed, _gave_up[-1]
    return parsed, None if probing else "math-verify could parse it only as a string"


def check_answer(pred: str, gold: str, gold_cache: dict | None = None) -> tuple[str, str | None]:
    """(status, error) for one extracted answer against one gold answer, in this process, with no timeout.

    ``error`` also when math-verify gives up parsing either answer (too deep, too many digits): its fallback,
    a string compare, would turn a failure to judge into ``incorrect``. Malformed LaTeX stays ``incorrect``.
    The workers run this; it is public for tests and single-process baselines. Never call it on untrusted
    input from a thread that must not hang.
    """
    from math_verify import verify

    try:
        if gold_cache is not None and gold in gold_cache:
            gold_parsed, gold_gave_up = gold_cache[gold]
        else:
            gold_parsed, gold_gave_up = _parse(gold)
            if gold_cache is not None:
                if len(gold_cache) >= _GOLD_CACHE_SIZE:
                    gold_cache.clear()
                gold_cache[gold] = (gold_parsed, gold_gave_up)
        if not gold_parsed or gold_gave_up:
            return "error", f"gold answer could not be parsed: {gold[:200]!r}" + (
                f" ({gold_gave_up})" if gold_gave_up else "")
        pred_parsed, pred_gave_up = _parse(pred)
        if not pred_parsed:
            return "incorrect", None
        ok = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)
    except Exception as err:  # counted as an error by the caller, never a silent 0
        return "error", f"{type(err).__name__}: {str(err)[:300]}"
    if pred_gave_up and not ok:  # an equal string is still a match; anything else was never judged
        return "error", f"math-verify gave up parsing the answer ({pred_gave_up}): not judged"
    return ("correct" if ok else "incorrect"), None


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent process is gone, so an orphaned worker never keeps computing."""
    import os

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="laser-verify-watchdog").start()


# One of each common LaTeX construct: parsing each kind the first time costs ~0.1 s of lazy initialisation.
WARMUP_PAIRS = (
    ("\\frac{\\sqrt{3}}{2}+x", "\\dfrac{\\sqrt3}{2}+x"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"),
    ("[1,2) \\cup (3, \\infty)", "x>1"), ("2.5", "\\frac52"), ("\\text{(A)}", "A"), ("x^2+2x+1", "(x+1)^2"),
    ("10\\%", "0.1"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"), ("y = 2x+1", "2x+1"),
    ("5\\sqrt{2}", "\\sqrt{50}"), ("\\{1,2\\}", "1,2"), ("3^\\circ", "3"), ("\\$5.00", "5"), ("\\log_2 8", "3"),
)


def _worker_main(read_fd: int, write_fd: int, parent_pid: int, warmup: bool = False) -> None:
    """Entry point of a worker process (``python -c``): chunks of (seq, response, gold, require_single_boxed) in;
    per item, (seq, None, None, pred) once the answer is extracted, then (seq, status, error, pred)."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _watch_parent(parent_pid)
    try:
        import math_verify  # noqa: F401

        _quiet_math_verify()
        if warmup:
            for pred, gold in WARMUP_PAIRS:
                check_answer(pred, gold)
    except BaseException:
        outbox.send(("fatal", traceback.format_exc()))
        return
    outbox.send(("ready", None))
    cache: dict = {}
    verdicts: dict[tuple[str, str], tuple[str, str | None]] = {}
    while True:
        try:
            chunk = inbox.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for seq, response, gold, single in chunk:
            boxes = find_boxes(response)  # here, not in the caller: the item's deadline covers the scan
            pred = boxes[-1].strip() if boxes else None
            if not pred or (single and len(boxes) != 1):
                outbox.send((seq, "no_answer", None, pred))
                continue
            pair = (pred, _gold_text(gold))
            if pair not in verdicts:  # the same answer from another response: judged once per worker
                outbox.send((seq, None, None, pred))  # the caller keeps pred_answer even if the check times out
                if len(verdicts) >= _GOLD_CACHE_SIZE:
                    verdicts.clear()
                verdicts[pair] = check_answer(*pair, cache)
            outbox.send((seq, *verdicts[pair], pred))


# ----------------------------------------------------------------------------------------------------- the pool


class _Worker:
    """One worker process, started as ``python -c`` with two pipes (no multiprocessing start method, so no
    re-import of the caller's ``__main__`` and nothing inherited from a threaded parent)."""

    def __init__(self, warmup: bool = False) -> None:
        import os

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = (f"from laser.verify import _worker_main; "
                f"_worker_main({to_child_r}, {from_child_w}, {os.getpid()}, {warmup})")
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w),
                                            stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.inbox = Connection(from_child_r, writable=False)
        self.outbox = Connection(to_child_w, readable=False)
        self.ready = False
        self.started = time.monotonic()
        self.pending: collections.deque[int] = collections.deque()  # seqs sent, not yet answered, in order
        self.deadline = math.inf

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(5)
        self._close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.outbox.send(None)
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def _close(self) -> None:
        for conn in (self.inbox, self.outbox):
            with contextlib.suppress(Exception):
                conn.close()


class VerifierPool:
    """A long-lived pool of verifier processes; ``verify_batch`` may be called from any thread.

    Calls from several threads are served one batch at a time. Use as a context manager or call ``close()``.
    """

    def __init__(self, num_workers: int = 2, *, warmup: bool = False) -> None:
        """``warmup``: each worker parses a few LaTeX forms before it reports ready (~1 s CPU), so the first
        MATH-style answers do not pay math-verify's lazy initialisation; useless for integer answers."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.warmup = warmup
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.stats = collections.Counter()  # restarts, timeouts, worker deaths over the pool's life

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for worker in self._workers:
                worker.stop()
            self._workers = []

    def start(self) -> None:
        """Start the workers now and wait until they are ready (otherwise the first batch does it)."""
        with self._lock:
            self._ensure_workers()
            for worker in self._workers:
                while not worker.ready:
                    self._await_ready(worker)

    # -------------------------------------------------------------------------------------------------- public

    def verify_batch(self, responses: Sequence[str], golds: Sequence[object], *, timeout_s: float,
                     require_single_boxed: bool = False) -> list[Verdict]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        verdicts: list[Verdict | None] = [None] * len(responses)
        jobs: dict[tuple[str, str, bool], list[int]] = {}  # identical (response, gold) pairs are verified once
        for i, (response, gold) in enumerate(zip(responses, golds)):
            response = response or ""
            if not has_box(response):  # a substring test (linear, in C): no box, no answer
                verdicts[i] = Verdict("no_answer", 0, None)
                continue
            # Everything else, finding the boxes included, runs in the workers under the per-item deadline.
            jobs.setdefault((response, _gold_string(gold), bool(require_single_boxed)), []).append(i)
        if jobs:
            keys = list(jobs)
            with self._lock:
                if self._closed:
                    raise VerifierError("the VerifierPool is closed")
                results = self._run(keys, float(timeout_s))
            for key, (status, err, pred) in zip(keys, results):
                for i in jobs[key]:
                    verdicts[i] = Verdict(status, int(status == "correct"), pred, err)
        return verdicts  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------ internals

    def _ensure_workers(self) -> None:
        self._workers = [w for w in self._workers if w.alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.warmup))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.warmup)
        self.stats["restarts"] += 1

    def _await_ready(self, worker: _Worker) -> None:
        left = worker.started + _STARTUP_TIMEOUT_S - time.monotonic()
        if left <= 0 or not worker.inbox.poll(left):
            worker.kill()
            raise VerifierError(f"a verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
        self._handle_startup_message(worker)

    def _handle_startup_message(self, worker: _Worker) -> None:
        try:
            kind, payload = worker.inbox.recv()
        except (EOFError, OSError):
            worker.kill()
            raise VerifierError(f"a verifier worker died while starting (exit code {worker.process.poll()})") \
                from None
        if kind != "ready":
            worker.kill()
            raise VerifierError(f"a verifier worker failed to start:\n{payload}")
        worker.ready = True

    def _run(self, keys: list[tuple[str, str, bool]], timeout_s: float) -> list[tuple[str, str | None, str | None]]:
        try:
            return self._dispatch(keys, timeout_s)
        except BaseException:
            # Failed to start, interrupted, ...: a worker still holding items would answer into the next batch.
            for worker in self._workers:
                if worker.pending:
                    worker.kill()
                    worker.pending.clear()
            self._workers = [w for w in self._workers if w.alive()]
            raise

    def _dispatch(self, keys: list[tuple[str, str, bool]], timeout_s: float) -> list[tuple[str, str | None,
                                                                                          str | None]]:
        """Verify ``keys`` in chunks across the workers: (status, error, pred_answer) each. A worker that dies or
        passes its deadline is replaced: the item it was on gets ``error`` / ``timeout`` (with the answer it had
        extracted, if any) and the rest of its chunk goes back to the queue."""
        self._ensure_workers()
        results: list[tuple[str, str | None, str | None] | None] = [None] * len(keys)
        preds: dict[int, str | None] = {}  # answers extracted by items still being checked
        queue: collections.deque[int] = collections.deque(range(len(keys)))
        chunk_size = max(1, min(_MAX_CHUNK, math.ceil(len(keys) / (4 * self.num_workers))))
        while queue or any(w.pending for w in self._workers):
            self._feed_idle(queue, keys, chunk_size, timeout_s)
            busy = [w for w in self._workers if w.pending]
            if not busy:  # every idle worker died on send and was replaced: feed the replacements
                continue
            wait([w.inbox for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in busy:  # a dead worker's pipe reads EOF, so wait() returned for it too
                died = self._drain(worker, results, preds, timeout_s)
                failure = self._failure(worker, died, timeout_s)
                if failure is not None:
                    seq = worker.pending.popleft()
                    results[seq] = (*failure, preds.pop(seq, None))
                    queue.extendleft(reversed(worker.pending))
                    worker.pending.clear()
                    self._replace(worker)
        return results  # type: ignore[return-value]

    def _feed_idle(self, queue: collections.deque[int], keys: list[tuple[str, str, bool]], chunk_size: int,
                   timeout_s: float) -> None:
        """Send the next chunk of ``queue`` to every idle worker and set its deadline."""
        for worker in self._workers:
            if worker.pending or not queue:
                continue
            chunk = [queue.popleft() for _ in range(min(chunk_size, len(queue)))]
            try:
                worker.outbox.send([(seq, *keys[seq]) for seq in chunk])
            except OSError:  # it died while idle: put the chunk back, start another
                queue.extendleft(reversed(chunk))
                if not worker.ready:
                    worker.kill()
                    raise VerifierError("a verifier worker died while starting") from None
                self.stats["worker_deaths"] += 1
                self._replace(worker)
                continue
            worker.pending.extend(chunk)
            worker.deadline = time.monotonic() + timeout_s if worker.ready else worker.started + _STARTUP_TIMEOUT_S

    def _drain(self, worker: _Worker, results: list, preds: dict[int, str | None], timeout_s: float) -> bool:
        """Store every answer ``worker`` has sent so far; True when its pipe is closed (it died). An item's
        extracted answer (status None) is kept aside: its deadline runs on until its verdict comes."""
        try:
            while worker.pending and worker.inbox.poll():
                if not worker.ready:
                    self._handle_startup_message(worker)
                    worker.deadline = time.monotonic() + timeout_s
                    continue
                seq, status, err, pred = worker.inbox.recv()
                expected = worker.pending[0]
                if seq != expected:
                    raise VerifierError(f"verifier protocol error: got item {seq}, expected {expected}")
                if status is None:
                    preds[seq] = pred
                    continue
                worker.pending.popleft()
                preds.pop(seq, None)
                results[seq] = (status, err, pred)
                worker.deadline = time.monotonic() + timeout_s
        except (EOFError, OSError):
            return True
        return False

    def _failure(self, worker: _Worker, died: bool, timeout_s: float) -> tuple[str, str] | None:
        """The verdict for the item a dead or overdue ``worker`` holds, None while it is fine; a worker that fails
        before it ever started is an environment problem, raised rather than counted."""
        if not worker.pending:
            return None
        if died:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(1)
            code = worker.process.poll()
            if not worker.ready:
                worker.kill()
                raise VerifierError(f"a verifier worker died while starting (exit code {code})")
            self.stats["worker_deaths"] += 1
            return "error", f"verifier worker died (exit code {code})"
        if time.monotonic() >= worker.deadline:
            if not worker.ready:
                worker.kill()
                raise VerifierError(f"a verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            self.stats["timeouts"] += 1
            return "timeout", f"verification took longer than {timeout_s:g} s"
        return None


# -------------------------------------------------------------------------------------- module-level convenience

_shared_pools: dict[int, VerifierPool] = {}
_shared_lock = threading.Lock()


def shared_pool(num_workers: int = 2) -> VerifierPool:
    """The process-wide pool for ``num_workers`` (created on first use, closed at exit)."""
    with _shared_lock:
        pool = _shared_pools.get(num_workers)
        if pool is None or pool._closed:
            pool = _shared_pools[num_workers] = VerifierPool(num_workers)
        return pool


@atexit.register
def _close_shared_pools() -> None:
    for pool in list(_shared_pools.values()):
        with contextlib.suppress(Exception):
            pool.close()


def verify_batch(responses: Sequence[str], golds: Sequence[object], *, timeout_s: float,
                 require_single_boxed: bool = False, num_workers: int = 2) -> list[Verdict]:
    """Verify each response's last ``\\boxed{}`` against its gold answer, in the shared pool (any thread)."""
    return shared_pool(num_workers).verify_batch(responses, golds, timeout_s=timeout_s,
                                                 require_single_boxed=require_single_boxed)


def summarize(verdicts: Iterable[Verdict]) -> dict:
    """Counts per status (every status present, 0 if none), ``total`` and ``accuracy`` (correct / total)."""
    counts = dict.fromkeys(STATUSES, 0)
    for verdict in verdicts:
        counts[verdict.status] += 1
    total = sum(counts.values())
    return {**counts, "total": total, "accuracy": counts["correct"] / total if total else 0.0}

