"""math-verify, bounded in time and callable from any thread.

math-verify bounds itself with `signal.alarm`, which only works in the main thread (elsewhere it
raises), cancels whatever alarm the host program had set, and cannot interrupt long C-level
arithmetic. So it runs in a worker process of its own: there it is the main thread and its own
timeout interrupts a slow step while the worker lives on, and the caller's deadline, enforced by
killing the worker, bounds everything else. A call costs a pipe round trip (well under 1 ms) plus
math-verify's own time; a killed worker is replaced on the next call (~0.5 s).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import threading
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

_MATCH, _NO_MATCH, _ERROR, _TIMEOUT = "match", "no_match", "error", "timeout"
_STARTUP_TIMEOUT_S = 60.0


@dataclass
class VerifyStats:
    """Counters for logging: failures are scored as no-match, so they are counted, never raised."""

    calls: int = 0
    matches: int = 0
    errors: int = 0
    timeouts: int = 0


class MathVerifier:
    """`verify(gold, prediction)` with math-verify in a worker process, at most `timeout_s` per call.

    Thread-safe: calls from several threads are served one at a time by the one worker.
    The worker starts on first use and is a daemon: it dies with this process.
    """

    def __init__(self, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.stats = VerifyStats()
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._owner_pid = os.getpid()

    def verify(self, gold: str, prediction: str) -> bool:
        """Whether math-verify finds `prediction` equivalent to `gold`; False on error or timeout."""
        self._forget_worker_if_forked()
        with self._lock:
            self.stats.calls += 1
            outcome, detail = self._ask(gold, prediction)
            if outcome == _MATCH:
                self.stats.matches += 1
            elif outcome == _ERROR:
                self.stats.errors += 1
            elif outcome == _TIMEOUT:
                self.stats.timeouts += 1
            if outcome in (_ERROR, _TIMEOUT):
                logger.warning(
                    "math-verify %s (%s) on gold=%.80r prediction=%.80r; scored as no match",
                    outcome, detail, gold, prediction,
                )
            return outcome == _MATCH

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            self._stop_worker()

    def _ask(self, gold: str, prediction: str) -> tuple[str, str]:
        """(outcome, detail) from the worker; a dead or overdue worker is stopped (and replaced later)."""
        if self._conn is None:
            self._start_worker()
        assert self._conn is not None
        try:
            self._conn.send((gold, prediction))
            if self._conn.poll(self.timeout_s):
                return self._conn.recv()
        except (EOFError, OSError) as err:
            self._stop_worker()
            return _ERROR, f"worker died: {err!r}"
        self._stop_worker()
        return _TIMEOUT, f"worker killed after {self.timeout_s} s"

    def _start_worker(self) -> None:
        # spawn, not fork: forking a multi-threaded trainer can copy a held lock into the child.
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        # math-verify's own per-step timeout (whole seconds) is half the budget, so one slow step is
        # interrupted inside the worker, which survives; the kill covers the rest.
        step_timeout_s = max(1, math.floor(self.timeout_s / 2))
        process = context.Process(
            target=_serve, args=(child_conn, step_timeout_s), name="math-verify", daemon=True
        )
        process.start()
        child_conn.close()
        if not parent_conn.poll(_STARTUP_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"math-verify worker did not start within {_STARTUP_TIMEOUT_S} s")
        parent_conn.recv()
        self._process, self._conn = process, parent_conn

    def _stop_worker(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _forget_worker_if_forked(self) -> None:
        # A forked child must not share the parent's pipe (replies would interleave) or its lock.
        if os.getpid() != self._owner_pid:
            self._owner_pid = os.getpid()
            self._lock = threading.Lock()
            self._process = self._conn = None


# Bare LaTeX ("\\dfrac{3}{4}", "\\sqrt{2}/2") is only found between $...$. Plain words are never
# wrapped: as math, "Paris" would become the product p*a*r*i*s and equal "pairs".
_MATH_LOOKING = re.compile(r"[\\\d+\-*/^=<>]")


def _serve(conn: Connection, step_timeout_s: int) -> None:
    """Worker loop: answer each (gold, prediction) with (outcome, detail)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def extract(text: str) -> list:
        parsed = parse(text, parsing_timeout=step_timeout_s, raise_on_error=True)
        if not parsed and _MATH_LOOKING.search(text):
            parsed = parse(f"${text}$", parsing_timeout=step_timeout_s, raise_on_error=True)
        return parsed

    # SymPy deprecation warnings on odd input would flood the trainer's log.
    warnings.simplefilter("ignore")
    conn.send("ready")
    while True:
        try:
            gold, prediction = conn.recv()
        except EOFError:
            return
        try:
            matched = verify(
                extract(gold), extract(prediction), timeout_seconds=step_timeout_s, raise_on_error=True
            )
            reply = (_MATCH if matched else _NO_MATCH, "")
        except TimeoutException:
            reply = (_TIMEOUT, f"a step exceeded {step_timeout_s} s")
        except Exception as err:  # noqa: BLE001 - any failure inside math-verify is a no-match, counted
            reply = (_ERROR, f"{type(err).__name__}: {err}"[:200])
        conn.send(reply)
