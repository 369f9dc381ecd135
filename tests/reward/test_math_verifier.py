"""MathVerifier: math-verify bounded in time, from any thread, without touching the host's alarm."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepeyes.reward import MathVerifier, accuracy

SLOW = "9**9**9**9"  # math-verify grinds on this until its timeout


@pytest.fixture
def verifier():
    verifier = MathVerifier(timeout_s=3.0)
    yield verifier
    verifier.close()


def test_verifies_equivalence(verifier):
    assert verifier.verify("\\frac{1}{2}", "0.5")
    assert not verifier.verify("\\frac{1}{2}", "0.6")
    assert (verifier.stats.calls, verifier.stats.matches) == (2, 1)


def _worker_pid(verifier: MathVerifier) -> int:
    return verifier._process.pid  # private: which worker answered is the point of these tests


def test_a_slow_step_is_interrupted_inside_the_worker(verifier):
    assert verifier.verify("1", "1")
    worker = _worker_pid(verifier)
    started = time.monotonic()
    assert not verifier.verify("1", SLOW)
    assert time.monotonic() - started < 2.9  # math-verify's own 1 s step timeout, not the 3 s kill
    assert verifier.stats.timeouts == 1
    assert verifier.verify("2", "2.0")
    assert _worker_pid(verifier) == worker


def test_the_deadline_kills_a_stuck_worker_and_the_next_call_works():
    verifier = MathVerifier(timeout_s=0.5)  # shorter than math-verify's 1 s minimum step timeout
    try:
        assert verifier.verify("1", "1")
        worker = _worker_pid(verifier)
        started = time.monotonic()
        assert not verifier.verify("1", SLOW)
        assert time.monotonic() - started < 2.0
        assert verifier.stats.timeouts == 1
        assert verifier.verify("2", "2.0")
        assert _worker_pid(verifier) != worker
    finally:
        verifier.close()


def test_works_from_worker_threads(verifier):
    cases = [("\\frac{1}{2}", "0.5", True), ("3/4", "0.75", True), ("1517", "1518", False)] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: verifier.verify(case[0], case[1]), cases))
    assert results == [expected for _, _, expected in cases]
    assert verifier.stats.errors == verifier.stats.timeouts == 0


def test_accuracy_from_a_thread():
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(accuracy, "\\dfrac{3}{4}", "0.75").result() == 1.0


def test_the_host_alarm_is_left_alone(verifier):
    # In-process math-verify would cancel this timer (signal.alarm(0)); pytest-timeout uses it too.
    previous = signal.setitimer(signal.ITIMER_REAL, 1000)
    try:
        assert verifier.verify("1", "1.0")
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert remaining > 900
    finally:
        signal.setitimer(signal.ITIMER_REAL, *previous)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
